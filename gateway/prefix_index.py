"""Which engine last ran each prompt start, so the router can send a conversation's next turn
where its earlier turns are in the prefix cache (cache-aware routing, as SGLang's router
does with a radix tree per engine).

A prompt is read as text pieces in order (a chat's messages, a completion's prompt, a
response's instructions and input items), cut into chunks of CHUNK_CHARS, and hashed as a
chain: the hash of chunk i covers the tenant's adapter key and every chunk up to i, so equal
hashes mean equal prompt starts. A conversation's next request repeats the previous one's
messages and appends the answer and a new question: its chain starts with the previous
request's, whose engine the index remembers. Only the latest engine per chain hash is kept,
least recently used ones leave beyond MAX_ENTRIES.

A Responses API request that goes on from a stored response (previous_response_id) sends
only its new input; its chain is the previous response's id, which the router recorded for
the engine that answered it."""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict

CHUNK_CHARS = 256  # about 64 tokens of English: finer than a KV block or two
MAX_ENTRIES = 1 << 17  # about 20 MiB of router memory
# A match counts from this many chunks (enough prefill saved to be worth a less even load),
# or from half the prompt's chunks in a shorter prompt.
MIN_MATCH_CHUNKS = 2


def prompt_pieces(body: dict) -> list[str]:
    """The text a request's prompt is made of, in order ([]: nothing to go by)."""
    pieces = []
    for name in ("instructions", "system", "messages", "input", "prompt"):
        value = body.get(name)
        if isinstance(value, str):
            pieces.append(value)
        elif isinstance(value, list):
            # one message or item per piece; json.dumps is stable for the same message
            pieces += [v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in value]
    return pieces


def response_hashes(key: str, response_id: str) -> list[bytes]:
    """The chain of a Responses API conversation that goes on from `response_id`
    (previous_response_id): the engine that produced that response holds its prefix."""
    return chain_hashes(key, ["response:" + response_id[:CHUNK_CHARS - 9]])


def response_id_of(body: bytes) -> str | None:
    """The id in a response object (POST /v1/responses' answer), or in a response.created
    event's data (its stream's first event)."""
    text = body.split(b"data: ", 1)[1] if body.startswith(b"event: ") else body
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    data = data.get("response", data) if isinstance(data, dict) else None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def chain_hashes(key: str, pieces: list[str]) -> list[bytes]:
    h = hashlib.blake2b(key.encode(), digest_size=16)
    out = []
    for piece in pieces:
        for at in range(0, len(piece), CHUNK_CHARS):
            h.update(piece[at:at + CHUNK_CHARS].encode())
            out.append(h.copy().digest())
        h.update(b"\0")  # a piece boundary: "ab" + "c" differs from "a" + "bc"
    return out


class PrefixIndex:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._engine: OrderedDict[bytes, str] = OrderedDict()

    def best(self, hashes: list[bytes], candidates: set[str]) -> str | None:
        """The candidate that last ran the longest start of this prompt, if that start is long
        enough to count (MIN_MATCH_CHUNKS)."""
        needed = min(MIN_MATCH_CHUNKS, math.ceil(len(hashes) / 2))
        for i in range(len(hashes) - 1, needed - 2, -1):  # i + 1 chunks match
            engine = self._engine.get(hashes[i])
            if engine in candidates:
                return engine
        return None

    def record(self, hashes: list[bytes], engine: str) -> None:
        for h in hashes:
            self._engine[h] = engine
            self._engine.move_to_end(h)
        while len(self._engine) > self.max_entries:
            self._engine.popitem(last=False)
