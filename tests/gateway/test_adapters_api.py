"""Adapter management over HTTP: upload, inference with the adapter, tenant isolation,
refused uploads that change nothing, restart."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from .conftest import RunningServer


@pytest.fixture(scope="module")
def peft_adapter(tiny_llama, tmp_path_factory, save_lora) -> Path:
    return save_lora(tiny_llama, tmp_path_factory.mktemp("upload") / "adapter", 0.3, seed=0, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "down_proj"])


def files_of(d: Path) -> list:
    return [("file", (p.name, p.read_bytes())) for p in sorted(d.iterdir())]


def upload(server, name, files, key="key-a", method="POST"):
    url = server.url + "/v1/adapters" + (f"/{name}" if method == "PUT" else "")
    return httpx.request(method, url, data={"name": name}, files=files, headers=server.headers(key), timeout=30)


def store_snapshot(home: Path) -> dict:
    root = home / "adapters"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def complete(server, model, key="key-a", prompt="t5 t6 t7", n=8):
    return httpx.post(server.url + "/v1/completions", headers=server.headers(key), timeout=30,
                      json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 0})


def test_upload_then_inference_matches_peft(server, peft_adapter, tiny_llama):
    r = upload(server, "sql", files_of(peft_adapter))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "sql" and info["version"] == 1 and info["rank"] == 8
    assert info["target_modules"] == ["down_proj", "q_proj", "v_proj"] and len(info["sha256"]) == 64
    assert info["dora"] is False
    out = complete(server, "sql").json()
    ids = server.state.engine.engine.tokenize("t5 t6 t7")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, peft_adapter).generate(torch.tensor([ids]), max_new_tokens=8,
                                                                 min_new_tokens=8, do_sample=False)[0, len(ids):]
    tok = server.state.engine.tokenizer
    assert out["choices"][0]["text"] == tok.decode(ref.tolist(), skip_special_tokens=True)
    assert complete(server, "tiny:sql").json()["choices"][0]["text"] == out["choices"][0]["text"]
    assert complete(server, "tiny").json()["choices"][0]["text"] != out["choices"][0]["text"]
    models = httpx.get(server.url + "/v1/models", headers=server.headers()).json()
    assert "sql" in [m["id"] for m in models["data"]]


def test_a_vocabulary_adapter_uploads_and_answers_as_peft_does(server, tiny_llama, tmp_path, save_lora):
    """embed_tokens and lm_head targets (engine/models/vocab_lora.py); peft saves a copy of the
    base embedding and head beside them, which the upload checks against the base model."""
    from safetensors.torch import load_file, save_file

    path = save_lora(tiny_llama, tmp_path / "vocab", 0.3, seed=5, r=4, lora_alpha=8,
                     target_modules=["embed_tokens", "lm_head", "q_proj"])
    r = upload(server, "vocab", files_of(path))
    assert r.status_code == 201, r.text
    assert r.json()["target_modules"] == ["embed_tokens", "lm_head", "q_proj"]
    ids = server.state.engine.engine.tokenize("t5 t6 t7")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, path).generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8,
                                                         do_sample=False)[0, len(ids):]
    out = complete(server, "vocab").json()["choices"][0]["text"]
    assert out == server.state.engine.tokenizer.decode(ref.tolist(), skip_special_tokens=True)
    assert out != complete(server, "tiny").json()["choices"][0]["text"]
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.base_layer.weight"][3] += 1.0  # a head trained with the adapter
    save_file(tensors, path / "adapter_model.safetensors")
    r = upload(server, "trained-head", files_of(path))
    assert r.status_code == 422 and "lm_head" in r.json()["error"]["message"], r.text
    assert httpx.get(server.url + "/v1/adapters/trained-head", headers=server.headers()).status_code == 404


def test_a_dora_adapter_uploads_and_answers_as_peft_does(server, tiny_llama, tmp_path, save_lora, monkeypatch):
    """...and its DoRA scales are computed in a worker thread, not in the engine's loop, where
    every running request would wait for them."""
    from loragate.engine.models import slot_rows

    threads, real = [], slot_rows.dora_scales
    monkeypatch.setattr(slot_rows, "dora_scales", lambda *a: threads.append(threading.current_thread().name) or real(*a))
    dora = save_lora(tiny_llama, tmp_path / "dora", 0.3, seed=4, r=8, lora_alpha=16, use_dora=True,
                     target_modules=["q_proj", "v_proj", "down_proj"])
    r = upload(server, "dora", files_of(dora))
    assert r.status_code == 201 and r.json()["dora"] is True
    out = complete(server, "dora").json()
    ids = server.state.engine.engine.tokenize("t5 t6 t7")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, dora).generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8,
                                                         do_sample=False)[0, len(ids):]
    assert out["choices"][0]["text"] == server.state.engine.tokenizer.decode(ref.tolist(), skip_special_tokens=True)
    assert threads and "loragate-engine" not in threads


def test_tenant_isolation(server, peft_adapter):
    assert upload(server, "mine", files_of(peft_adapter), key="key-a").status_code == 201
    snapshot = store_snapshot(Path(server_home(server)))
    b = server.headers("key-b")
    url = server.url + "/v1/adapters/mine"
    assert httpx.get(url, headers=b).status_code == 404
    assert httpx.delete(url, headers=b).status_code == 404
    assert upload(server, "mine", files_of(peft_adapter), key="key-b", method="PUT").status_code == 404
    assert complete(server, "mine", key="key-b").status_code == 404
    assert httpx.get(server.url + "/v1/models/mine", headers=b).status_code == 404
    assert httpx.get(server.url + "/v1/models/mine", headers=server.headers("key-a")).json()["parent"] == "tiny"
    assert "mine" not in [a["name"] for a in httpx.get(server.url + "/v1/adapters", headers=b).json()["data"]]
    assert store_snapshot(Path(server_home(server))) == snapshot
    assert httpx.get(url).status_code == 401  # no key
    assert httpx.get(url, headers=server.headers()).status_code == 200
    admin = httpx.get(server.url + "/v1/adapters", headers=server.headers("key-admin")).json()["data"]
    assert ("tenant-a", "mine") in {(a["tenant"], a["name"]) for a in admin}


def server_home(server) -> str:
    import os

    return os.environ["LORAGATE_HOME"]


def test_replace_and_delete(server, peft_adapter, tmp_path):
    assert upload(server, "swap", files_of(peft_adapter)).status_code == 201
    first = complete(server, "swap").json()["choices"][0]["text"]
    assert upload(server, "swap", files_of(peft_adapter)).status_code == 409
    other = tmp_path / "other"
    other.mkdir()
    for p in peft_adapter.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = {k: v * 3 for k, v in load_file(other / "adapter_model.safetensors").items()}
    save_file(tensors, other / "adapter_model.safetensors")
    r = upload(server, "swap", files_of(other), method="PUT")
    assert r.status_code == 200 and r.json()["version"] == 2
    assert complete(server, "swap").json()["choices"][0]["text"] != first
    assert httpx.delete(server.url + "/v1/adapters/swap", headers=server.headers()).status_code == 200
    assert complete(server, "swap").status_code == 404


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_member(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bad_uploads(adapter: Path) -> dict:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    from safetensors.torch import load_file, save as save_bytes

    tensors = load_file(adapter / "adapter_model.safetensors")
    nan = {k: v.clone() for k, v in tensors.items()}
    next(iter(nan.values()))[0, 0] = float("nan")
    wide = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in tensors.items()}

    def with_cfg(**changes):
        return [("file", ("adapter_config.json", json.dumps({**cfg, **changes}).encode())),
                ("file", ("adapter_model.safetensors", weights))]

    def with_weights(t):
        return [("file", ("adapter_config.json", json.dumps(cfg).encode())),
                ("file", ("adapter_model.safetensors", save_bytes(t)))]

    good_cfg = json.dumps(cfg).encode()
    return {
        "absolute path in tar": (422, [("file", ("a.tar.gz", tar_of([tar_member("/etc/adapter_config.json", good_cfg)])))]),
        "dot-dot in tar": (422, [("file", ("a.tar.gz", tar_of([tar_member("../adapter_config.json", good_cfg)])))]),
        "symlink in tar": (422, [("file", ("a.tar.gz", tar_of([tar_member("adapter_model.safetensors", kind=tarfile.SYMTYPE, link="/etc/passwd")])))]),
        "device in tar": (422, [("file", ("a.tar.gz", tar_of([tar_member("dev", kind=tarfile.CHRTYPE)])))]),
        "zip bomb": (413, [("file", ("a.zip", zip_of({"adapter_model.safetensors": b"\0" * (9 << 20)})))]),
        "zip traversal": (422, [("file", ("a.zip", zip_of({"../../x": b"x"})))]),
        "pickle weights": (422, [("file", ("adapter_config.json", good_cfg)), ("file", ("adapter_model.bin", b"\x80\x04."))]),
        "oversize": (413, [("file", ("adapter_config.json", good_cfg)), ("file", ("adapter_model.safetensors", b"\0" * (9 << 20)))]),
        "missing config": (422, [("file", ("adapter_model.safetensors", weights))]),
        "rank too large": (422, with_cfg(r=128)),
        "nan": (422, with_weights(nan)),
        "wrong shapes": (422, with_weights(wide)),
        "unknown target": (422, with_cfg(target_modules=["q_proj", "lm_head_x"])),
        "not an archive": (422, [("file", ("a.tar.gz", b"definitely not gzip"))]),
        "empty body": (400, []),
        "dora without magnitudes": (422, with_cfg(use_dora=True)),
    }


def test_refused_uploads_change_nothing(tiny_llama, peft_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, max_upload=8 << 20)
    try:
        assert upload(s, "keep", files_of(peft_adapter)).status_code == 201
        before_store = store_snapshot(tmp_path / "home")
        before_list = httpx.get(s.url + "/v1/adapters", headers=s.headers()).json()
        for what, (status, files) in bad_uploads(peft_adapter).items():
            r = upload(s, f"bad-{len(what)}", files)
            assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
            err = r.json()["error"]
            assert err["message"], what
            assert store_snapshot(tmp_path / "home") == before_store, what
            assert httpx.get(s.url + "/v1/adapters", headers=s.headers()).json() == before_list, what
        tmp_uploads = list(Path("/tmp").glob("loragate-upload-*"))
        assert not tmp_uploads
    finally:
        s.stop()


def test_restart_keeps_adapters_and_outputs(tiny_llama, peft_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None)
    try:
        assert upload(s, "persist", files_of(peft_adapter)).status_code == 201
        before = complete(s, "persist").json()["choices"][0]["text"]
    finally:
        s.stop()
    s = RunningServer(tiny_llama, None)
    try:
        names = [a["name"] for a in httpx.get(s.url + "/v1/adapters", headers=s.headers()).json()["data"]]
        assert names == ["persist"]
        assert complete(s, "persist").json()["choices"][0]["text"] == before
    finally:
        s.stop()


def test_openai_client_with_an_uploaded_adapter(server, peft_adapter):
    import asyncio

    import openai

    assert upload(server, "chatty", files_of(peft_adapter)).status_code == 201
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
    msgs = [{"role": "user", "content": "t7 t8"}]
    full = c.chat.completions.create(model="chatty", messages=msgs, max_tokens=10, temperature=0)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="chatty", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True) if ch.choices)
    assert streamed == full.choices[0].message.content
    base = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert base.choices[0].message.content != full.choices[0].message.content
    assert "chatty" in [m.id for m in c.models.list().data]

    async def run_async():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
        text = await ac.completions.create(model="chatty", prompt="t7 t8", max_tokens=10, temperature=0)
        stream = await ac.completions.create(model="chatty", prompt="t7 t8", max_tokens=10, temperature=0, stream=True)
        parts = [ch.choices[0].text async for ch in stream if ch.choices]
        return text, "".join(parts)

    text, joined = asyncio.run(run_async())
    assert joined == text.choices[0].text
    assert text.usage.completion_tokens == 10


def test_non_streaming_client_disconnect_aborts(server):
    import time

    body = {"model": "tiny", "prompt": "t3 t4", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    engine = server.state.engine.engine
    generated = engine.num_generated_tokens_total
    try:
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers(), timeout=0.5)
    except httpx.TimeoutException:
        pass  # the client gave up and closed the connection
    for _ in range(100):
        if not engine.has_unfinished:
            break
        time.sleep(0.05)
    assert not engine.has_unfinished
    assert engine.num_generated_tokens_total - generated < 2000  # aborted, not run to the end
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_upload_without_content_length_is_refused(server, peft_adapter):
    def body():
        yield b"--x\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nchunked\r\n--x--\r\n"

    r = httpx.post(server.url + "/v1/adapters", content=body(), timeout=10,
                   headers={**server.headers(), "Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 411 and r.json()["error"]["code"] == "length_required"


def test_engine_keeps_a_bounded_number_of_adapters(server, peft_adapter, monkeypatch):
    monkeypatch.setattr(server.state.engine_adapters, "max_items", 2)
    for name in ("e1", "e2", "e3"):
        assert upload(server, name, files_of(peft_adapter)).status_code == 201
        assert complete(server, name).status_code == 200
    held = [k for k in server.state.engine.engine.adapters if k.split("@")[0].split("/")[-1] in ("e1", "e2", "e3")]
    assert len(held) == 2 and not any("/e1@" in k for k in held)
    assert complete(server, "e1").status_code == 200  # evicted from the engine, re-added on use


def test_a_tenant_at_its_adapter_quota_can_replace_but_not_add(server, peft_adapter, monkeypatch):
    b = server.headers("key-b")
    have = len(httpx.get(server.url + "/v1/adapters", headers=b).json()["data"])
    for i in range(have + 2):  # tenant-a holds more than tenant-b's limit: each tenant's count is its own
        upload(server, f"a-{i}", files_of(peft_adapter))
    monkeypatch.setattr(server.app.state.settings, "max_adapters_per_tenant", have + 2)
    for name in ("q1", "q2"):
        assert upload(server, name, files_of(peft_adapter), key="key-b").status_code == 201
    over = upload(server, "q3", files_of(peft_adapter), key="key-b")
    assert over.status_code == 403 and over.json()["error"]["code"] == "adapter_quota", over.text
    assert "q3" not in [a["name"] for a in httpx.get(server.url + "/v1/adapters", headers=b).json()["data"]]
    assert upload(server, "q1", files_of(peft_adapter), key="key-b", method="PUT").status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/q2", headers=b).status_code in (200, 204)
    assert upload(server, "q3", files_of(peft_adapter), key="key-b").status_code == 201


def test_expert_adapters_upload_and_answer_the_openai_client_as_peft_does(tiny_qwen3_moe, tmp_path, monkeypatch,
                                                                         save_lora, save_per_expert_lora):
    """A Qwen3-MoE server: peft's all-linear adapter (the experts and router through
    target_parameters) and a transformers 4 per-expert one go up over REST, list their
    targets, and answer the official client with PeftModel's greedy text; the experts' slots
    are made off the engine's loop, in the worker thread that fetches the adapter."""
    import openai

    from loragate.adapters.pool import LoraSlotPool

    threads, real = [], LoraSlotPool.make_stacks
    monkeypatch.setattr(LoraSlotPool, "make_stacks",
                        lambda self, w: threads.append(threading.current_thread().name) or real(self, w))
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    dirs = {"all": save_lora(tiny_qwen3_moe, tmp_path / "all", 0.15, seed=1, r=8, lora_alpha=16,
                             target_modules="all-linear"),
            "v4": save_per_expert_lora(tiny_qwen3_moe, tmp_path / "v4", seed=2)}
    s = RunningServer(tiny_qwen3_moe, None)
    try:
        for name, d in dirs.items():
            r = upload(s, name, files_of(d))
            assert r.status_code == 201, r.text
            assert {"experts.gate_up_proj", "experts.down_proj", "gate.weight"} <= set(r.json()["target_modules"])
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="key-a", max_retries=0)
        ids = s.state.engine.engine.tokenize("t5 t6 t7")
        base = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.float32)
        texts = set()
        for name, d in dirs.items():
            text = client.completions.create(model=name, prompt="t5 t6 t7", max_tokens=8, temperature=0).choices[0].text
            ref = PeftModel.from_pretrained(base, d).generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8,
                                                              do_sample=False)[0, len(ids):]
            assert text == s.state.engine.tokenizer.decode(ref.tolist(), skip_special_tokens=True), name
            base = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.float32)  # peft wrapped the last
            texts.add(text)
        assert len(texts) == 2 and threads and "loragate-engine" not in threads
    finally:
        s.stop()


def test_the_upload_limit_is_also_the_limit_on_loading_weights(tiny_llama, tmp_path, monkeypatch, peft_adapter):
    """--max-upload-size above the loader's 2 GiB default (a sparse-expert model's adapter can
    be bigger) lets such an adapter load, not only upload."""
    from loragate.adapters import registry as registry_module
    from loragate.adapters.loader import DEFAULT_MAX_ADAPTER_BYTES

    limits, real = [], registry_module.load_adapter
    monkeypatch.setattr(registry_module, "load_adapter", lambda *a, **k: limits.append(k["max_bytes"]) or real(*a, **k))
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    s = RunningServer(tiny_llama, None, max_upload=DEFAULT_MAX_ADAPTER_BYTES * 2)
    try:
        assert upload(s, "big-limit", files_of(peft_adapter)).status_code == 201
        assert limits == [DEFAULT_MAX_ADAPTER_BYTES * 2]
    finally:
        s.stop()
