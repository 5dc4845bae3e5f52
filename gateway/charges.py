"""How an engine tells the router what a request cost, so that a router keeps a tenant's rate
limits for the whole fleet (gateway/router.py) rather than each engine for its own share.

The router asks by sending CHARGE_HEADER: 1. The engine then reports the tokens it takes from
the tenant's allowance (prompt and output, as rate_limits.py counts them) as they are taken:
those taken before the response starts in CHARGE_HEADER on the response, the rest of a stream
in SSE comment lines (`: loragate-charge N`) at the start of the event they precede. An SSE
client ignores comment lines, and the router strips them anyway. Reported as they happen, not
at the end, a stream the client abandons is still charged for what it produced."""

from __future__ import annotations

CHARGE_HEADER = "x-loragate-charge"
_COMMENT = b": loragate-charge "


def charge_comment(tokens: int) -> str:
    return f": loragate-charge {tokens}\n"


def split_charge(event: bytes) -> tuple[int, bytes]:
    """(tokens reported, the event without the report) for one SSE event."""
    if not event.startswith(_COMMENT):
        return 0, event
    line, _, rest = event.partition(b"\n")
    try:
        return int(line[len(_COMMENT):]), rest
    except ValueError:  # not ours after all: leave it as it came
        return 0, event
