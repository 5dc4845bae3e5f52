"""Rendezvous (highest-random-weight) hashing with a load bound: which engine serves a key.

Every (key, replica) pair gets a pseudo-random weight; a key's replicas, heaviest first, are
its preference order. The order depends only on the key and the replica names, never on the
list's order or on other replicas, so when a replica leaves only the keys it was first for
move (each to its own next choice, which spreads them evenly), and a new replica takes only
the keys it now outweighs. One adapter's requests therefore keep landing where its weights
are already in a device slot.

Bounded load: the first replica in that order whose in-flight count is under the bound wins;
when all are at or over it, the least loaded does (ties: preference order)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence


def weight(key: str, replica: str) -> int:
    # blake2b, not hash(): stable across processes (PYTHONHASHSEED), so every router of a fleet
    # and every restart agree on the order.
    digest = hashlib.blake2b(key.encode() + b"\0" + replica.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preference_order(key: str, replicas: Sequence[str]) -> list[str]:
    """replicas sorted by descending weight for key (name breaks the impossible tie)."""
    return sorted(replicas, key=lambda r: (-weight(key, r), r))


def choose_bounded(order: Sequence[str], load_of: Callable[[str], int], max_load: int) -> str:
    """The first replica of `order` with load under max_load, else the least loaded one."""
    if not order:
        raise ValueError("no replicas to choose from")
    for replica in order:
        if load_of(replica) < max_load:
            return replica
    return min(order, key=load_of)  # min keeps the first of equals: preference order
