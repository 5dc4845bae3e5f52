"""Reasoning models over HTTP (gateway/reasoning.py): the `<think>` section of a chat answer in
`reasoning` / `reasoning_content`, the rest in `content`, streamed or not, through the official
client, on tests/thinker.py's tiny model (transformers' greedy tokens are the oracle); the
Responses API's reasoning item; chat_template_kwargs; the text splitter on its own."""

from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from loragate.engine.errors import ModelConfigError
from loragate.engine.reasoning import CLOSED, INSIDE, OPEN, ThinkMarkers
from loragate.gateway.reasoning import ReasoningSplit, reasoning_markers, with_effort

from ..thinker import THOUGHT_MESSAGES, greedy, thinker_tokenizer
from .conftest import _module_server

MARKERS = ThinkMarkers(510, 511)


@pytest.mark.parametrize("start, text, reasoning, content", [
    (OPEN, "<think>\nStep one.\nStep two.\n</think>\n\nThe answer.", "Step one.\nStep two.", "The answer."),
    (OPEN, "  <think>x</think>", "x", ""),
    (OPEN, "Plain answer with <think> inside.", "", "Plain answer with <think> inside."),
    (OPEN, "<thi", "", "<thi"),  # cut before the marker was whole: not a section
    (OPEN, "<think> cut while thinking </th", "cut while thinking </th", ""),
    (INSIDE, "\nthinking </think> then </think> twice", "thinking", "then </think> twice"),
    (INSIDE, "no end  ", "no end", ""),
    (CLOSED, "\n\nall <think> answer</think>", "", "all <think> answer</think>"),
])
def test_streamed_pieces_add_up_to_the_whole_split(start, text, reasoning, content):
    whole = ReasoningSplit(MARKERS, start)
    whole.feed(text, finished=True)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(30):
        split, pieces, at = ReasoningSplit(MARKERS, start), [], 0
        while at < len(text):
            n = rng.randint(0, 4)
            pieces.append(split.feed(text[at:at + n]))
            at += n
        pieces.append(split.feed("", finished=True))
        assert ("".join(r for r, _ in pieces), "".join(c for _, c in pieces)) == (reasoning, content)


def test_the_parser_setting(tiny_llama, tiny_thinker):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_llama)
    assert reasoning_markers("auto", plain) is None
    with pytest.raises(ModelConfigError, match="<think>"):
        reasoning_markers("think", plain)
    tok = thinker_tokenizer()
    assert reasoning_markers("auto", tok) == reasoning_markers("think", tok) == MARKERS
    assert reasoning_markers("none", tok) is None
    tok.chat_template = "{{ messages[0]['content'] }}"  # the tokens exist, but the template never writes them
    assert reasoning_markers("auto", tok) is None and reasoning_markers("think", tok) == MARKERS


@pytest.fixture(scope="module")
def thinker_server(tiny_thinker, tmp_path_factory, monkeypatch_module):
    yield from _module_server(tiny_thinker[0], tmp_path_factory, monkeypatch_module)


@pytest.fixture(scope="module")
def expected(tiny_thinker):
    """transformers' greedy answer, split where the section closes: (reasoning, content, tokens)."""
    path, close = tiny_thinker
    tok = thinker_tokenizer()
    ids = tok.apply_chat_template(THOUGHT_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), ids, 12)
    return tok.decode(answer[1:close]).strip(), tok.decode(answer[close + 1:]).strip(), close + 1


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)


def test_chat_answers_carry_the_reasoning_apart(thinker_server, expected):
    reasoning, content, reasoning_tokens = expected
    assert reasoning and content
    c = client(thinker_server)
    for opened in (False, True):  # the model opens the section, or the prompt does (one token fewer to generate)
        got = c.chat.completions.create(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=12 - opened, temperature=0,
                                        extra_body={"chat_template_kwargs": {"open_section": opened}})
        message = got.choices[0].message
        assert (message.reasoning, message.reasoning_content, message.content) == (reasoning, reasoning, content)
        assert got.usage.completion_tokens_details.reasoning_tokens == reasoning_tokens - opened
    stream = c.chat.completions.create(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == reasoning
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == content
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    hidden = c.chat.completions.create(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=12, temperature=0,
                                       extra_body={"include_reasoning": False}).choices[0].message
    assert hidden.content == content and getattr(hidden, "reasoning", None) is None


def test_a_closed_section_leaves_all_to_content_and_a_format_applies_after_reasoning(thinker_server, expected):
    reasoning, _, _ = expected
    c = client(thinker_server)
    off = c.chat.completions.create(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=6, temperature=0,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.reasoning is None and off.choices[0].message.content
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    fmt = c.chat.completions.create(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=20, temperature=0,
                                    extra_body={"structured_outputs": {"grammar": 'start: "t7" "t8" "t9"'}})
    assert (fmt.choices[0].message.reasoning, fmt.choices[0].message.content) == (reasoning, "t7t8t9")
    cut = c.chat.completions.create(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=2, temperature=0)
    assert cut.choices[0].message.content is None and cut.choices[0].finish_reason == "length"


def test_responses_put_the_reasoning_in_its_own_item(thinker_server, expected):
    reasoning, content, reasoning_tokens = expected
    c = client(thinker_server)
    got = c.responses.create(model="tiny", input="t10 t11 t12", max_output_tokens=12, temperature=0)
    assert [item.type for item in got.output] == ["reasoning", "message"]
    assert got.output[0].content[0].text == reasoning and got.output_text == content
    assert got.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
    events = list(c.responses.create(model="tiny", input="t10 t11 t12", max_output_tokens=12, temperature=0,
                                     stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == reasoning
    done = events[-1].response
    assert [item.type for item in done.output] == ["reasoning", "message"] and done.output_text == content
    again = c.responses.create(model="tiny", input=[*got.output, {"role": "user", "content": "t13"}],
                               max_output_tokens=4, temperature=0)  # the reasoning item passed back is accepted
    assert again.status == "incomplete" or again.status == "completed"


def test_anthropic_messages_carry_thinking_blocks_and_thinking_can_be_switched_off(thinker_server, expected):
    """The Messages API: the reasoning as a thinking block before the text, streamed as
    thinking_delta events; `thinking: disabled` is Qwen3's enable_thinking false here."""
    import anthropic

    reasoning, content, _ = expected
    claude = anthropic.Anthropic(base_url=thinker_server.url, api_key="key-a", max_retries=0)
    asked = dict(model="tiny", max_tokens=12, messages=THOUGHT_MESSAGES, extra_body={"temperature": 0})
    for thinking in ({}, {"thinking": {"type": "enabled", "budget_tokens": 1024}}):
        got = claude.messages.create(**asked, **thinking)
        assert [(b.type, getattr(b, "thinking", None) or b.text) for b in got.content] == \
            [("thinking", reasoning), ("text", content)]
    with claude.messages.stream(**asked) as stream:
        events = list(stream)
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == reasoning
    assert [b.type for b in stream.get_final_message().content] == ["thinking", "text"]
    off = claude.messages.create(**asked, thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"] and off.content[0].text


@pytest.mark.parametrize("kwargs", ["yes", {"tools": []}, {"add_generation_prompt": False}, {"1x": 1}])
def test_bad_template_variables_are_refused(thinker_server, kwargs):
    r = httpx.post(thinker_server.url + "/v1/chat/completions", headers=thinker_server.headers(),
                   json={"model": "tiny", "messages": THOUGHT_MESSAGES, "chat_template_kwargs": kwargs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_reasoning_effort_none_switches_thinking_off_and_the_others_keep_it(thinker_server, expected):
    """OpenAI's reasoning_effort (chat) and reasoning.effort (Responses), on a template with
    Qwen3's switch; the effort also reaches the template as `reasoning_effort`."""
    reasoning, content, _ = expected
    c = client(thinker_server)
    asked = dict(model="tiny", messages=THOUGHT_MESSAGES, max_tokens=12, temperature=0)
    off = c.chat.completions.create(**asked, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    none = c.chat.completions.create(**asked, reasoning_effort="none")
    assert none.choices[0].message.reasoning is None
    assert none.choices[0].message.content == off.choices[0].message.content
    assert c.chat.completions.create(**asked, reasoning_effort="high").choices[0].message.reasoning == reasoning
    switched = c.chat.completions.create(**asked, reasoning_effort="none",  # the caller's own switch wins
                                         extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert switched.choices[0].message.reasoning == reasoning
    r = c.responses.create(model="tiny", input="t10 t11 t12", max_output_tokens=12, temperature=0,
                           reasoning={"effort": "none", "summary": "auto"})
    assert [item.type for item in r.output] == ["message"] and r.output_text == none.choices[0].message.content
    assert (r.reasoning.effort, r.reasoning.summary) == ("none", "auto")
    kept = c.responses.create(model="tiny", input="t10 t11 t12", max_output_tokens=12, temperature=0,
                              reasoning={"effort": "medium"})
    assert [item.type for item in kept.output] == ["reasoning", "message"] and kept.output_text == content
    assert with_effort({}, "low", "{{ reasoning_effort }}") == {"reasoning_effort": "low"}


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"reasoning_effort": "extreme"}, "reasoning_effort"),
    ("/v1/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/responses", {"reasoning": {"effort": "x"}}, "reasoning.effort"),
    ("/v1/responses", {"reasoning": "high"}, "reasoning"),
    ("/v1/responses", {"reasoning": {"summary": "long"}}, "reasoning.summary"),
])
def test_bad_reasoning_efforts_are_refused(thinker_server, path, extra, param):
    body = {"model": "tiny", "max_tokens": 2, **extra}
    body.update({"/v1/chat/completions": {"messages": THOUGHT_MESSAGES}, "/v1/completions": {"prompt": "t5"},
                 "/v1/responses": {"input": "t5", "max_output_tokens": 2}}[path])
    if path == "/v1/responses":
        del body["max_tokens"]
    r = httpx.post(thinker_server.url + path, headers=thinker_server.headers(), json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
