"""Adapters stored at start-up from directories on the server (`--lora-modules`,
adapters/preload.py): served like uploads, no new version on a restart with the same files,
a new one when they changed, and bad entries refused with one line."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loragate.engine.errors import ModelConfigError
from loragate.gateway.cli import main
from loragate.gateway.server import make_loader
from loragate.gateway.settings import GatewaySettings

from .conftest import RunningServer


def with_modules(spec: str):
    def factory(config, settings):
        return make_loader(config, dataclasses.replace(settings, lora_modules=spec))
    return factory


def complete(server, model: str, key: str = "key-a") -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", headers=server.headers(key), timeout=30,
                      json={"model": model, "prompt": "t5 t6 t7", "max_tokens": 8, "temperature": 0})


def test_a_preloaded_adapter_is_its_tenants_and_a_restart_adds_no_version(tiny_llama, tmp_path, save_lora, monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    adapter = save_lora(tiny_llama, tmp_path / "sql", 0.3, seed=0, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    (adapter / "training_args.bin").write_bytes(b"\x80\x04not loaded")  # a PEFT output dir's other files stay out
    (adapter / "README.md").write_text("# sql\n")
    spec = f"tenant-a/sql={adapter}"
    s = RunningServer(tiny_llama, None, loader_factory=with_modules(spec))
    try:
        answer = complete(s, "sql")
        assert answer.status_code == 200, answer.text
        ids = s.state.engine.engine.tokenize("t5 t6 t7")
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        ref = PeftModel.from_pretrained(base, adapter).generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8,
                                                                do_sample=False)[0, len(ids):]
        assert answer.json()["choices"][0]["text"] == s.state.engine.tokenizer.decode(ref.tolist(), skip_special_tokens=True)
        assert complete(s, "sql", key="key-b").status_code == 404  # tenant-a's, as an upload would be
        info = httpx.get(s.url + "/v1/adapters/sql", headers=s.headers()).json()
        assert info["version"] == 1
        # The same two files uploaded by another tenant: the same content hash.
        upload = httpx.post(s.url + "/v1/adapters", headers=s.headers("key-b"), data={"name": "sql"}, timeout=30,
                            files=[("file", (n, (adapter / n).read_bytes()))
                                   for n in ("adapter_config.json", "adapter_model.safetensors")])
        assert upload.status_code == 201 and upload.json()["sha256"] == info["sha256"]
    finally:
        s.stop()
    s = RunningServer(tiny_llama, None, loader_factory=with_modules(spec))  # a restart, the same files
    try:
        assert httpx.get(s.url + "/v1/adapters/sql", headers=s.headers()).json()["version"] == 1
    finally:
        s.stop()
    save_lora(tiny_llama, tmp_path / "sql2", 0.3, seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    shutil.copyfile(tmp_path / "sql2" / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    s = RunningServer(tiny_llama, None, loader_factory=with_modules(spec))  # new weights: the next version
    try:
        info2 = httpx.get(s.url + "/v1/adapters/sql", headers=s.headers()).json()
        assert info2["version"] == 2 and info2["sha256"] != info["sha256"]
    finally:
        s.stop()


def test_an_invalid_preloaded_adapter_keeps_the_server_unready_and_says_why(tiny_llama, tmp_path, save_lora,
                                                                            monkeypatch):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    adapter = save_lora(tiny_llama, tmp_path / "big", 0.3, seed=0, r=32, lora_alpha=16, target_modules=["q_proj"])
    s = RunningServer(tiny_llama, None, loader_factory=with_modules(f"tenant-a/big={adapter}"), load_async=True,
                      max_lora_rank=16)
    try:
        for _ in range(300):
            if s.state.load_error:
                break
            s.thread.join(0.1)
        ready = httpx.get(s.url + "/readyz")
        assert ready.status_code == 503 and s.state.engine is None
        message = ready.json()["error"]["message"]
        assert f"big={adapter}" in message and "rank" in message
        assert not (tmp_path / "home" / "adapters" / "tenant-a").exists()  # nothing stored
        # and no engine left running behind the unready server
        assert not [t for t in threading.enumerate() if t.name == "loragate-engine" and t.is_alive()]
    finally:
        s.stop()


@pytest.mark.parametrize("spec, message", [
    ("sql", "is not '\\[tenant/\\]name=path'"),
    ('{"name": "sql"', "is not a JSON object"),
    ('{"name": "sql", "path": "/x", "base": "m"}', "the keys name, path and base_model_name"),
    ('{"name": "sql", "path": ""}', "'name' and 'path' must be non-empty strings"),
    ('{"name": "sql", "path": "/x", "base_model_name": 3}', "'base_model_name' must be a string"),
    ('["sql=/x"]', "adapter name '\\[\"sql' is not allowed"),
    ('t/sql=/x\n{"name": "t/sql", "path": "/y"}', "'t/sql' is named twice"),
    ("=/x", "is not"),
    ("team a/sql=/x", "tenant name"),
    ("t/sql=/x,t/sql=/y", "'t/sql' is named twice"),
])
def test_malformed_lora_modules_are_bad_settings(spec, message):
    with pytest.raises(ModelConfigError, match=message):
        GatewaySettings(lora_modules=spec)
    assert [(m.tenant, m.name) for m in GatewaySettings(lora_modules="sql=/x, t/b=/y").preloaded_adapters()] == \
        [(None, "sql"), ("t", "b")]


def test_lora_modules_take_vllms_forms_one_per_argument():
    """vLLM's `--lora-modules a=/x '{"name": "b", "path": "/y", "base_model_name": "m"}'`."""
    from loragate.gateway.cli import build_parser
    from loragate.gateway.config_flags import dataclass_from_args

    args = build_parser().parse_args(["serve", "--lora-modules", "sql=/x,t/c=/z",
                                      '{"name": "t/b", "path": "/y, z", "base_model_name": "m"}', "--port", "9"])
    settings = dataclass_from_args(GatewaySettings, args)
    assert [(m.tenant, m.name, str(m.path), m.base_model) for m in settings.preloaded_adapters()] == \
        [(None, "sql", "/x", None), ("t", "c", "/z", None), ("t", "b", "/y, z", "m")]
    assert settings.port == 9


@pytest.mark.parametrize("argv, message", [
    (["--lora-modules", "sql={dir}/missing"], "has no adapter_config.json or adapter_model.safetensors"),
    (["--lora-modules", "sql={dir}", "--max-loras", "0"], "adapters need LoRA slots"),
    (["--lora-modules", "sql={dir}", "--api-keys", "k=team"], "name each adapter's tenant"),
])
def test_serve_stops_with_one_line_before_loading_anything(argv, message, tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert main(["serve", *(a.format(dir=tmp_path) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loragate: error: lora_modules: ") and message in err and "Traceback" not in err
