"""What the router reads from an inference request to choose its engine: the affinity key
(tenant-scoped adapter identity, gateway/rendezvous.py) and the prompt's chain hashes
(gateway/prefix_index.py)."""

from __future__ import annotations

import hashlib
import json

from .prefix_index import chain_hashes, prompt_pieces, response_hashes


def affinity_key(authorization: str | None, model: str) -> str:
    """Tenant-scoped adapter identity. 'base:adapter' and 'adapter' name the same adapter
    (adapter names cannot contain ':'), so both forms share a key. A shared adapter,
    '<tenant>/<name>' (adapter names cannot contain '/'), is one adapter whoever asks for it."""
    model = model.rpartition(":")[2]
    if "/" in model:
        return f"shared:{model}"
    tenant = hashlib.sha256((authorization or "").encode()).hexdigest()[:16]
    return f"{tenant}/{model}"


def routing_inputs(body: bytes, authorization: str | None, prefixes: bool = True) -> tuple[str, list[bytes]]:
    """The body's affinity key (its `model` '' when there is none: the engine validates and
    answers 400) and, with `prefixes`, its prompt's chain hashes (prefix_index.py)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        data = None
    data = data if isinstance(data, dict) else {}
    model = data.get("model")
    key = affinity_key(authorization, model if isinstance(model, str) else "")
    previous = data.get("previous_response_id")
    if not prefixes:
        return key, []
    if isinstance(previous, str) and previous:
        return key, response_hashes(key, previous)
    return key, chain_hashes(key, prompt_pieces(data))
