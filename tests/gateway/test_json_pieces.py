"""Large answers written item by item read back as the same JSON as one json.dumps call."""

from __future__ import annotations

import json
import math

import pytest

from loragate.gateway.json_pieces import compact, in_pieces


@pytest.mark.parametrize("answer", [
    {"object": "list", "model": "m", "data": [{"index": i, "embedding": [i / 3, -1.5e-7]} for i in range(5)],
     "usage": {"prompt_tokens": 3}},
    {"data": []},
    {"data": ["é", {"k": None}]},
    {"results": [{"index": 0, "relevance_score": 0.5}], "usage": {}},  # no data: one call
    {"data": "not a list"},
])
def test_pieces_read_back_as_the_answer(answer):
    text = in_pieces(answer)
    assert json.loads(text) == answer
    assert len(text) == len(compact(answer))  # as compact: no spaces, no escaped non-ASCII


def test_nan_is_refused_as_in_one_call():
    with pytest.raises(ValueError):
        in_pieces({"data": [{"embedding": [math.nan]}]})
