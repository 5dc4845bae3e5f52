"""JSON text of large answers (2,048 embeddings are 25 MB of it) written item by item.

json.dumps is C code that keeps the GIL for the whole call: one call over 2,048 vectors held
it for 0.6 s, and every stream on the event loop waited that long even when the call ran in a
worker thread. Between many small calls the loop gets its turn."""

from __future__ import annotations

import json


def compact(value) -> str:
    """As Starlette's JSONResponse renders (NaN is an error, not invalid JSON)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def in_pieces(answer: dict) -> str:
    """compact(answer), its "data" list one item at a time (the key comes last)."""
    if not isinstance(answer.get("data"), list):
        return compact(answer)
    head = compact({k: v for k, v in answer.items() if k != "data"})
    return f'{head[:-1]}{"," if len(head) > 2 else ""}"data":[{",".join(map(compact, answer["data"]))}]}}'
