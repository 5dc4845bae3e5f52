"""Reasoning models in the engine (engine/reasoning.py): the markers, where an output starts,
and a structured output format that applies only after the reasoning section, checked on
tests/thinker.py's tiny model against transformers' greedy tokens, with and without
speculative decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from loragate.engine import LLM, SamplingParams
from loragate.engine.reasoning import (CLOSED, INSIDE, OPEN, GrammarAfterReasoning, reasoning_start,
                                       reasoning_token_count, think_markers)
from loragate.engine.structured_output import GrammarCompiler, grammar_from_lark

from .test_speculative import always_speculate
from ..thinker import END, START, THOUGHT_MESSAGES, greedy, thinker_tokenizer

ANSWER = 'start: "t7" "t8" "t9"'  # the format: exactly these three tokens


def prompt(tok, **template):
    return tok.apply_chat_template(THOUGHT_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False,
                                   **template)


def test_markers_are_found_where_they_decode_to_their_text(tiny_llama):
    from transformers import AutoTokenizer

    tok = thinker_tokenizer()
    markers = think_markers(tok)
    assert (markers.start, markers.end) == (START, END)
    assert think_markers(AutoTokenizer.from_pretrained(tiny_llama)) is None  # no such tokens
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})  # dropped from decoded text
    assert think_markers(tok) is None


def test_where_the_output_starts_follows_the_prompts_end():
    tok = thinker_tokenizer()
    markers = think_markers(tok)
    assert reasoning_start(prompt(tok), markers, tok) == OPEN
    assert reasoning_start(prompt(tok, open_section=True), markers, tok) == INSIDE
    assert reasoning_start(prompt(tok, enable_thinking=False), markers, tok) == CLOSED
    earlier_turn = [3, 10, 4, START, 7, END, 8, 3, 11, 5]  # a section in the history, then a new question
    assert reasoning_start(earlier_turn, markers, tok) == OPEN
    assert reasoning_token_count([START, 7, 8, END, 9], OPEN, markers) == 4
    assert reasoning_token_count([7, 8, END, 9], INSIDE, markers) == 3
    assert reasoning_token_count([7, START, END], OPEN, markers) == 0
    assert reasoning_token_count([START, 7, 8], OPEN, markers) == 3  # cut while reasoning
    assert reasoning_token_count([START, END], CLOSED, markers) == 0


def test_verification_rows_match_the_masks_of_emitting_the_proposals_one_by_one():
    tok = thinker_tokenizer()
    markers = think_markers(tok)
    compiler = GrammarCompiler(tok, 512, {2})
    new = lambda: GrammarAfterReasoning(compiler.constraint(grammar_from_lark(ANSWER)), markers, OPEN)  # noqa: E731
    for proposals in ([START, 20, 21, END, 7, 8], [7, 8, 9], [START, 30, END], [START, END, 7, 20, 9], [20, 7]):
        wrapped, stepped = new(), new()
        rows = wrapped.bitmasks(proposals)
        valid = 0
        for j in range(len(proposals) + 1):
            want = stepped.bitmasks([])[0]
            if j <= wrapped.valid_prefix(proposals):
                assert torch.equal(rows[j], want), (proposals, j)
            if j < len(proposals):
                allowed = bool(want[proposals[j] >> 5] >> (proposals[j] & 31) & 1)
                valid += allowed and valid == j
                if not allowed:
                    break
                stepped.advance(proposals[j])
        assert wrapped.valid_prefix(proposals) == valid, proposals
    first = new().bitmasks([])[0]  # an open start: the format's first token, or <think>
    assert [t for t in (START, END, 7, 8) if first[t >> 5] >> (t & 31) & 1] == [START, 7]


@pytest.fixture(scope="module")
def hf_answer(tiny_thinker):
    path, close = tiny_thinker
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return greedy(model, prompt(thinker_tokenizer()), 16), close


@pytest.mark.parametrize("speculative", ["off", "ngram", "draft"])
def test_the_format_applies_after_the_reasoning(tiny_thinker, hf_answer, speculative):
    path, _ = tiny_thinker
    answer, close = hf_answer
    draft = dict(draft_model=str(path), draft_quantization="none") if speculative == "draft" else {}
    llm = LLM(str(path), dtype="float32", progress=False, speculative=speculative, **draft)
    if speculative != "off":
        always_speculate(llm)
    tok = llm.tokenizer
    params = SamplingParams(max_tokens=24, temperature=0, grammar=grammar_from_lark(ANSWER), reasoning=True)
    outs = llm.generate([prompt(tok), prompt(tok, open_section=True), prompt(tok, enable_thinking=False),
                         prompt(tok)], [params, params, params, SamplingParams(**{**params.__dict__, "reasoning": False})])
    thought = answer[:close + 1]  # <think> ... </think>, as transformers chose them
    assert outs[0].token_ids == thought + [7, 8, 9] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == thought[1:] + [7, 8, 9]  # the prompt opened the section
    assert outs[2].token_ids == [7, 8, 9]  # the prompt closed it: the format from the first token
    assert outs[3].token_ids == [7, 8, 9]  # reasoning off: the format from the first token
    if speculative == "draft":  # the draft is the target itself: it drafts reasoning freely, and every token holds
        stats = llm.engine.speculator.stats
        assert stats.num_proposed > 10 and stats.num_accepted == stats.num_proposed
    free = llm.generate([prompt(tok)], SamplingParams(max_tokens=16, temperature=0, reasoning=True))[0]
    assert free.token_ids == answer  # no format: the flag changes nothing
