"""Cache-aware routing (gateway/prefix_index.py): a conversation's next turn goes to the
engine that ran its earlier turns, among its adapter's engines, within a load slack; in the
pool, and through the router app over fake engines."""

from __future__ import annotations

import json

from loragate.gateway.prefix_index import CHUNK_CHARS, PrefixIndex, chain_hashes, prompt_pieces, response_id_of
from loragate.gateway.routing_inputs import affinity_key, routing_inputs
from loragate.gateway.proxy import REPLICA_HEADER
from loragate.gateway.replicas import ReplicaPool

from .test_router_proxy import AUTH, E1, E2, FakeEngines, make_client, metric, preferred

SYSTEM = {"role": "system", "content": "You are terse. " * 30}


def turns(n: int, who: str) -> list[dict]:
    """A conversation's messages up to its n-th question."""
    messages = [SYSTEM]
    for i in range(n):
        messages.append({"role": "user", "content": f"{who} asks question {i}: " + "why? " * 100})
        if i < n - 1:
            messages.append({"role": "assistant", "content": f"answer {i} " * 30})
    return messages


def test_chain_hashes_share_exactly_the_common_start():
    first = chain_hashes("t/base", prompt_pieces({"messages": turns(1, "ann")}))
    second = chain_hashes("t/base", prompt_pieces({"messages": turns(2, "ann")}))
    assert len(second) > len(first) > 2 and second[:len(first)] == first
    assert chain_hashes("u/base", prompt_pieces({"messages": turns(1, "ann")}))[0] != first[0]  # another tenant
    assert chain_hashes("t/base", ["ab", "c"]) != chain_hashes("t/base", ["a", "bc"])
    assert len(chain_hashes("k", ["x" * (CHUNK_CHARS * 2 + 1)])) == 3
    assert prompt_pieces({"instructions": "be brief", "input": [{"role": "user", "content": "hi"}]})[0] == "be brief"
    assert prompt_pieces({"prompt": "hello"}) == ["hello"] and prompt_pieces({"prompt": [1, 2]}) == ["1", "2"]


def test_bodies_the_router_cannot_read_route_without_a_key_or_prompt():
    for body in (b"{not json", b"\xff", b"[1]", b'{"model": ' * 3000):  # the last nests past the parser's limit
        assert routing_inputs(body, AUTH["Authorization"]) == (affinity_key(AUTH["Authorization"], ""), [])
    assert response_id_of(b'{"id": ' * 3000) is None


def test_the_index_needs_two_chunks_or_half_the_prompt_and_forgets_the_oldest():
    index = PrefixIndex(max_entries=6)
    index.record([b"a", b"b", b"c"], "e1")
    assert index.best([b"a", b"b", b"x", b"y", b"z"], {"e1", "e2"}) == "e1"
    assert index.best([b"a", b"x", b"y", b"z"], {"e1", "e2"}) is None  # one chunk of four: not enough
    assert index.best([b"a", b"x"], {"e1", "e2"}) == "e1"  # ... of two: enough
    assert index.best([b"a", b"b", b"c"], {"e2"}) is None  # not a candidate
    index.record([b"p", b"q", b"r", b"s"], "e2")
    assert index.best([b"a"], {"e1"}) is None and index.best([b"c"], {"e1"}) == "e1"  # the oldest, a, left


def hot_pool(**kwargs) -> ReplicaPool:
    """Two engines and a key hot enough to get both (key_shares.py)."""
    pool = ReplicaPool(policy="affinity", max_load=8, **kwargs)
    for replica in pool.update([E1, E2]):
        pool.admit(replica)
    for _ in range(40):
        pool.shares.record("t/base")
    return pool


def test_a_conversation_follows_its_cached_start_within_the_load_slack():
    pool = hot_pool()
    assert pool.prefix_slack == 2
    ann = lambda n: chain_hashes("t/base", prompt_pieces({"messages": turns(n, "ann")}))  # noqa: E731
    first = pool.choose("t/base", prefix=ann(1))
    assert not first.for_prefix
    home = first.replica
    pool.acquire(home)
    pool.acquire(home)  # two more open there than on the other engine: still within the slack
    second = pool.choose("t/base", prefix=ann(2))
    assert second.replica is home and second.for_prefix
    bob = pool.choose("t/base", prefix=chain_hashes("t/base", prompt_pieces({"messages": turns(1, "bob")[1:]})))
    assert bob.replica is not home and not bob.for_prefix  # a new conversation (no system prompt): the least loaded
    pool.acquire(home)  # three more: past the slack, load wins, and the conversation moves
    third = pool.choose("t/base", prefix=ann(3))
    assert third.replica is not home and not third.for_prefix
    assert pool.choose("t/base", prefix=ann(4)).for_prefix  # ... and is followed there
    off = hot_pool(prefix_routing=False)
    off.choose("t/base", prefix=ann(1))
    assert not off.choose("t/base", prefix=ann(2)).for_prefix and off.prefixes is None


def test_the_router_sends_each_turn_where_the_conversation_ran(monkeypatch):
    monkeypatch.setattr("loragate.gateway.key_shares.MIN_REQUESTS", 0)  # the base model is hot at once
    engines = FakeEngines()
    with make_client(engines) as client:
        pool = client.app.state.router.pool
        replica = {r.url: r for r in pool.all()}
        for who, home, busy in (("ann", E1, E2), ("bob", E2, E1)):
            replica[busy].in_flight += 1  # the conversation starts on the less loaded engine
            r = client.post("/v1/chat/completions", json={"model": "base", "messages": turns(1, who)[1:]},
                            headers=AUTH)
            replica[busy].in_flight -= 1
            assert r.headers[REPLICA_HEADER] == home
            for turn in (2, 3):  # equal loads now: each later turn goes back to its conversation's engine
                r = client.post("/v1/chat/completions", json={"model": "base", "messages": turns(turn, who)[1:]},
                                headers=AUTH)
                assert r.status_code == 200 and r.headers[REPLICA_HEADER] == home
        assert metric(client, "loragate_router_prefix_routed_total") == 4


def test_a_responses_conversation_goes_back_to_the_engine_of_its_previous_response(monkeypatch):
    monkeypatch.setattr("loragate.gateway.key_shares.MIN_REQUESTS", 0)
    engines = FakeEngines()
    with make_client(engines) as client:
        replica = {r.url: r for r in client.app.state.router.pool.all()}
        busy, home = preferred("base")  # with equal loads the first would take every request
        for stream in (False, True):
            replica[busy].in_flight += 1  # the first turn lands on the other engine
            r = client.post("/v1/responses", json={"model": "base", "input": f"hi from {home}", "stream": stream},
                            headers=AUTH)
            replica[busy].in_flight -= 1
            assert r.headers[REPLICA_HEADER] == home
            first = r.json()["id"] if not stream else next(
                json.loads(line[6:])["response"]["id"] for line in r.text.splitlines()
                if line.startswith("data: ") and "response.created" in line)
            for _ in range(2):  # loads equal again: only the previous response decides
                r = client.post("/v1/responses", headers=AUTH,
                                json={"model": "base", "input": "and then?", "previous_response_id": first})
                assert r.headers[REPLICA_HEADER] == home
                first = r.json()["id"]
