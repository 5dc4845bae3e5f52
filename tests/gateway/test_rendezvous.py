"""Rendezvous hashing with a load bound, the replica pool's choices, and engine discovery
(with a fake resolver)."""

from __future__ import annotations

import socket
from collections import Counter

import pytest

from loragate.engine.errors import ModelConfigError
from loragate.gateway.discovery import EngineDiscovery, address_url, parse_dns_target, parse_engine_urls
from loragate.gateway.rendezvous import choose_bounded, preference_order
from loragate.gateway.replicas import ReplicaPool

REPLICAS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]
KEYS = [f"tenant{t}/adapter{a}" for t in range(10) for a in range(200)]


def test_order_is_stable_and_independent_of_list_order():
    for key in KEYS[:50]:
        order = preference_order(key, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)
        assert preference_order(key, list(reversed(REPLICAS))) == order
        assert preference_order(key, REPLICAS) == order


def test_keys_spread_evenly():
    first = Counter(preference_order(k, REPLICAS)[0] for k in KEYS)
    assert set(first) == set(REPLICAS)
    for count in first.values():  # 2000 keys over 4: 500 expected; 400..600 is > 4 sigma
        assert 400 <= count <= 600, first


def test_removing_a_replica_moves_only_its_keys_and_spreads_them():
    gone = REPLICAS[1]
    rest = [r for r in REPLICAS if r != gone]
    moved = Counter()
    for key in KEYS:
        before = preference_order(key, REPLICAS)[0]
        after = preference_order(key, rest)[0]
        if before != gone:
            assert after == before, key  # untouched keys stay put
        else:
            assert after == preference_order(key, REPLICAS)[1]  # to its own second choice
            moved[after] += 1
    assert set(moved) == set(rest)
    assert min(moved.values()) > sum(moved.values()) / 3 * 0.6, moved


def test_adding_a_replica_takes_only_keys_it_now_wins():
    new = "http://10.0.0.9:8000"
    taken = 0
    for key in KEYS:
        before = preference_order(key, REPLICAS)[0]
        after = preference_order(key, REPLICAS + [new])[0]
        assert after in (before, new)
        taken += after == new
    assert 300 <= taken <= 500  # about a fifth of 2000


def test_choose_bounded_prefers_order_then_least_loaded():
    order = ["a", "b", "c"]
    load = {"a": 0, "b": 0, "c": 0}
    assert choose_bounded(order, load.get, 2) == "a"
    load["a"] = 2  # at the bound: spill to the next under it
    assert choose_bounded(order, load.get, 2) == "b"
    load.update(b=5, c=3)  # everyone at or over: least loaded
    assert choose_bounded(order, load.get, 2) == "a"
    load.update(a=3)  # a tie: preference order decides
    assert choose_bounded(order, load.get, 2) == "a"
    with pytest.raises(ValueError):
        choose_bounded([], load.get, 2)


def _pool(policy="affinity", max_load=2, healthy=REPLICAS):
    pool = ReplicaPool(policy=policy, max_load=max_load)
    pool.update(REPLICAS)
    for r in pool.all():
        if r.url in healthy:
            pool.admit(r)
    return pool


def test_pool_affinity_spill_and_exclusion():
    pool = _pool()
    key = "t/a"
    order = preference_order(key, REPLICAS)
    first = pool.choose(key)
    assert first.replica.url == order[0] and not first.is_spill
    pool.acquire(first.replica)
    pool.acquire(first.replica)
    spilled = pool.choose(key)
    assert spilled.replica.url == order[1] and spilled.is_spill
    pool.release(first.replica)
    assert pool.choose(key).replica.url == order[0]
    # A retry excludes the engine tried; it goes to the key's next choice, not counted a spill.
    retry = pool.choose(key, exclude={order[0]})
    assert retry.replica.url == order[1] and not retry.is_spill


def test_pool_skips_unhealthy_and_answers_none_when_empty():
    key = "t/a"
    order = preference_order(key, REPLICAS)
    pool = _pool(healthy=[u for u in REPLICAS if u != order[0]])
    assert pool.choose(key).replica.url == order[1]
    pool.eject(pool.choose(key).replica, "test")
    assert pool.choose(key).replica.url == order[2]
    empty = _pool(healthy=[])
    assert empty.choose(key) is None and empty.first_healthy() is None


def test_pool_round_robin_cycles_over_healthy():
    pool = _pool(policy="round_robin")
    picks = [pool.choose("same-key").replica.url for _ in range(8)]
    assert picks == sorted(REPLICAS) * 2


def test_pool_update_adds_out_of_rotation_and_drops():
    pool = _pool()
    added = pool.update(REPLICAS[1:] + ["http://new:1"])
    assert [r.url for r in added] == ["http://new:1"] and not added[0].is_healthy
    assert [r.url for r in pool.all()] == sorted(REPLICAS[1:] + ["http://new:1"])
    assert pool.first_healthy().url == min(REPLICAS[1:])


def test_parse_engine_urls_and_dns_target():
    assert parse_engine_urls(" http://a:8000/, https://b ,http://a:8000,") == ["http://a:8000", "https://b"]
    assert parse_engine_urls(None) == []
    for bad in ["a:8000", "ftp://a", "http://", "http://a:8000/v1", "http://a:99999"]:
        with pytest.raises(ModelConfigError, match="engine_urls"):
            parse_engine_urls(bad)
    assert parse_dns_target("engines.ns.svc:8000") == ("engines.ns.svc", 8000)
    assert parse_dns_target("") is None
    for bad in ["engines", "engines:", ":80", "engines:http", "engines:0"]:
        with pytest.raises(ModelConfigError, match="engine_dns"):
            parse_dns_target(bad)


def test_address_url_brackets_ipv6():
    assert address_url("10.0.0.1", 8000) == "http://10.0.0.1:8000"
    assert address_url("fd00::1", 8000) == "http://[fd00::1]:8000"


class FakeResolver:
    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, host, port):
        self.calls.append((host, port))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_discovery_follows_dns_and_keeps_last_answer_on_failure():
    resolver = FakeResolver([["10.0.0.2", "10.0.0.1"], ["10.0.0.1", "10.0.0.3", "fd00::7"],
                             socket.gaierror(-2, "Name or service not known"), ["10.0.0.3"]])
    discovery = EngineDiscovery(["http://static:9000"], ("engines", 8000), resolver)
    assert discovery.discover() == ["http://static:9000", "http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    second = discovery.discover()  # .2 went away, .3 and an IPv6 engine came
    assert second == ["http://static:9000", "http://10.0.0.1:8000", "http://10.0.0.3:8000", "http://[fd00::7]:8000"]
    assert discovery.discover() == second  # a failed lookup keeps the fleet
    assert discovery.discover() == ["http://static:9000", "http://10.0.0.3:8000"]
    assert resolver.calls == [("engines", 8000)] * 4

    pool = ReplicaPool()
    pool.update(second)
    added = pool.update(["http://static:9000", "http://10.0.0.3:8000"])
    assert added == [] and [r.url for r in pool.all()] == ["http://10.0.0.3:8000", "http://static:9000"]


def test_discovery_static_only_never_resolves():
    discovery = EngineDiscovery(["http://a:1"], None, FakeResolver([]))
    assert discovery.discover() == ["http://a:1"]


def test_real_resolver_resolves_localhost():
    from loragate.gateway.discovery import resolve_addresses

    assert "127.0.0.1" in resolve_addresses("localhost", 80) or "::1" in resolve_addresses("localhost", 80)
