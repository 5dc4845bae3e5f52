"""Structured output on the real SmolLM2: outputs valid against their JSON schema (greedy and
sampled, in one batch with free-text requests), lossless under speculative decoding, the
per-row masks of a verification step, and refusals."""

from __future__ import annotations

import json

import jsonschema
import pytest

from loragate.engine import LLM, InvalidRequestError, SamplingParams
from loragate.engine.structured_output import GrammarCompiler, grammar_from_json_schema, grammar_from_regex

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "artist", "farmer"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "skills"],
    "additionalProperties": False,
}
QUESTIONS = ["Describe a fictional person as JSON.", "Invent a character for a story and give their details.",
             "Who is your favourite scientist?"]


@pytest.fixture(scope="module")
def llm(real_model_dir):
    return LLM(str(real_model_dir), dtype="float32", progress=False)


def chat_prompts(llm):
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for q in QUESTIONS]


def test_outputs_follow_their_json_schema_in_a_mixed_batch(llm):
    grammar = grammar_from_json_schema(SCHEMA)
    prompts = chat_prompts(llm)
    params = [SamplingParams(max_tokens=120, temperature=0, grammar=grammar),
              SamplingParams(max_tokens=120, temperature=1.0, seed=3, grammar=grammar),
              SamplingParams(max_tokens=120, temperature=0, grammar=grammar_from_json_schema(None)),
              SamplingParams(max_tokens=40, temperature=0)]
    outs = llm.generate(prompts + [prompts[0]], params)
    for out in outs[:2]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert isinstance(json.loads(outs[2].text), dict) and outs[2].finish_reason == "stop"
    with pytest.raises(json.JSONDecodeError):  # unconstrained, the model answers in prose
        json.loads(outs[3].text)


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_structured_output_is_lossless_under_speculation(real_model_dir, llm, mode):
    spec = LLM(str(real_model_dir), dtype="float32", progress=False, speculative=mode,
               **({"draft_model": str(real_model_dir)} if mode == "draft" else {}))
    controller = spec.engine.speculator.controller
    controller.plan = lambda reqs, limits, batch_size: [min(lim, controller.max_k) for lim in limits]
    grammar = grammar_from_json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=100, temperature=0, grammar=grammar)] * 2 + \
             [SamplingParams(max_tokens=100, temperature=0, grammar=grammar_from_json_schema(None))]
    prompts = chat_prompts(llm)
    want = [o.token_ids for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    stats = spec.engine.speculator.stats
    assert stats.mean_accepted_length > 1  # proposals were verified and some taken
    if mode == "ngram":  # where the lookup finds nothing, the grammar's forced tokens are proposed
        assert spec.engine.num_forced_accepted > 0


def test_a_draft_model_drafts_within_the_grammar(real_model_dir, llm):
    """Unconstrained, SmolLM2 answers these prompts in prose; drafting under the mask, its
    proposals (greedy and sampled, whose q is then zero outside the mask) are all tokens the
    format accepts, and the matcher is back where it was afterwards."""
    import torch

    spec = LLM(str(real_model_dir), dtype="float32", progress=False, speculative="draft",
               draft_model=str(real_model_dir))
    engine, proposer = spec.engine, spec.engine.speculator.proposer
    grammar = grammar_from_json_schema(SCHEMA)
    prompts = chat_prompts(llm)
    reqs = [engine.make_request(p, SamplingParams(max_tokens=100, temperature=t, seed=1, grammar=grammar))
            for p, t in zip(prompts, (0.0, 1.0, 0.0))]
    reqs[2].grammar = None  # the same prompt without a format: the draft's own guess
    for r in reqs:
        r.num_computed_tokens = r.num_tokens - 1  # as if decoding: the draft catches up the prompt
    before = [r.grammar.allowed() for r in reqs[:2]]
    proposals = proposer.propose(reqs, [6, 6, 6])
    for r, proposal, mask in zip(reqs[:2], proposals, before):
        assert len(proposal.token_ids) == 6
        assert r.grammar.valid_prefix(proposal.token_ids) == 6, llm.tokenizer.decode(proposal.token_ids)
        assert torch.equal(r.grammar.allowed(), mask)  # drafts rolled back
    q = proposals[1].probs
    assert q is not None and float(q[0][~before[1]].sum()) == 0.0 and abs(float(q[0].sum()) - 1) < 1e-5
    free = proposals[2].token_ids
    assert engine.grammars.constraint(grammar).valid_prefix(free) < len(free)  # unconstrained: prose


def test_sampled_structured_output_under_draft_speculation_has_the_targets_distribution(real_model_dir, llm):
    """Chi-square of the first two tokens of 1000 seeded samples (temperature 1) constrained to
    six letters a or b: the second token is verified against a draft that drafts under the
    grammar (int4, so it sometimes differs). The reference is exact: HF's logits, masked by
    the grammar after the first token, multiplied out."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = LLM(str(real_model_dir), dtype="float32", progress=False, speculative="draft",
               draft_model=str(real_model_dir))
    controller = spec.engine.speculator.controller
    controller.plan = lambda reqs, limits, batch_size: [min(lim, controller.max_k) for lim in limits]
    grammar = grammar_from_regex("[ab]{6}")
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Type six letters, each a or b."}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    hf = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32)
    vocab = llm.engine.model.config.vocab_size

    def masked_probs(tokens):
        constraint = llm.engine.grammars.constraint(grammar)
        for t in tokens[len(prompt):]:
            assert constraint.matcher.consume_token(t)
        with torch.no_grad():
            logits = hf(torch.tensor([tokens])).logits[0, -1, :vocab]
        return logits.masked_fill(~constraint.allowed(), float("-inf")).softmax(-1)

    p1 = masked_probs(prompt)
    joint = {(t1, t2): float(p1[t1] * p) for t1 in p1.nonzero().flatten().tolist() if p1[t1] > 1e-6
             for t2, p in enumerate(masked_probs(prompt + [t1]).tolist()) if p > 0}
    n = 1000
    outs = spec.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, seed=s, grammar=grammar)
                                        for s in range(n)])
    counts: dict = {}
    for o in outs:
        key = tuple(o.token_ids[:2])
        assert key in joint, f"{llm.tokenizer.decode(list(key))!r} has probability 0 under the grammar and target"
        counts[key] = counts.get(key, 0) + 1
    big = {k: p for k, p in joint.items() if n * p >= 5}  # the rest pooled, so every cell expects >= 5
    rest_p, rest_n = 1 - sum(big.values()), n - sum(counts.get(k, 0) for k in big)
    stat = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in big.items())
    stat += (rest_n - n * rest_p) ** 2 / (n * rest_p)
    df = len(big)  # cells minus one, the pooled cell included
    limit = df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3  # p = 0.001 (Wilson-Hilferty)
    # measured: 12.4 over 11 degrees of freedom (limit 31.4); drawing q from the unmasked draft
    # logits (the token from the masked ones) gives 46.8
    assert df >= 10 and stat < limit, (stat, df)
    stats = spec.engine.speculator.stats
    assert stats.num_proposed >= n and 0 < stats.num_accepted < stats.num_proposed  # proposals were also rejected


def test_proposals_are_cut_before_the_first_token_the_format_refuses(llm):
    import torch

    from loragate.engine.spec.proposer import Proposal
    from loragate.engine.spec.speculator import Speculator

    tok = llm.tokenizer
    good = tok.encode('{"name": "Ada"', add_special_tokens=False)
    bad = tok.encode(" hello", add_special_tokens=False)

    class Fixed:  # proposes the same tokens, with made-up draft distributions, for every request
        cost_per_token, wants_hidden_states = 0.1, False

        def propose(self, requests, num_tokens, hidden_states=None):
            ids = good[:2] + bad + good[2:4]
            return [Proposal(ids, torch.full((len(ids), 4), 0.25)) for _ in requests]

        def forget(self, keep):
            pass

    speculator = Speculator(Fixed(), 8, 2048)
    speculator.controller.plan = lambda reqs, limits, batch_size: [6] * len(reqs)
    prompt = chat_prompts(llm)[0]
    structured = llm.engine.make_request(prompt, SamplingParams(max_tokens=50, grammar=grammar_from_json_schema(SCHEMA)))
    free = llm.engine.make_request(prompt, SamplingParams(max_tokens=50))
    for r in (structured, free):
        r.num_computed_tokens = r.num_tokens - 1
    speculator.propose([structured, free])
    assert structured.spec_token_ids == good[:2] and structured.spec_draft_probs.shape == (2, 4)
    assert len(free.spec_token_ids) == len(good[:2] + bad + good[2:4])  # no format: nothing to cut


def test_verification_rows_get_the_mask_after_the_proposals_before_them(llm):
    import torch

    from loragate.kernels.sampling import bitmask_to_bool

    compiler = llm.engine.grammars
    tok = llm.tokenizer
    grammar = grammar_from_json_schema(SCHEMA)
    good = tok.encode('{"name": "Ada", "age"', add_special_tokens=False)
    proposals = good[:3] + [tok.encode("hello", add_special_tokens=False)[0]] + good[3:5]
    constraint = compiler.constraint(grammar)
    rows = bitmask_to_bool(constraint.bitmasks(proposals), llm.engine.model.config.vocab_size)
    reference = compiler.constraint(grammar)
    for j in range(4):  # the rows up to the refused proposal (index 3), which row 3 verifies
        assert torch.equal(rows[j], reference.allowed()), j
        if j < 3:
            assert reference.matcher.consume_token(proposals[j])
    assert reference.matcher.validate_tokens(proposals[3:4]) == 0
    for j in range(4, 7):  # after it: never used, row 3's mask kept
        assert torch.equal(rows[j], rows[3]), j
    assert torch.equal(constraint.allowed(), compiler.constraint(grammar).allowed())  # rolled back


def test_bad_formats_are_refused(llm, tiny_llama):
    from transformers import AutoTokenizer

    with pytest.raises(InvalidRequestError, match="format is invalid") as e:
        llm.engine.make_request([1, 2], SamplingParams(grammar=grammar_from_json_schema({"type": "nonsense"})))
    assert e.value.param == "response_format"
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=8, min_tokens=2, grammar=grammar_from_json_schema(None))
    word_level = GrammarCompiler(AutoTokenizer.from_pretrained(tiny_llama), 512, {2})
    for _ in range(2):  # the verdict is kept, not recomputed per request
        with pytest.raises(InvalidRequestError, match="not available for this model's tokenizer"):
            word_level.constraint(grammar_from_json_schema(None))


def test_forced_tokens_are_verified_in_one_step_without_changing_the_output(llm):
    """Jump-forward: where the schema leaves no choice (keys, quotes, separators) the tokens
    are proposed and verified together; greedy output is token for token the same."""
    grammar = grammar_from_json_schema(SCHEMA)
    prompts = chat_prompts(llm)

    def run(speculative):
        engine, steps = llm.engine, 0
        before = engine.num_forced_accepted
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=120, temperature=0, grammar=grammar, speculative=speculative))
        outs = {}
        while engine.has_unfinished:
            steps += 1
            outs.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return list(outs.values()), steps, engine.num_forced_accepted - before

    plain, plain_steps, none_forced = run(False)
    jumped, jumped_steps, forced = run(True)
    assert sorted(jumped) == sorted(plain) and none_forced == 0
    assert forced >= 10 and jumped_steps <= plain_steps - 10  # measured: 52 forced, 93 -> 75 steps
