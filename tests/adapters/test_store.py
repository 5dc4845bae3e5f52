"""LocalAdapterStore: versions, durability across restarts, atomic failure, names, links."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from loragate.adapters import store as store_mod
from loragate.adapters.errors import AdapterError, AdapterNotFound
from loragate.adapters.store import AdapterStore, LocalAdapterStore


def upload(tmp_path: Path, content: bytes = b"weights", name: str = "src") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(content)
    return d


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_put_get_list_delete(tmp_path):
    s = LocalAdapterStore(tmp_path / "root")
    assert isinstance(s, AdapterStore)
    a = s.put("acme", "sql-lora", upload(tmp_path))
    assert (a.tenant, a.name, a.version) == ("acme", "sql-lora", 1)
    assert a.files == ("adapter_config.json", "adapter_model.safetensors")
    assert a.path == tmp_path / "root" / "acme" / "sql-lora" / "v1"
    assert (a.path / "adapter_model.safetensors").read_bytes() == b"weights"
    # sha256 is `sha256sum`'s listing of the files, hashed.
    lines = "".join(f"{hashlib.sha256((a.path / f).read_bytes()).hexdigest()}  {f}\n" for f in a.files)
    assert a.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    meta = json.loads((a.path / "meta.json").read_text())
    assert (meta["tenant"], meta["name"], meta["version"], meta["sha256"]) == ("acme", "sql-lora", 1, a.sha256)
    assert [f["name"] for f in meta["files"]] == list(a.files)
    assert s.get("acme", "sql-lora") == a
    assert s.list("acme") == [a] and s.list_all() == [a]
    assert s.list("other") == []
    with pytest.raises(AdapterNotFound):
        s.get("other", "sql-lora")  # tenants never see each other's adapters
    s.delete("acme", "sql-lora")
    assert s.list_all() == []
    with pytest.raises(KeyError):  # AdapterNotFound is a KeyError
        s.get("acme", "sql-lora")
    with pytest.raises(AdapterNotFound, match="does not exist"):
        s.delete("acme", "sql-lora")


def test_versions_increment_and_never_repeat(tmp_path):
    s = LocalAdapterStore(tmp_path / "root")
    v1 = s.put("t", "a", upload(tmp_path, b"one"))
    v2 = s.put("t", "a", upload(tmp_path, b"two"))
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert s.get("t", "a").version == 2
    assert s.get("t", "a", version=1) == v1
    assert s.list("t") == [v2]  # the latest version of each name
    assert s.versions("t", "a") == [v1, v2]  # each a request may pin
    with pytest.raises(AdapterNotFound, match="version 3"):
        s.get("t", "a", version=3)
    s.delete("t", "a")
    assert not (tmp_path / "root" / "t").exists()
    with pytest.raises(AdapterNotFound):
        s.versions("t", "a")
    # A re-upload after delete must not reuse version 2: caches keyed by (name, version)
    # would serve the old adapter's KV blocks.
    assert s.put("t", "a", upload(tmp_path, b"three")).version == 3
    assert LocalAdapterStore(tmp_path / "root").put("t", "a", upload(tmp_path)).version == 4


def test_survives_restart_and_cleans_crash_leftovers(tmp_path):
    root = tmp_path / "root"
    s = LocalAdapterStore(root)
    a = s.put("t1", "a", upload(tmp_path))
    b = s.put("t2", "b", upload(tmp_path, b"b"))
    (root / ".tmp" / "put-crashed").mkdir()  # a put that died before its rename
    (root / ".tmp" / "put-crashed" / "adapter_model.safetensors").write_bytes(b"half")
    (root / ".trash" / "deleted").mkdir()
    (root / ".tmp" / "put-in-progress").mkdir()  # another engine's upload on a shared root
    old = time.time() - store_mod.LEFTOVER_AGE_S - 10
    for leftover in (root / ".tmp" / "put-crashed", root / ".trash" / "deleted"):
        os.utime(leftover, (old, old))
    s2 = LocalAdapterStore(root)
    assert s2.list_all() == [a, b]
    assert s2.get("t2", "b") == b
    assert [p.name for p in (root / ".tmp").iterdir()] == ["put-in-progress"]
    assert list((root / ".trash").iterdir()) == []


@pytest.mark.parametrize("where", ["copy", "rename"])
def test_failed_put_leaves_nothing_behind(tmp_path, monkeypatch, where):
    root = tmp_path / "root"
    s = LocalAdapterStore(root)
    s.put("t", "existing", upload(tmp_path))
    before = snapshot(root)
    if where == "copy":
        real = store_mod._copy_file

        def copy_then_fail(fd, dst):  # the config is copied, then the disk fills up
            if dst.name == "adapter_model.safetensors":
                raise OSError(28, "No space left on device")
            return real(fd, dst)
        monkeypatch.setattr(store_mod, "_copy_file", copy_then_fail)
    else:
        def fail(*args):
            raise OSError(5, "I/O error")
        monkeypatch.setattr(os, "rename", fail)
    for tenant, name in [("t", "existing"), ("t", "new"), ("new-tenant", "x")]:
        with pytest.raises(OSError):
            s.put(tenant, name, upload(tmp_path))
        assert snapshot(root) == before
    monkeypatch.undo()
    assert s.put("t", "existing", upload(tmp_path)).version == 2


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", ".hidden", "-x", "a..b", "x" * 65, "a b", "é", None, 3])
def test_invalid_names_rejected(tmp_path, bad):
    s = LocalAdapterStore(tmp_path / "root")
    for call in (lambda: s.put(bad, "a", upload(tmp_path)), lambda: s.put("t", bad, upload(tmp_path)),
                 lambda: s.get("t", bad), lambda: s.delete(bad, "a"), lambda: s.list(bad)):
        with pytest.raises(AdapterError) as e:
            call()
        assert e.value.code == "invalid_name"
    assert snapshot(tmp_path / "root") == {".seq": None, ".tmp": None, ".trash": None}


def test_only_regular_files_are_copied_and_links_not_followed(tmp_path):
    src = upload(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("server private key")
    (src / "link.txt").symlink_to(secret)
    (src / "adapter_model.bin").symlink_to(src / "adapter_model.safetensors")
    (src / "subdir").mkdir()
    (src / "subdir" / "inner.txt").write_text("x")
    os.mkfifo(src / "pipe")
    a = LocalAdapterStore(tmp_path / "root").put("t", "a", src)
    assert a.files == ("adapter_config.json", "adapter_model.safetensors")
    assert sorted(p.name for p in a.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]


def test_reserved_and_empty_uploads(tmp_path):
    s = LocalAdapterStore(tmp_path / "root", max_total_bytes=100)
    src = upload(tmp_path)
    (src / "meta.json").write_text("{}")
    with pytest.raises(AdapterError, match="meta.json") as e:
        s.put("t", "a", src)
    assert e.value.code == "invalid_name"
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError) as e:
        s.put("t", "a", tmp_path / "empty")
    assert e.value.code == "missing_file"
    with pytest.raises(AdapterError) as e:
        s.put("t", "a", upload(tmp_path, b"x" * 200, name="big"))
    assert e.value.code == "too_large"
    assert s.list_all() == [] and list((tmp_path / "root" / ".tmp").iterdir()) == []


def test_concurrent_puts_get_distinct_versions(tmp_path):
    s = LocalAdapterStore(tmp_path / "root")
    srcs = [upload(tmp_path, bytes([i]) * 1000, name=f"src{i}") for i in range(8)]
    results, errors = [], []

    def put(src):
        try:
            results.append(s.put("t", "a", src).version)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=put, args=(src,)) for src in srcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(results) == list(range(1, 9))
    assert len({s.get("t", "a", v).sha256 for v in range(1, 9)}) == 8


def _put_from_process(root: str, src: str, start, reuse_same: bool, results) -> None:
    start.wait()
    try:
        results.put(LocalAdapterStore(root).put("t", "a", src, reuse_same=reuse_same).version)
    except Exception as e:  # surfaced by the asserts in the test
        results.put(repr(e))


def _race(tmp_path: Path, srcs: list[Path], reuse_same: bool) -> list:
    """Each src put by its own process (a fleet's engines on one volume), all at once."""
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(len(srcs)), ctx.Queue()
    procs = [ctx.Process(target=_put_from_process, args=(str(tmp_path / "root"), str(src), start, reuse_same, results))
             for src in srcs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return sorted((results.get(timeout=5) for _ in procs), key=str)


def test_processes_sharing_a_root_get_distinct_versions(tmp_path):
    LocalAdapterStore(tmp_path / "root")
    srcs = [upload(tmp_path, bytes([i]) * 100_000, name=f"src{i}") for i in range(6)]
    assert _race(tmp_path, srcs, reuse_same=False) == list(range(1, 7))
    s = LocalAdapterStore(tmp_path / "root")
    assert len({s.get("t", "a", v).sha256 for v in range(1, 7)}) == 6


def test_reuse_same_stores_identical_files_once_across_processes(tmp_path):
    """Engines starting together with the same --lora-modules store the adapter once."""
    LocalAdapterStore(tmp_path / "root")
    srcs = [upload(tmp_path, b"same" * 25_000, name=f"src{i}") for i in range(6)]
    assert _race(tmp_path, srcs, reuse_same=True) == [1] * 6
    s = LocalAdapterStore(tmp_path / "root")
    assert [a.version for a in s.list("t")] == [1] and list((tmp_path / "root" / ".tmp").iterdir()) == []
    # Other bytes are a new version; the same bytes again are not, nor without reuse_same are they kept.
    assert s.put("t", "a", upload(tmp_path, b"other", name="other"), reuse_same=True).version == 2
    assert s.put("t", "a", srcs[0], reuse_same=True).version == 3
    assert s.put("t", "a", srcs[0], reuse_same=True).version == 3
    assert s.put("t", "a", srcs[0]).version == 4
