"""Hot adapters get more than one engine: decayed per-key shares (gateway/key_shares.py) and
the replica pool's use of them."""

from __future__ import annotations

from collections import Counter

from loragate.gateway import key_shares
from loragate.gateway.key_shares import KeyShares
from loragate.gateway.rendezvous import preference_order
from loragate.gateway.replicas import ReplicaPool

REPLICAS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_engine_per_key_until_the_shares_mean_something():
    shares = KeyShares(clock=Clock())
    assert [shares.engines_for("hot", 4) for _ in range(key_shares.MIN_REQUESTS - 1)] == [1] * (key_shares.MIN_REQUESTS - 1)
    assert shares.engines_for("hot", 4) == 4  # all of the traffic so far: every engine
    assert shares.engines_for("hot", 1) == 1


def test_engines_grow_with_the_share():
    shares = KeyShares(clock=Clock())
    for i in range(400):  # hot 50%, warm 12.5%, 30 cold keys share the rest
        shares.record("hot" if i % 2 == 0 else "warm" if i % 8 == 1 else f"cold{i % 30}")
    assert shares.engines_for("hot", 4) == 4  # 0.5 * 4 / 0.5 = 4 fair shares
    assert shares.engines_for("warm", 4) == 2  # 0.125 * 4 / 0.5 = 1: one more than one
    assert shares.engines_for("cold3", 4) == 1
    assert shares.engines_for("hot", 2) == 2  # never more engines than there are


def test_a_key_that_cools_down_goes_back_to_one_engine():
    clock = Clock()
    shares = KeyShares(half_life_s=10, clock=clock)
    for _ in range(100):
        shares.record("hot")
    assert shares.engines_for("hot", 2) == 2
    for i in range(400):  # 60 s of other traffic: the hot key's weight halves six times
        clock.now += 0.15
        shares.record(f"other{i % 40}")
    assert shares.record("hot") < 0.05
    assert shares.engines_for("hot", 2) == 1


def test_weights_rebase_instead_of_overflowing_and_keys_are_bounded():
    clock = Clock()
    shares = KeyShares(half_life_s=1, clock=clock)
    shares.record("a")
    clock.now = 10_000.0  # exp(10_000 * ln 2) would overflow a float
    assert 0.99 < shares.record("b") <= 1.0
    for i in range(key_shares.MAX_KEYS + 1):
        shares.record(f"k{i}")
    assert len(shares._weight) <= key_shares.MAX_KEYS


def _pool(max_load=1000):
    pool = ReplicaPool(policy="affinity", max_load=max_load)
    pool.update(REPLICAS)
    for r in pool.all():
        pool.admit(r)
    return pool


def test_hot_key_spreads_over_its_first_engines_cold_keys_stay_on_one():
    pool = _pool()
    landed: dict[str, Counter] = {}
    open_leases = []
    for i in range(600):  # the hot key half of all requests; requests stay open (in flight)
        key = "t/hot" if i % 2 == 0 else f"t/cold{i % 20}"
        choice = pool.choose(key)
        assert not choice.is_spill
        pool.acquire(choice.replica)
        open_leases.append(choice.replica)
        landed.setdefault(key, Counter())[choice.replica.url] += 1
    for key, where in landed.items():
        if key != "t/hot":
            assert set(where) == {preference_order(key, REPLICAS)[0]}, key
    hot = landed["t/hot"]
    assert len(hot) >= 2  # it took more than one engine ...
    assert set(hot) <= set(preference_order("t/hot", REPLICAS)[:len(hot)])  # ... in its own order
    for replica in open_leases:
        pool.release(replica)


def test_hot_key_goes_to_the_least_loaded_of_its_engines_and_spills_past_the_bound():
    pool = _pool(max_load=3)
    for i in range(200):  # make "t/hot" hot (nothing stays open)
        pool.choose("t/hot" if i % 2 else f"t/c{i}")
    order = preference_order("t/hot", REPLICAS)
    by_url = {r.url: r for r in pool.all()}
    pool.acquire(by_url[order[0]])
    choice = pool.choose("t/hot")
    assert choice.replica.url == order[1] and not choice.is_spill
    k = pool.shares.engines_for("t/hot", len(REPLICAS))
    for url in order[:k]:
        while by_url[url].in_flight < 3:
            pool.acquire(by_url[url])
    if k < len(REPLICAS):
        spilled = pool.choose("t/hot")
        assert spilled.is_spill and spilled.replica.url == order[k]
