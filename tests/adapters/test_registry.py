"""AdapterRegistry: validate-then-store, versions, tenants, restart, lazy loads, corruption, threads.
Adapters are real peft saves on the tiny random Llama (conftest), broken one way each."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import IA3Config
from peft import LoraConfig as PeftLoraConfig

from loragate.adapters import registry as registry_mod
from loragate.adapters.errors import AdapterError, AdapterNotFound
from .conftest import edit_config, edit_weights, poison
from loragate.adapters.loader import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from loragate.adapters.preload import parse_lora_modules, preload
from loragate.adapters.registry import AdapterInfo, AdapterRegistry, AdapterState
from loragate.adapters.store import LocalAdapterStore

GOOD = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
MAX_RANK = 8
BASE = "tiny-llama"


@pytest.fixture(scope="module")
def good(tmp_path_factory, save_peft):
    path = tmp_path_factory.mktemp("good")
    save_peft(path, PeftLoraConfig(**GOOD))
    return path


@pytest.fixture(scope="module")
def good2(tmp_path_factory, save_peft):  # same shape, other weights: a retrained version
    path = tmp_path_factory.mktemp("good2")
    save_peft(path, PeftLoraConfig(**GOOD), seed=5)
    return path


@pytest.fixture
def make(tmp_path, arch):
    def make(root=tmp_path / "root", max_lora_rank=MAX_RANK, **kwargs):
        return AdapterRegistry(LocalAdapterStore(root), arch, max_lora_rank, base_model_name=BASE,
                               strict_base_model=True, **kwargs)
    return make


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def same_weights(w1, w2) -> bool:
    return w1.rank == w2.rank and w1.modules.keys() == w2.modules.keys() and all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in
        ((w1.modules[k], w2.modules[k]) for k in w1.modules))


def count_loads(monkeypatch) -> list:
    calls, real = [], registry_mod.load_adapter

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(registry_mod, "load_adapter", counting)
    return calls


def test_register_get_list_and_first_use_reads_no_disk(make, good, arch, monkeypatch):
    events = []
    reg = make(on_change=lambda info, id_: events.append((info, id_)))
    info = reg.register("acme", "sql", good)
    assert isinstance(info, AdapterInfo)
    assert (info.tenant, info.name, info.version, info.state, info.error) == ("acme", "sql", 1, AdapterState.READY, None)
    assert (info.rank, info.target_modules) == (4, ("down_proj", "q_proj", "v_proj"))
    assert (info.id, info.key) == ("acme/sql", "acme/sql@1")
    stored = reg.store.get("acme", "sql")
    lines = "".join(f"{hashlib.sha256((stored.path / f).read_bytes()).hexdigest()}  {f}\n" for f in stored.files)
    assert info.sha256 == stored.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    assert info.created == stored.created
    assert reg.get("acme", "sql") == info and reg.list("acme") == [info] and reg.list_all() == [info]
    assert events == [(info, "acme/sql")]

    def no_disk(*args, **kwargs):
        raise AssertionError("the weights validated at upload must be served from memory")
    monkeypatch.setattr(registry_mod, "load_adapter", no_disk)
    monkeypatch.setattr(registry_mod, "_check_sha256", no_disk)
    got_info, weights = reg.weights("acme", "sql")
    assert got_info == info
    assert same_weights(weights, load_adapter(good, arch, MAX_RANK))


def test_reregister_makes_version_2_with_the_new_weights(make, good, good2, arch):
    events = []
    reg = make()
    reg.listeners.append(lambda info, id_: events.append((info and info.key, id_)))
    v1 = reg.register("acme", "sql", good)
    reg.weights("acme", "sql")
    v2 = reg.register("acme", "sql", good2)
    assert (v2.version, v2.key, v2.state) == (2, "acme/sql@2", AdapterState.READY)
    assert v2.sha256 != v1.sha256
    assert reg.get("acme", "sql") == v2 and reg.list("acme") == [v2]
    info, weights = reg.weights("acme", "sql")
    assert info == v2
    assert same_weights(weights, load_adapter(good2, arch, MAX_RANK))
    assert not same_weights(weights, load_adapter(good, arch, MAX_RANK))
    assert events == [("acme/sql@1", "acme/sql"), ("acme/sql@2", "acme/sql")]


# -- every refused upload leaves the store byte-for-byte unchanged ---------------------------







class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling creates the marker: proof nothing unpickles
        return (Path.touch, (self.marker,))


def _pickle_only(d: Path) -> None:
    (d / WEIGHTS_FILE).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Evil(d.parent / "UNPICKLED")))


def _symlinked_weights(d: Path) -> None:
    # Validates through the link, but the store copies regular files only, so it would be lost.
    shutil.move(d / WEIGHTS_FILE, d.parent / "elsewhere.safetensors")
    (d / WEIGHTS_FILE).symlink_to(d.parent / "elsewhere.safetensors")


# id -> (break a copy of the good adapter | peft LoRA options | another peft config, expected code)
BAD = {
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), "missing_file"),
    "missing_weights": (lambda d: (d / WEIGHTS_FILE).unlink(), "missing_file"),
    "pickle_weights": (_pickle_only, "pickle_weights"),
    "symlinked_weights": (_symlinked_weights, "missing_file"),
    "truncated_safetensors": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]),
                              "invalid_weights"),
    "not_json": (lambda d: (d / "adapter_config.json").write_text("{r: 4"), "invalid_config"),
    "wrong_shapes": ({"hidden_size": 32}, "shape_mismatch"),
    "rank_differs_from_config": (lambda d: edit_config(d, r=6), "shape_mismatch"),
    "nan": (lambda d: edit_weights(d, poison(f"{Q0}.lora_A.weight", float("nan"))), "non_finite_weights"),
    "inf": (lambda d: edit_weights(d, poison(f"{Q0}.lora_B.weight", float("inf"))), "non_finite_weights"),
    "rank_too_large": ({"r": 16}, "rank_too_large"),
    "dora_without_magnitudes": (lambda d: edit_config(d, use_dora=True), "invalid_weights"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "unsupported_adapter"),
    "bias": ({"bias": "all"}, "unsupported_adapter"),
    "lora_b_bias_tensor": (lambda d: edit_weights(d, lambda t: t.__setitem__(f"{Q0}.lora_B.bias", torch.zeros(64))),
                           "invalid_weights"),
    "non_lora_peft_type": (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                           "unsupported_adapter"),
    "unknown_target_module": (lambda d: edit_config(d, target_modules=["c_attn"]), "unknown_target_module"),
    "other_base_model": (lambda d: edit_config(d, base_model_name_or_path="Qwen/Qwen2.5-7B"), "base_model_mismatch"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_adapter_is_refused_and_nothing_is_stored(case, tmp_path, make, good, save_peft):
    breaker, code = BAD[case]
    d = tmp_path / "upload" / "adapter"
    d.parent.mkdir()
    if callable(breaker):
        shutil.copytree(good, d)
        breaker(d)
    elif isinstance(breaker, dict):
        hidden = breaker.get("hidden_size", 64)
        save_peft(d, PeftLoraConfig(**{**GOOD, **{k: v for k, v in breaker.items() if k != "hidden_size"}}),
                  hidden_size=hidden)
    else:
        save_peft(d, breaker)
    reg = make()
    kept = reg.register("acme", "kept", good)
    before, listed = snapshot(tmp_path / "root"), reg.list_all()
    for name in ("new", "kept"):  # a new adapter, and a new version of an existing one
        with pytest.raises(AdapterError) as e:
            reg.register("acme", name, d)
        assert e.value.code == code, str(e.value)
        assert snapshot(tmp_path / "root") == before
        assert reg.list_all() == listed and reg.get("acme", "kept") == kept
    with pytest.raises(AdapterNotFound):
        reg.get("acme", "new")
    assert not (tmp_path / "upload" / "UNPICKLED").exists()
    assert reg.register("acme", "kept", good).version == 2  # no version number was burned


def test_refused_by_the_store_after_validation_stores_nothing(tmp_path, arch, good, monkeypatch):
    calls = count_loads(monkeypatch)
    small = AdapterRegistry(LocalAdapterStore(tmp_path / "small", max_total_bytes=10_000), arch, MAX_RANK)
    before = snapshot(tmp_path / "small")
    with pytest.raises(AdapterError) as e:
        small.register("acme", "big", good)  # valid, but over the store's quota
    assert e.value.code == "too_large" and len(calls) == 1
    assert snapshot(tmp_path / "small") == before and small.list_all() == []
    reg = AdapterRegistry(LocalAdapterStore(tmp_path / "root"), arch, MAX_RANK)
    before = snapshot(tmp_path / "root")
    src = tmp_path / "with-meta"
    shutil.copytree(good, src)
    (src / "meta.json").write_text("{}")  # the store's reserved name
    with pytest.raises(AdapterError) as e:
        reg.register("acme", "x", src)
    assert e.value.code == "invalid_name"
    for tenant, name in [("../etc", "x"), ("acme", "a/b"), ("acme", ".hidden")]:
        with pytest.raises(AdapterError) as e:
            reg.register(tenant, name, good)
        assert e.value.code == "invalid_name"
    assert len(calls) == 2  # bad names are refused before any weights are read
    assert snapshot(tmp_path / "root") == before and reg.list_all() == []


# -- tenants ---------------------------------------------------------------------------------

def test_tenants_only_see_their_own_adapters(make, good, good2):
    reg = make()
    a = reg.register("tenant-a", "shared-name", good)
    reg.register("tenant-a", "private", good)
    for call in (reg.get, reg.weights, reg.delete):
        for name in ("shared-name", "private", "missing"):
            with pytest.raises(AdapterNotFound) as e:
                call("tenant-b", name)
            assert str(e.value) == f"adapter {name!r} does not exist"  # same answer as for a missing one
    assert reg.list("tenant-b") == []
    b = reg.register("tenant-b", "shared-name", good2)  # B's own adapter of the same name: independent
    assert (b.version, b.key) == (1, "tenant-b/shared-name@1")
    assert reg.get("tenant-a", "shared-name") == a
    assert [i.name for i in reg.list("tenant-a")] == ["private", "shared-name"]
    assert reg.list("tenant-b") == [b]
    assert [i.id for i in reg.list_all()] == ["tenant-a/private", "tenant-a/shared-name", "tenant-b/shared-name"]


# -- restart, lazy loads, corruption -----------------------------------------------------------

def test_restart_lists_the_same_adapters_and_loads_them_lazily(make, good, good2, arch, monkeypatch):
    reg = make()
    reg.register("t1", "a", good)
    reg.register("t1", "a", good2)
    reg.register("t1", "b", good)
    reg.register("t2", "c", good2)
    before = {i.id: reg.weights(i.tenant, i.name) for i in reg.list_all()}
    calls = count_loads(monkeypatch)
    reg2 = make()
    assert calls == []  # rebuilding the index reads configs only
    assert reg2.list_all() == reg.list_all() and reg2.list("t2") == reg.list("t2")
    assert reg2.get("t1", "a").version == 2
    for info in reg2.list_all():
        got_info, weights = reg2.weights(info.tenant, info.name)
        assert got_info == info
        assert same_weights(weights, before[info.id][1])
    assert len(calls) == 3  # the latest version of each adapter
    reg2.weights("t1", "a")
    assert len(calls) == 3  # loaded once, then served from memory


@pytest.mark.parametrize("corrupt,code", [
    (lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes()[:-100]), "invalid_weights"),
    # still a valid adapter, but not the bytes that were uploaded
    (lambda p: edit_weights(p, poison(f"{Q0}.lora_A.weight", 0.5)), "invalid_weights"),
    (lambda p: (p / WEIGHTS_FILE).unlink(), "missing_file"),
], ids=["truncated", "other_valid_values", "deleted_file"])
def test_corrupted_on_disk_fails_and_stays_failed(make, good, monkeypatch, corrupt, code):
    reg = make()
    reg.register("acme", "ok", good)
    info = reg.register("acme", "rot", good)
    corrupt(reg.store.get("acme", "rot").path)
    reg.weights("acme", "rot")  # this process validated it at upload and still holds it
    reg2 = make()
    with pytest.raises(AdapterError) as e:
        reg2.weights("acme", "rot")
    assert e.value.code == code and "acme/rot@1 no longer loads" in str(e.value)
    failed = reg2.get("acme", "rot")
    assert failed.state is AdapterState.FAILED and failed.error == str(e.value)
    assert (failed.version, failed.sha256, failed.rank) == (info.version, info.sha256, info.rank)
    calls = count_loads(monkeypatch)
    with pytest.raises(AdapterError) as e2:
        reg2.weights("acme", "rot")
    assert e2.value.code == code and calls == []  # stored versions never change: not re-read
    assert reg2.weights("acme", "ok")[0].state is AdapterState.READY  # the others are unaffected
    assert reg2.register("acme", "rot", good).version == 2  # a re-upload is the way out
    assert reg2.weights("acme", "rot")[0].state is AdapterState.READY


def test_adapters_the_restarted_server_cannot_serve_are_failed_at_start(make, good, monkeypatch):
    reg = make()
    reg.register("acme", "r4", good)
    reg.register("acme", "bad-config", good)
    (reg.store.get("acme", "bad-config").path / "adapter_config.json").write_text("{oops")
    reg2 = make(max_lora_rank=2)  # restarted with a smaller max_lora_rank
    r4, bad = reg2.get("acme", "r4"), reg2.get("acme", "bad-config")
    assert (r4.state, r4.rank) == (AdapterState.FAILED, 4) and "max_lora_rank=2" in r4.error
    assert bad.state is AdapterState.FAILED and "not valid JSON" in bad.error
    calls = count_loads(monkeypatch)
    with pytest.raises(AdapterError) as e:
        reg2.weights("acme", "r4")
    assert e.value.code == "rank_too_large" and calls == []
    assert make().get("acme", "r4").state is AdapterState.READY  # back at max_lora_rank=8


def test_delete(make, good):
    events = []
    reg = make(on_change=lambda info, id_: events.append((info and info.version, id_)))
    reg.register("acme", "gone", good)
    reg.register("acme", "stays", good)
    reg.delete("acme", "gone")
    assert events[-1] == (None, "acme/gone")
    for call in (reg.get, reg.weights, reg.delete):
        with pytest.raises(AdapterNotFound):
            call("acme", "gone")
    assert [i.name for i in reg.list("acme")] == ["stays"]
    assert [s.name for s in reg.store.list("acme")] == ["stays"]
    assert [i.name for i in make().list_all()] == ["stays"]  # gone after a restart too
    assert reg.register("acme", "gone", good).version == 2  # never reuses a served version


def test_a_failing_listener_does_not_fail_the_change(make, good):
    def broken(info, id_):
        raise RuntimeError("engine is down")
    seen = []
    reg = make(on_change=broken)
    reg.listeners.append(lambda info, id_: seen.append(id_))
    assert reg.register("acme", "x", good).state is AdapterState.READY
    reg.delete("acme", "x")
    assert seen == ["acme/x", "acme/x"]


# -- threads ---------------------------------------------------------------------------------

def test_concurrent_first_use_loads_once(make, good, monkeypatch):
    make().register("acme", "hot", good)
    reg = make()  # restarted: nothing in memory
    calls, real = [], registry_mod.load_adapter

    def slow_load(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)  # a window for the other threads to pile up
        return real(*args, **kwargs)
    monkeypatch.setattr(registry_mod, "load_adapter", slow_load)
    barrier, results, errors = threading.Barrier(8), [], []

    def use():
        barrier.wait()
        try:
            results.append(reg.weights("acme", "hot"))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1 and len(results) == 8
    assert all(w is results[0][1] and i.state is AdapterState.READY for i, w in results)


def test_state_is_loading_while_reading_and_a_delete_meanwhile_is_not_found(make, good, monkeypatch):
    make().register("acme", "a", good)
    reg = make()
    entered, release, real = threading.Event(), threading.Event(), registry_mod.load_adapter

    def blocking_load(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)
    monkeypatch.setattr(registry_mod, "load_adapter", blocking_load)
    out = []
    t = threading.Thread(target=lambda: out.append(_catch(reg.weights, "acme", "a")))
    t.start()
    assert entered.wait(10)
    assert reg.get("acme", "a").state is AdapterState.LOADING
    assert [i.state for i in reg.list("acme")] == [AdapterState.LOADING]
    reg.delete("acme", "a")  # does not wait for the load
    release.set()
    t.join()
    assert isinstance(out[0], AdapterNotFound)


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_weights_cache_is_bounded_and_reloads_from_disk(make, good):
    reg = make(max_cached_weights=2)
    for name in ("a", "b", "c"):
        reg.register("t", name, good)
    held = sorted(k for k, e in reg._entries.items() if e.weights is not None)
    assert held == [("t", "b"), ("t", "c")]  # "a" was least recently used
    info, weights = reg.weights("t", "a")  # read back from the store
    assert info.state.value == "READY" and weights.rank == 4
    assert sorted(k for k, e in reg._entries.items() if e.weights is not None) == [("t", "a"), ("t", "c")]


def test_weights_cache_is_bounded_in_bytes_too(make, good, tmp_path):
    """max_cached_bytes: a sparse-expert model's adapters are gigabytes each, so a count of
    them alone does not bound the memory."""
    probe = make(root=tmp_path / "probe")
    probe.register("t", "probe", good)
    size = probe.weights("t", "probe")[1].num_bytes
    reg = make(max_cached_weights=10, max_cached_bytes=2 * size)
    for name in ("a", "b", "c"):
        reg.register("t", name, good)
    assert sorted(k for k, e in reg._entries.items() if e.weights is not None) == [("t", "b"), ("t", "c")]
    assert reg.weights("t", "a")[1].rank == 4  # read back from the store


def test_preload_racing_another_engine_on_the_store_adds_no_version(make, good, good2, tmp_path, monkeypatch):
    """Engines starting together with the same --lora-modules: the files another engine
    stored after this one looked are reused, not stored again; other files still are."""
    reg, other = make(), make()
    module = tmp_path / "module"  # what preload stores of a PEFT directory: its two files
    module.mkdir()
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(good / f, module / f)

    def get_after_the_other_engine_stored(tenant, name):
        other.register(tenant, name, module)
        raise AdapterNotFound(f"adapter {name!r} does not exist")
    monkeypatch.setattr(reg, "get", get_after_the_other_engine_stored)
    preload(reg, parse_lora_modules(f"t/a={good}"), "t", set())
    assert [a.version for a in LocalAdapterStore(tmp_path / "root").list_all()] == [1]
    assert reg.register("t", "a", good2, reuse_same=True).version == 2
    assert reg.register("t", "a", good2, reuse_same=True).version == 2


def test_preload_names_a_base_model_name_the_server_does_not_run(make, good, caplog):
    """vLLM's JSON form may name the base model: another name is logged, not refused (vLLM
    only shows it in /v1/models), and the adapter is stored either way."""
    reg = make()
    entries = (f'{{"name": "a", "path": "{good}", "base_model_name": "org/tiny"}}\n'
               f'{{"name": "b", "path": "{good}", "base_model_name": "org/other"}}')
    with caplog.at_level("WARNING", logger="loragate.adapters.preload"):
        preload(reg, parse_lora_modules(entries), "t", {"tiny", "org/tiny"})
    warned = [r.getMessage() for r in caplog.records if "base_model_name" in r.getMessage()]
    assert len(warned) == 1 and "'org/other' is not this server's model (org/tiny, tiny)" in warned[0]
    assert [reg.get("t", n).version for n in ("a", "b")] == [1, 1]
