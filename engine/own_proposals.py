"""Proposals the engine makes itself, verified in the next step like a speculator's (so the
output is what it would be without them, only sooner): tokens a request's grammar forces
(jump-forward decoding), and the continuation of its predicted output (OpenAI's
`prediction`, for answers expected to be much like a given text: a file with an edit).

A prediction is followed with a cursor: the place in it after the output's last matched
token. Where the output went on since, in step with the prediction, its last token should be
at the cursor plus what it added since. Its last few tokens (4 down to 2) are looked for
nearest that place, within a bounded distance either way, so an insertion or a deletion
realigns the copy; a single token counts only exactly there (a replaced token), since one
token matches too easily elsewhere. Outputs that leave the prediction get no proposals.
The prediction's n-grams are indexed once (ngram_ends), so a search costs a look-up.
"""

from __future__ import annotations

from bisect import bisect_left

from .batch import MAX_SHORT_QUERY
from .errors import InvalidRequestError
from .request import Request

MAX_FORCED_TOKENS = 8  # grammar-forced tokens verified per request and step
# Predicted tokens verified per request and step: with the newest token, a short query, which
# the decode kernels take (bitwise as decoding them one by one); longer ones are prefill
# chunks, whose other rounding could flip a near-tie and change a greedy answer.
MAX_PREDICTED_TOKENS = MAX_SHORT_QUERY - 1
# How far from where the output's last n tokens would be they are looked for, by n.
SEARCH_DISTANCE = {4: 256, 3: 64, 2: 16, 1: 0}


def prediction_token_ids(prediction: str | list[int] | None, tokenizer, vocab: int,
                         max_model_len: int) -> list[int] | None:
    """SamplingParams.prediction as token ids (text without special tokens), checked."""
    if not prediction:
        return None
    ids = tokenizer.encode(prediction, add_special_tokens=False) if isinstance(prediction, str) else prediction
    if any(t >= vocab for t in ids):
        raise InvalidRequestError(f"prediction token ids must be in [0, {vocab})", "prediction")
    if len(ids) > max_model_len:
        raise InvalidRequestError(f"prediction is {len(ids)} tokens, longer than the context ({max_model_len})",
                                  "prediction")
    return ids or None


def propose_own_tokens(running: list[Request], max_model_len: int) -> tuple[set[str], set[str]]:
    """Proposals for each decoding request the speculator left alone (never past max_tokens
    or the context; not for requests that opt out of speculation): its grammar's forced
    tokens, else its prediction's next ones (within its grammar). Returns the ids of the
    requests given each kind."""
    forced, predicted = set(), set()
    for req in running:
        if req.grammar is None and not req.prediction_token_ids:  # most requests: nothing of the engine's
            continue
        if req.spec_token_ids or not req.sampling_params.speculative or req.num_computed_tokens != req.num_tokens - 1:
            continue
        room = min(req.sampling_params.max_tokens - len(req.output_token_ids) - 1, max_model_len - req.num_tokens)
        if room <= 0:
            continue
        tokens, kind = [], forced
        if req.grammar is not None:
            tokens = req.grammar.forced_tokens(min(MAX_FORCED_TOKENS, room))
        if not tokens and req.prediction_token_ids:
            tokens, kind = predicted_continuation(req, min(MAX_PREDICTED_TOKENS, room)), predicted
            if req.grammar is not None:
                tokens = tokens[:req.grammar.valid_prefix(tokens)]
        if tokens:
            req.spec_token_ids, req.spec_draft_probs = tokens, None
            kind.add(req.request_id)
    return forced, predicted


def ngram_ends(prediction: list[int]) -> dict[tuple[int, ...], list[int]]:
    """Where each of the prediction's 2-, 3- and 4-grams ends, ascending: the cursor's search
    is then a look-up, not a scan, every step that the output is off the prediction."""
    index: dict[tuple[int, ...], list[int]] = {}
    for n in SEARCH_DISTANCE:
        if n > 1:
            for end in range(n, len(prediction) + 1):
                index.setdefault(tuple(prediction[end - n:end]), []).append(end)
    return index


def _nearest(ends: list[int], target: int) -> int:
    """The entry of the ascending `ends` nearest `target` (the earlier one on a tie)."""
    i = bisect_left(ends, target)
    if i == len(ends) or (i > 0 and target - ends[i - 1] <= ends[i] - target):
        return ends[i - 1]
    return ends[i]


def predicted_continuation(req: Request, k: int) -> list[int]:
    """Up to k tokens of the prediction after where the output's last tokens match (the
    cursor moves there); [] when they match nowhere near."""
    prediction, output = req.prediction_token_ids, req.output_token_ids
    if req.prediction_ngram_ends is None:
        req.prediction_ngram_ends = ngram_ends(prediction)
    expected_end = req.prediction_cursor + len(output) - req.prediction_synced_at
    for n, distance in SEARCH_DISTANCE.items():
        if len(output) < n:
            continue
        if n == 1:
            end = expected_end if 1 <= expected_end <= len(prediction) and prediction[expected_end - 1] == output[-1] else None
        else:
            ends = req.prediction_ngram_ends.get(tuple(output[-n:]))
            end = _nearest(ends, expected_end) if ends else None
        if end is not None and abs(end - expected_end) <= distance:
            req.prediction_cursor, req.prediction_synced_at = end, len(output)
            return prediction[end:end + k]
    return []
