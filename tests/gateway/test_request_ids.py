"""X-Request-Id (gateway/request_ids.py): every answer carries one, the caller's own when
usable, else a new one; errors and streams too."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.parametrize("sent, kept", [("trace-42/abc", True), (None, False), ("x" * 129, False),
                                        ("has space", False), ("", False)])
def test_answers_carry_the_callers_request_id_or_a_new_one(server, sent, kept):
    headers = {**server.headers(), **({"X-Request-Id": sent} if sent is not None else {})}
    body = {"model": "tiny", "prompt": "t5", "max_tokens": 2}
    answers = [httpx.post(server.url + "/v1/completions", headers=headers, json=body),
               httpx.post(server.url + "/v1/completions", headers=headers, json={**body, "stream": True}),
               httpx.post(server.url + "/v1/completions", headers={**headers, "Authorization": "Bearer no"}, json=body),
               httpx.get(server.url + "/healthz", headers=headers)]
    assert [r.status_code for r in answers] == [200, 200, 401, 200]
    for r in answers:
        assert len(r.headers.get_list("x-request-id")) == 1
        got = r.headers["x-request-id"]
        assert got == sent if kept else re.fullmatch(r"[0-9a-f]{32}", got)
    if not kept:  # a new one for each request
        assert len({r.headers["x-request-id"] for r in answers}) == len(answers)
