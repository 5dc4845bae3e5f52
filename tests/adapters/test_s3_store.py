"""S3AdapterStore against a real S3-compatible HTTP server (moto_server in a subprocess): the
local store's semantics, atomic versions, the read-through cache, and the registry following
a store that another server writes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from peft import LoraConfig as PeftLoraConfig

from loragate.adapters import adapter_cache
from loragate.adapters.errors import AdapterError, AdapterNotFound
from loragate.adapters.registry import AdapterRegistry, AdapterState
from loragate.adapters.store import AdapterStore, LocalAdapterStore

from .test_store import upload  # the same upload directories as the local store's tests

pytest.importorskip("boto3", reason="the S3 store needs boto3: pip install 'loragate[s3]'")
pytest.importorskip("moto", reason="these tests need moto_server: pip install 'moto[s3,server]'")

from loragate.adapters.s3_client import StoreUnavailableError
from loragate.adapters import s3_claims
from loragate.adapters.s3_store import S3AdapterStore
from loragate.adapters.store_factory import make_adapter_store

PREFIX = "loragate/adapters"


@pytest.fixture
def bucket(moto_url):
    import boto3

    name = f"loragate-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def make(tmp_path, moto_url, bucket):
    """make(cache="c1") -> a new S3AdapterStore on the test's bucket: a new cache name is a
    new server (or a restart with an empty cache)."""
    def make(cache: str = "cache", **kwargs) -> S3AdapterStore:
        return S3AdapterStore(bucket, PREFIX, cache_dir=tmp_path / cache, endpoint_url=moto_url, **kwargs)
    return make


def keys(store: S3AdapterStore, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in store.s3.list(f"{PREFIX}/{prefix}"))


def count_calls(store: S3AdapterStore) -> list[str]:
    calls: list[str] = []
    store.s3.client.meta.events.register("before-call.s3", lambda **kw: calls.append(kw["event_name"].split(".")[-1]))
    return calls


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- the local store's semantics -------------------------------------------------------------

def test_put_get_list_delete(make, tmp_path):
    s = make()
    assert isinstance(s, AdapterStore)
    a = s.put("acme", "sql-lora", upload(tmp_path))
    assert (a.tenant, a.name, a.version) == ("acme", "sql-lora", 1)
    assert a.files == ("adapter_config.json", "adapter_model.safetensors")
    assert a.path == tmp_path / "cache" / "acme" / "sql-lora" / "v1"  # a local copy the loader can read
    assert (a.path / "adapter_model.safetensors").read_bytes() == b"weights"
    lines = "".join(f"{hashlib.sha256((a.path / f).read_bytes()).hexdigest()}  {f}\n" for f in a.files)
    assert a.sha256 == hashlib.sha256(lines.encode()).hexdigest()  # the local store's definition
    assert keys(s, "acme/") == [f"{PREFIX}/acme/sql-lora/v1/{f}"
                                for f in ("adapter_config.json", "adapter_model.safetensors", "meta.json")]
    meta = json.loads(s.s3.get_bytes(f"{PREFIX}/acme/sql-lora/v1/meta.json"))
    assert (meta["tenant"], meta["name"], meta["version"], meta["sha256"]) == ("acme", "sql-lora", 1, a.sha256)
    assert s.get("acme", "sql-lora") == a == s.describe("acme", "sql-lora")
    assert s.list("acme") == [a] and s.list_all() == [a] and s.list("other") == []
    with pytest.raises(AdapterNotFound):
        s.get("other", "sql-lora")  # tenants never see each other's adapters
    s.delete("acme", "sql-lora")
    assert s.list_all() == [] and keys(s, "acme/") == []
    with pytest.raises(KeyError):
        s.get("acme", "sql-lora")
    with pytest.raises(AdapterNotFound, match="does not exist"):
        s.get("acme", "sql-lora", version=1)  # not served from this server's cache either
    with pytest.raises(AdapterNotFound, match="does not exist"):
        s.delete("acme", "sql-lora")


def test_versions_grow_and_never_repeat_across_delete_and_restart(make, tmp_path):
    s = make()
    v1 = s.put("t", "a", upload(tmp_path, b"one"))
    v2 = s.put("t", "a", upload(tmp_path, b"two"))
    assert (v1.version, v2.version) == (1, 2) and v1.sha256 != v2.sha256
    assert s.get("t", "a").version == 2 and s.get("t", "a", version=1) == v1
    assert s.list("t") == [v2]
    assert [v.version for v in s.versions("t", "a")] == [1, 2]  # each a request may pin
    assert [v.sha256 for v in make("other-server").versions("t", "a")] == [v1.sha256, v2.sha256]
    with pytest.raises(AdapterNotFound, match="version 3"):
        s.get("t", "a", version=3)
    s.delete("t", "a")
    # Caches keyed by (name, version) would serve the old adapter's KV blocks if 2 came back.
    assert s.put("t", "a", upload(tmp_path, b"three")).version == 3
    assert make("other-server").put("t", "a", upload(tmp_path)).version == 4
    assert s.s3.get_bytes(f"{PREFIX}/.seq/t/a") == b"4"


def test_reuse_same_returns_the_latest_version_when_its_files_are_the_same(make, tmp_path):
    s, other = make(), make("other-server")
    v1 = s.put("t", "a", upload(tmp_path, b"one"))
    same = other.put("t", "a", upload(tmp_path, b"one"), reuse_same=True)  # stored by another server: not again
    assert (same.version, same.sha256) == (v1.version, v1.sha256)
    assert other.put("t", "a", upload(tmp_path, b"two"), reuse_same=True).version == 2
    assert s.put("t", "a", upload(tmp_path, b"one"), reuse_same=True).version == 3  # the latest is compared
    assert keys(s, "t/a/v4") == [] and len(list((tmp_path / "other-server").rglob("*.safetensors"))) == 1


def at_once(call, n: int) -> list:
    """call(0) .. call(n - 1) on n threads started together; their results, or the first error."""
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = call(i)
        except Exception as e:  # raised below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_servers_putting_the_same_files_at_once_store_one_version(make, tmp_path):
    """Engines starting together with one --lora-modules: one uploads, the others use its version."""
    servers = [make(f"server-{i}") for i in range(6)]
    srcs = [upload(tmp_path, b"same", name=f"src{i}") for i in range(6)]
    assert at_once(lambda i: servers[i].put("t", "a", srcs[i], reuse_same=True).version, 6) == [1] * 6
    assert keys(servers[0], ".claims") == [] and keys(servers[0], "t/a/v2") == []


def test_a_claim_is_waited_for_until_its_version_appears(make, tmp_path, monkeypatch):
    claimant, waiter = make("claimant"), make("waiter")
    digest = claimant.put("t", "probe", upload(tmp_path, b"same", name="probe")).sha256  # the files' digest
    claim = waiter._claim_key("t", "a", digest)
    assert claimant.s3.put(claim, str(time.time()).encode(), if_none_match=True)
    polls = []

    def publish_on_second_poll(seconds):
        polls.append(seconds)
        if len(polls) == 2:  # the claimant finishes while the waiter waits
            claimant.put("t", "a", upload(tmp_path, b"same", name="late"))
            claimant.s3.delete(claim)
    monkeypatch.setattr(s3_claims.time, "sleep", publish_on_second_poll)
    got = waiter.put("t", "a", upload(tmp_path, b"same", name="mine"), reuse_same=True)
    assert got.version == 1 and len(polls) == 2 and keys(waiter, "t/a/v2") == []


def test_a_stale_or_outlasting_claim_is_taken_over_and_a_failed_put_lets_go(make, tmp_path, monkeypatch):
    s = make()
    digest = s.put("t", "probe", upload(tmp_path, b"same", name="probe")).sha256
    claim = s._claim_key("t", "a", digest)
    s.s3.put(claim, str(time.time() - s3_claims.CLAIM_WAIT_S - 1).encode())  # its server died long ago
    monkeypatch.setattr(s3_claims.time, "sleep", lambda _: pytest.fail("a stale claim is not waited for"))
    assert s.put("t", "a", upload(tmp_path, b"same", name="one"), reuse_same=True).version == 1
    assert keys(s, ".claims") == []

    s.s3.put(s._claim_key("t", "b", digest), str(time.time()).encode())  # held, and never finished
    monkeypatch.setattr(s3_claims, "CLAIM_WAIT_S", 0.0)
    assert s.put("t", "b", upload(tmp_path, b"same", name="two"), reuse_same=True).version == 1
    assert keys(s, ".claims") == []

    def broken_upload(src, key):
        raise StoreUnavailableError("the bucket went away")
    monkeypatch.setattr(s.s3, "upload", broken_upload)
    with pytest.raises(StoreUnavailableError):
        s.put("t", "c", upload(tmp_path, b"same", name="three"), reuse_same=True)
    assert keys(s, ".claims") == [] and keys(s, "t/c") == []

    lookups = []

    def latest_then_fail(tenant, name, digest):  # the bucket goes away just after the claim is made
        lookups.append(name)
        if len(lookups) > 1:
            raise StoreUnavailableError("the bucket went away")
    monkeypatch.setattr(s, "_latest_if_same", latest_then_fail)
    with pytest.raises(StoreUnavailableError):
        s.put("t", "d", upload(tmp_path, b"same", name="four"), reuse_same=True)
    assert lookups == ["d", "d"] and keys(s, ".claims") == []


def test_concurrent_puts_from_two_servers_get_distinct_versions(make, tmp_path):
    servers = [make("server-a"), make("server-b")]
    srcs = [upload(tmp_path, bytes([i]) * 1000, name=f"src{i}") for i in range(8)]
    results = at_once(lambda i: (servers[i % 2].put("t", "a", srcs[i]).version, i), 8)
    assert sorted(v for v, _ in results) == list(range(1, 9))
    reader = make("reader")
    for version, i in results:  # each version holds the bytes of the put that got it
        got = reader.get("t", "a", version)
        assert (got.path / "adapter_model.safetensors").read_bytes() == bytes([i]) * 1000


@pytest.mark.parametrize("step", ["second_file", "meta_json"])
def test_failed_put_is_invisible_and_cleaned_up(make, tmp_path, monkeypatch, step):
    s = make()
    s.put("t", "existing", upload(tmp_path))
    before = keys(s)
    real_upload, real_put = s.s3.upload, s.s3.put

    def failing_upload(src, key):
        if key.endswith("adapter_model.safetensors"):  # the config went up, then the network broke
            raise StoreUnavailableError("S3 upload failed: connection reset")
        real_upload(src, key)

    def failing_put(key, body, **kw):
        if key.endswith("meta.json"):
            raise StoreUnavailableError("S3 put failed: 503 SlowDown")
        return real_put(key, body, **kw)
    if step == "second_file":
        monkeypatch.setattr(s.s3, "upload", failing_upload)
    else:
        monkeypatch.setattr(s.s3, "put", failing_put)
    for tenant, name in [("t", "existing"), ("t", "new")]:
        with pytest.raises(StoreUnavailableError):
            s.put(tenant, name, upload(tmp_path))
    monkeypatch.undo()
    after = [k for k in keys(s) if "/.seq/" not in k]  # burnt version numbers stay burnt
    assert after == [k for k in before if "/.seq/" not in k]
    assert [a.name for a in s.list_all()] == ["existing"] and s.get("t", "existing").version == 1
    assert tree(tmp_path / "cache" / ".tmp") == []
    assert s.put("t", "existing", upload(tmp_path)).version == 3  # 2 was burnt by the failed put


def test_crash_leftovers_are_invisible_and_swept(make, tmp_path):
    s = make()
    a = s.put("t", "a", upload(tmp_path))
    # A server died after uploading v2's weights, before its meta.json.
    s.s3.put(f"{PREFIX}/t/a/v2/adapter_model.safetensors", b"half")
    s.s3.put(f"{PREFIX}/t/b/v1/adapter_model.safetensors", b"half")
    assert s.get("t", "a").version == 1 and s.list_all() == [a]
    assert make("fresh").get("t", "a").version == 1  # a server with an empty cache too
    with pytest.raises(AdapterNotFound):
        s.get("t", "b")
    assert s.sweep_incomplete(older_than_s=3600) == 0  # might still be uploading
    assert s.sweep_incomplete(older_than_s=0) == 2
    assert keys(s, "t/") == [f"{PREFIX}/t/a/v1/{f}" for f in ("adapter_config.json", "adapter_model.safetensors",
                                                               "meta.json")]


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", ".hidden", "-x", "x" * 65, "a b", None, 3])
def test_invalid_names_rejected(make, tmp_path, bad):
    s = make()
    for call in (lambda: s.put(bad, "a", upload(tmp_path)), lambda: s.put("t", bad, upload(tmp_path)),
                 lambda: s.get("t", bad), lambda: s.describe(bad, "a"), lambda: s.delete(bad, "a"),
                 lambda: s.list(bad)):
        with pytest.raises(AdapterError) as e:
            call()
        assert e.value.code == "invalid_name"
    with pytest.raises(AdapterError, match="positive integer"):
        s.get("t", "a", version="1")
    assert keys(s) == []


def test_only_regular_files_and_limits(make, tmp_path):
    src = upload(tmp_path)
    (tmp_path / "secret.txt").write_text("server private key")
    (src / "link.txt").symlink_to(tmp_path / "secret.txt")
    (src / "subdir").mkdir()
    os.mkfifo(src / "pipe")
    s = make(max_total_bytes=100)
    assert s.put("t", "a", src).files == ("adapter_config.json", "adapter_model.safetensors")
    (src / "meta.json").write_text("{}")
    with pytest.raises(AdapterError, match="meta.json") as e:
        s.put("t", "b", src)
    assert e.value.code == "invalid_name"
    (tmp_path / "empty").mkdir()
    for d, code in [(tmp_path / "empty", "missing_file"), (upload(tmp_path, b"x" * 200, "big"), "too_large")]:
        with pytest.raises(AdapterError) as e:
            s.put("t", "b", d)
        assert e.value.code == code
    assert [a.name for a in s.list_all()] == ["a"] and keys(s, "t/b/") == []


# -- the read-through cache ------------------------------------------------------------------

def test_cache_hit_needs_no_s3_and_a_cold_cache_downloads_again(make, tmp_path, moto_url, bucket):
    make("uploader").put("t", "a", upload(tmp_path, b"the weights"))
    b = make("server-b")
    calls = count_calls(b)
    first = b.get("t", "a")
    assert "GetObject" in calls and (first.path / "adapter_model.safetensors").read_bytes() == b"the weights"
    calls.clear()
    assert b.get("t", "a", version=1) == first and calls == []  # versions are immutable
    assert b.get("t", "a") == first and calls == ["ListObjectsV2"]  # "latest" asks only which version that is
    # The same cache behind an unreachable endpoint: a known version is still served.
    offline = S3AdapterStore(bucket, PREFIX, cache_dir=tmp_path / "server-b", endpoint_url="http://127.0.0.1:9")
    assert offline.get("t", "a", version=1).sha256 == first.sha256
    with pytest.raises(StoreUnavailableError, match="127.0.0.1:9"):
        offline.get("t", "a")
    restarted = make("server-b-restarted")  # empty cache: downloads again
    calls = count_calls(restarted)
    again = restarted.get("t", "a", version=1)
    assert calls.count("GetObject") == 3  # meta.json + two files
    assert again.sha256 == first.sha256 and again.path != first.path
    assert (again.path / "adapter_model.safetensors").read_bytes() == b"the weights"


def test_sha256_mismatch_on_download_is_refused(make, tmp_path):
    s = make("uploader")
    s.put("t", "a", upload(tmp_path, b"original"))
    s.s3.put(f"{PREFIX}/t/a/v1/adapter_model.safetensors", b"tampered")  # changed in the bucket
    b = make("server-b")
    with pytest.raises(AdapterError, match="sha256") as e:
        b.get("t", "a")
    assert e.value.code == "invalid_weights"
    assert tree(tmp_path / "server-b") == [".tmp", ".trash"]  # nothing published, nothing left over
    assert (s.get("t", "a").path / "adapter_model.safetensors").read_bytes() == b"original"  # s's own copy


def test_cache_is_bounded_least_recently_used_first(make, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_cache, "IN_USE_GRACE_S", 0.0)
    s = make(max_cache_bytes=3000)  # each version is ~1.4 KB: 1000 weight bytes, config, meta.json
    for name in ("a", "b"):
        s.put("t", name, upload(tmp_path, name.encode() * 1000, name))
    s.get("t", "a", 1)  # a is now more recent than b
    s.put("t", "c", upload(tmp_path, b"c" * 1000, "c"))
    assert sorted(p.name for p in (tmp_path / "cache" / "t").iterdir()) == ["a", "c"]
    assert s.cache.total_bytes <= 3000
    calls = count_calls(s)
    assert (s.get("t", "b", 1).path / "adapter_model.safetensors").read_bytes() == b"b" * 1000
    assert "GetObject" in calls  # evicted, so downloaded again
    # Restart: the use order is rebuilt from disk; a dead process's download is removed once it
    # is an hour old, a live one's (the root may be shared) is left alone.
    old, new = tmp_path / "cache" / ".tmp" / "get-dead", tmp_path / "cache" / ".tmp" / "get-running"
    for d in (old, new):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * adapter_cache.LEFTOVER_AGE_S,) * 2)
    restarted = S3AdapterStore(s.s3.bucket, PREFIX, cache_dir=tmp_path / "cache", endpoint_url=s.s3.endpoint_url)
    assert {k[1] for k in restarted.cache._entries} == {p.name for p in (tmp_path / "cache" / "t").iterdir()}
    assert not old.exists() and new.exists()


# -- start-up checks -------------------------------------------------------------------------

def test_start_up_probe_names_the_problem(tmp_path, moto_url, bucket, monkeypatch):
    def store(name=bucket, url=moto_url):
        return make_adapter_store("s3", tmp_path, s3_bucket=name, s3_endpoint_url=url)
    assert isinstance(store(), S3AdapterStore)
    with pytest.raises(StoreUnavailableError, match="bucket 'no-such-bucket' does not exist"):
        store("no-such-bucket")
    with pytest.raises(StoreUnavailableError, match="cannot reach s3://"):
        store(url="http://127.0.0.1:9")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreUnavailableError, match="no AWS credentials"):
        store()
    with pytest.raises(ValueError, match="needs a bucket"):
        make_adapter_store("s3", tmp_path)


# -- the registry follows a store that other servers write ------------------------------------

@pytest.fixture(params=["s3", "local"])
def two_servers(request, make, tmp_path, arch):
    """Two registries (two servers) over one store; changes through one reach the other."""
    def registry(cache):
        store = make(cache) if request.param == "s3" else LocalAdapterStore(tmp_path / "shared-root")
        return AdapterRegistry(store, arch, 8, refresh_interval=0.3)
    return registry("server-a"), registry("server-b")


def test_registry_sees_uploads_versions_and_deletes_made_elsewhere(two_servers, tmp_path, save_peft):
    a, b = two_servers
    events = []
    b.listeners.append(lambda info, id_: events.append((info and info.key, id_)))
    save_peft(tmp_path / "v1", PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    save_peft(tmp_path / "v2", PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=5)
    v1 = a.register("acme", "sql", tmp_path / "v1")
    assert b.get("acme", "sql") == v1  # unknown here: asked the store at once
    info, weights = b.weights("acme", "sql")
    assert info == v1 and weights.rank == 4
    assert events == [("acme/sql@1", "acme/sql")]
    v2 = a.register("acme", "sql", tmp_path / "v2")
    assert b.get("acme", "sql").version == 1  # within the refresh interval: the index answers
    time.sleep(0.35)
    assert b.weights("acme", "sql")[0] == v2 and b.list("acme") == [v2]
    assert events[-1] == ("acme/sql@2", "acme/sql")
    a.delete("acme", "sql")
    time.sleep(0.35)
    with pytest.raises(AdapterNotFound):
        b.weights("acme", "sql")
    assert b.list("acme") == [] and events[-1] == (None, "acme/sql")
    a.register("acme", "other", tmp_path / "v1")
    time.sleep(0.35)
    assert [i.name for i in b.list_all()] == ["other"]  # listing picks up what was never asked for
    with pytest.raises(AdapterNotFound):
        b.delete("acme", "sql")  # deleted elsewhere: 404, and forgotten here


def test_registry_indexes_s3_adapters_without_downloading_weights(make, tmp_path, arch, save_peft):
    save_peft(tmp_path / "v1", PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    AdapterRegistry(make("uploader"), arch, 8).register("acme", "sql", tmp_path / "v1")
    store = make("restarted")
    calls = count_calls(store)
    reg = AdapterRegistry(store, arch, 8)
    info = reg.get("acme", "sql")
    assert (info.rank, info.target_modules, info.state) == (4, ("q_proj",), AdapterState.READY)
    assert not (tmp_path / "restarted" / "acme").exists()  # only meta.json and the config were read
    assert calls.count("GetObject") == 2
    assert reg.weights("acme", "sql")[1].rank == 4 and (tmp_path / "restarted" / "acme" / "sql" / "v1").is_dir()
