"""Predicted outputs (SamplingParams.prediction, OpenAI's `prediction`): the prediction's
tokens are verified as proposals, so the output is what it is without one, in fewer steps
when the prediction is close, whether or not the engine speculates."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams
from loragate.engine.errors import InvalidRequestError
from loragate.engine.own_proposals import SEARCH_DISTANCE, predicted_continuation
from loragate.engine.request import Request

from .test_model_vs_hf import random_prompts
from .test_speculative import _joint_reference, assert_first_two_tokens_follow

GREEDY = dict(max_tokens=60, temperature=0, ignore_eos=True)


def generate(llm: LLM, prompt, **params):
    """The output and how many engine steps it took."""
    engine = llm.engine
    req = engine.add_request(prompt, SamplingParams(**GREEDY | params))
    steps = 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
    return req, steps


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", progress=False)


def test_a_prediction_changes_the_steps_not_the_output(llm):
    prompt = random_prompts([30], 500, seed=4)[0]
    plain, plain_steps = generate(llm, prompt)
    expected = plain.output_token_ids
    exact, exact_steps = generate(llm, prompt, prediction=expected)
    assert exact.output_token_ids == expected
    assert exact.num_accepted_prediction_tokens >= 50 and exact_steps <= plain_steps // 4
    # An edit: two tokens changed, three dropped, two inserted. Proposals fail at each and
    # the copy goes on past it.
    edited = expected[:10] + [7, 8] + expected[12:25] + expected[28:40] + [9, 9] + expected[40:]
    near, near_steps = generate(llm, prompt, prediction=edited)
    assert near.output_token_ids == expected
    assert near.num_accepted_prediction_tokens >= 40 and near_steps < plain_steps // 2
    unrelated, _ = generate(llm, prompt, prediction=random_prompts([60], 500, seed=99)[0])
    assert unrelated.output_token_ids == expected
    opted_out, opted_out_steps = generate(llm, prompt, prediction=expected, speculative=False)
    assert opted_out.output_token_ids == expected and opted_out_steps == plain_steps
    assert opted_out.num_accepted_prediction_tokens == 0


def test_text_predictions_and_bad_ones(llm):
    text = llm.engine.tokenizer.decode(random_prompts([40], 500, seed=5)[0])
    req = llm.engine.make_request("t5 t6 t7", SamplingParams(prediction=text))
    assert req.prediction_token_ids == llm.engine.tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="prediction token ids must be in"):
        llm.engine.make_request("t5 t6", SamplingParams(prediction=[10**6]))
    with pytest.raises(InvalidRequestError, match="prediction is 2049 tokens, longer than the context"):
        llm.engine.make_request("t5 t6", SamplingParams(prediction=[5] * 2049))
    for bad in ([1.5], {"type": "content"}, [-1]):
        with pytest.raises(InvalidRequestError, match="prediction must be text or a list of token ids"):
            SamplingParams(prediction=bad)


def test_the_cursor_follows_the_output_through_an_edit():
    req = Request("r", [1], SamplingParams())
    req.prediction_token_ids = list(range(10, 40))
    req.output_token_ids = [10]
    assert predicted_continuation(req, 3) == [11, 12, 13] and req.prediction_cursor == 1
    req.output_token_ids = [10, 11, 12, 99]  # 13 became 99: nothing matches there
    assert predicted_continuation(req, 3) == []
    req.output_token_ids += [14]  # a replaced token: the next one is where it should be
    assert predicted_continuation(req, 3) == [15, 16, 17] and req.prediction_cursor == 5
    req.output_token_ids += [15, 18]  # 16 and 17 dropped: one token cannot tell where it is
    assert predicted_continuation(req, 3) == []
    req.output_token_ids += [19]  # two can
    assert predicted_continuation(req, 3) == [20, 21, 22] and req.prediction_cursor == 10
    req.output_token_ids += [7, 7, 35]  # 35 is in the prediction, but not where the output is
    assert predicted_continuation(req, 3) == []


def _scan_reference(prediction, output, expected_end):
    """The cursor's search by brute force: for n = 4, 3, 2, 1, the end of the output's last n
    tokens in the prediction nearest `expected_end` within SEARCH_DISTANCE[n] (the earlier on a tie)."""
    for n, distance in SEARCH_DISTANCE.items():
        if len(output) < n:
            continue
        ends = [e for e in range(n, len(prediction) + 1)
                if prediction[e - n:e] == output[-n:] and abs(e - expected_end) <= distance]
        if ends:
            return min(ends, key=lambda e: (abs(e - expected_end), e))
    return None


def test_the_cursors_indexed_search_finds_what_a_scan_finds():
    rng = random.Random(11)
    for trial in range(300):
        prediction = [rng.randrange(6) for _ in range(rng.randrange(1, 400))]  # 6 ids: many repeats
        req = Request("r", [1], SamplingParams())
        req.prediction_token_ids = prediction
        req.prediction_cursor, req.prediction_synced_at = rng.randrange(len(prediction) + 1), 0
        req.output_token_ids = [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
        expected_end = req.prediction_cursor + len(req.output_token_ids)
        end = _scan_reference(prediction, req.output_token_ids, expected_end)
        got = predicted_continuation(req, 5)
        assert got == ([] if end is None else prediction[end:end + 5]), trial
        if end is not None:
            assert req.prediction_cursor == end


def test_predictions_beside_a_speculator(tiny_llama):
    """With n-gram speculation on, a request the speculator proposes nothing for still
    verifies its prediction."""
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, speculative="ngram")
    prompt = random_prompts([30], 500, seed=4)[0]
    plain = llm.generate([prompt], SamplingParams(**GREEDY))[0].token_ids
    with_prediction, _ = generate(llm, prompt, prediction=plain)
    assert with_prediction.output_token_ids == plain and with_prediction.num_accepted_prediction_tokens > 0


def test_sampled_tokens_follow_the_models_distribution_with_a_prediction(tiny_llama):
    """Chi-square of the first two sampled tokens over 2000 seeds against the model's exact
    joint distribution: the second is verified against the prediction whenever the first
    matched it, so the acceptance rule's accepts and its residual draws are both exercised."""
    top_k, n = 4, 2000
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    prompt = random_prompts([9], 500, seed=6)[0]
    joint = _joint_reference(hf, prompt, top_k)
    first, second = max(joint, key=joint.get)
    llm = LLM(str(tiny_llama), dtype="float32", progress=False)
    outs = llm.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, seed=s, ignore_eos=True,
                                                      prediction=[first, second, second]) for s in range(n)])
    assert_first_two_tokens_follow(joint, outs)
    accepted = sum(o.num_accepted_prediction_tokens for o in outs)
    proposed = sum(o.num_prediction_tokens for o in outs)
    assert 100 < accepted < proposed, (accepted, proposed)
