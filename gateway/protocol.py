"""OpenAI request bodies -> engine inputs, engine outputs -> OpenAI response bodies.

Validation names the offending parameter (`param`), like OpenAI does, and refuses options
that would otherwise be silently ignored (best_of, audio output, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loragate.engine import BeamSearchParams, SamplingParams
from loragate.engine.errors import InvalidRequestError

from .beam_options import beam_search_options
from .output_format import output_grammar
from .reasoning import effort_of, template_kwargs
from .tool_calls import ToolPlan, parse_tool_plan, template_message

MAX_N = 16


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param)


def _get(body: dict, name: str, kind, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(f"'{name}' must be of type {kind.__name__}", name)
    return value


@dataclass
class GenerationRequest:
    model: str
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None = off
    max_tokens: int | None  # None: up to the context limit (chat's default)
    seed: int | None
    sampling: dict  # the other SamplingParams fields
    echo: bool = False  # completions: the prompt precedes the completion in text and logprobs
    prompt_texts: list[str] | None = None  # with echo: each prompt as sent, set when they are tokenised
    tools: ToolPlan | None = None  # chat: function calling
    suffix: str | None = None  # completions: the text after the gap to fill (engine/fill_in_middle.py)
    charge: object = None  # interactive requests: takes their tokens from the tenant's rate limit (TenantSlot.charge)
    template_kwargs: dict = field(default_factory=dict)  # chat: the template's arguments besides messages and tools
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: what the context allows)
    service_tier: str = "default"  # OpenAI's: "flex" runs at a less urgent priority
    include_reasoning: bool = True  # chat on a reasoning model: the answer carries its reasoning
    reasoning: tuple | None = None  # ... (ThinkMarkers, where the output starts), set once the prompt is built
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM's): counts so far on every chunk
    add_special_tokens: bool = True  # completions (vLLM's): the tokenizer's BOS and such around a text prompt
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids (RL rollouts train on them)
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"
    cache_salt: str = ""  # vLLM's: prefix-cache entries shared only by requests with the same salt
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and rank, and the top ones
    beam: dict | None = None  # vLLM's use_beam_search: length_penalty and early_stopping of n beams
    reasoning_effort: str | None = None  # chat: OpenAI's, for the template (gateway/reasoning.py with_effort)

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo: the engine generates one token, which is not returned."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, prompt_len: int, max_model_len: int) -> list[SamplingParams]:
        """One per choice. With a seed, choice i uses seed + i: reproducible, yet distinct."""
        max_tokens = 1 if self.prompt_only else self.max_tokens or max(1, max_model_len - prompt_len)
        return [SamplingParams(max_tokens=max_tokens, seed=None if self.seed is None else self.seed + i,
                               logprobs=self.logprobs, **self.sampling) for i in range(self.n)]

    def beam_params(self, prompt_len: int, max_model_len: int) -> BeamSearchParams:
        """With use_beam_search: the search's settings, n beams returning n choices."""
        return BeamSearchParams(beam_width=self.n, max_tokens=self.max_tokens or max(1, max_model_len - prompt_len),
                                ignore_eos=self.sampling["ignore_eos"], stop_token_ids=self.sampling["stop_token_ids"],
                                priority=self.sampling["priority"], logprobs=self.logprobs, **self.beam)


def parse_common(body: dict, *, chat: bool) -> GenerationRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: the base model's name or an adapter's name", "model")
    _refuse_unsupported(body, chat)
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_name, int, None if chat else 16)
    echo = not chat and _get(body, "echo", bool, False)
    suffix = None if chat else _get(body, "suffix", str, None) or None
    if suffix is not None and echo:
        raise _bad("'echo' cannot be combined with 'suffix'", "suffix")
    tools = parse_tool_plan(body) if chat else None
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise _bad(f"'n' must be between 1 and {MAX_N}", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if chat:
        logprobs = _get(body, "top_logprobs", int, 0) if _get(body, "logprobs", bool, False) else None
    else:
        logprobs = _get(body, "logprobs", int, None)
    stream = _get(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if options and not stream:  # as OpenAI and vLLM answer: it would silently do nothing
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    seed = _get(body, "seed", int, None)
    # top_k, min_p, ignore_eos, repetition_penalty, min_tokens, stop_token_ids, allowed_token_ids,
    # bad_words, include_stop_str_in_output, skip_special_tokens, priority and speculative (false: opt
    # out of speculative decoding) are extensions, as in vLLM: absent from OpenAI's API.
    sampling = dict(temperature=_get(body, "temperature", float, 1.0), top_p=_get(body, "top_p", float, 1.0),
                    stop=stop, top_k=_get(body, "top_k", int, 0), min_p=_get(body, "min_p", float, 0.0),
                    ignore_eos=_get(body, "ignore_eos", bool, False),
                    speculative=_get(body, "speculative", bool, True),
                    presence_penalty=_get(body, "presence_penalty", float, 0.0),
                    frequency_penalty=_get(body, "frequency_penalty", float, 0.0),
                    repetition_penalty=_get(body, "repetition_penalty", float, 1.0),
                    logit_bias=_logit_bias(body), min_tokens=_get(body, "min_tokens", int, 0),
                    stop_token_ids=_get(body, "stop_token_ids", list, []), grammar=output_grammar(body),
                    prediction=_prediction(body), allowed_token_ids=_get(body, "allowed_token_ids", list, None),
                    bad_words=_get(body, "bad_words", list, []),
                    include_stop_str_in_output=_get(body, "include_stop_str_in_output", bool, False),
                    skip_special_tokens=_get(body, "skip_special_tokens", bool, True),
                    priority=_get(body, "priority", int, 0))
    tier = _service_tier(body)
    if tier == "flex":  # OpenAI's slower, cheaper tier: behind requests of the default one
        sampling["priority"] = max(sampling["priority"], 1)
    call_grammar = tools.grammar() if tools is not None else None
    if call_grammar is not None:
        if sampling["grammar"] is not None:
            raise _bad("a forced tool call decides the output's format: drop 'response_format' or "
                       "'structured_outputs'", "tool_choice")
        sampling["grammar"] = call_grammar
    if not 0.0 <= sampling["temperature"] <= 2.0:
        raise _bad("'temperature' must be between 0 and 2", "temperature")
    if max_tokens is not None and max_tokens < (0 if echo else 1):
        raise _bad(f"'{max_name}' must be at least 1 (0 only with 'echo': the prompt alone)", max_name)
    # echo with logprobs scores the prompt too: each prompt token's logprob given the ones before it;
    # so does vLLM's prompt_logprobs (its own shape); the engine computes the larger top-k for both
    prompt_logprobs = _get(body, "prompt_logprobs", int, None)
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= 20:
        raise _bad("'prompt_logprobs' must be between 0 and 20", "prompt_logprobs")
    asked = [k for k in (logprobs if echo else None, prompt_logprobs) if k is not None]
    sampling["prompt_logprobs"] = max(asked) if asked else None
    # validates now, before any tokenising
    SamplingParams(max_tokens=max(1, sampling["min_tokens"]) if not max_tokens else max_tokens,
                   logprobs=logprobs, seed=seed, **sampling)
    beam = beam_search_options(body, sampling, echo or suffix is not None or prompt_logprobs is not None)
    return GenerationRequest(model, n, stream, bool(options.get("include_usage")), logprobs, max_tokens, seed, sampling,
                             echo, tools=tools, suffix=suffix, include_reasoning=_get(body, "include_reasoning", bool, True),
                             template_kwargs=template_options(body) if chat else {},
                             truncate_prompt_tokens=truncation(body), service_tier=tier,
                             continuous_usage=bool(options.get("continuous_usage_stats")),
                             add_special_tokens=_get(body, "add_special_tokens", bool, not chat),
                             return_token_ids=_get(body, "return_token_ids", bool, False),
                             tokens_as_ids=_get(body, "return_tokens_as_token_ids", bool, False),
                             cache_salt=_get(body, "cache_salt", str, ""), prompt_logprobs=prompt_logprobs,
                             beam=beam, reasoning_effort=effort_of(body.get("reasoning_effort"), "reasoning_effort"))


def _service_tier(body: dict) -> str:
    """The tier a request runs in: "flex" (less urgent) or "default" ("auto" and "priority"
    too: a request cannot make itself more urgent than its tenant; see --tenant-priorities)."""
    tier = body.get("service_tier")
    if tier not in (None, "auto", "default", "flex", "priority"):
        raise _bad("'service_tier' must be 'auto', 'default', 'flex' or 'priority'", "service_tier")
    return "flex" if tier == "flex" else "default"


def template_options(body: dict, generation_prompt: bool = True) -> dict:
    """The chat template's arguments beyond the messages and tools: vLLM's
    add_generation_prompt (default `generation_prompt`: embeddings' is false) and
    continue_final_message (the answer goes on from a final assistant message: a prefill),
    and chat_template_kwargs."""
    add = _get(body, "add_generation_prompt", bool, generation_prompt)
    go_on = _get(body, "continue_final_message", bool, False)
    if add and go_on:
        raise _bad("'continue_final_message' needs 'add_generation_prompt': false", "continue_final_message")
    messages = body.get("messages")
    if go_on and not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                      and messages[-1].get("role") == "assistant"):
        raise _bad("'continue_final_message' needs an assistant message last: the answer it goes on from",
                   "continue_final_message")
    return {**template_kwargs(body), "add_generation_prompt": add, "continue_final_message": go_on}


def truncated(prompts: list[list[int]], k: int | None, max_model_len: int) -> list[list[int]]:
    """Each prompt's last k tokens (k -1: as many as the context holds with one to generate)."""
    if k is None:
        return prompts
    keep = k if k > 0 else max_model_len - 1
    return [p[-keep:] for p in prompts]


def truncation(body: dict) -> int | None:
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: as many as the
    context allows)."""
    k = _get(body, "truncate_prompt_tokens", int, None)
    if k is not None and k < 1 and k != -1:
        raise _bad("'truncate_prompt_tokens' must be at least 1, or -1 (as many as the context allows)",
                   "truncate_prompt_tokens")
    return k


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Options that change what the answer must be, which this server cannot honour: a 400
    naming them rather than an answer that silently ignores them."""
    for name in ("tools", "tool_choice"):
        if not chat and body.get(name) not in (None, "none", []):
            raise _bad(f"function calling ('{name}') is for /v1/chat/completions", name)
    if body.get("modalities") not in (None, ["text"]) or body.get("audio"):
        raise _bad("only text output is supported", "modalities")
    if chat and body.get("echo"):
        raise _bad("'echo' is for /v1/completions", "echo")
    if chat and body.get("web_search_options") is not None:
        raise _bad("web search is not available on this server", "web_search_options")
    if not chat and body.get("reasoning_effort") is not None:
        raise _bad("'reasoning_effort' is for /v1/chat/completions", "reasoning_effort")
    if chat and body.get("chat_template") is not None:  # as vLLM refuses it by default (--trust-request-chat-template)
        raise _bad("per-request chat templates are not accepted; the model's own is used", "chat_template")
    if chat and body.get("documents"):
        raise _bad("'documents' are not passed to chat templates here; put them in the messages", "documents")
    if chat and body.get("add_special_tokens"):  # the template writes the special tokens itself
        raise _bad("'add_special_tokens' is for /v1/completions", "add_special_tokens")
    if not chat:
        if body.get("best_of") not in (None, 1, body.get("n", 1)):
            raise _bad("'best_of' is not supported; use 'n'", "best_of")


def _prediction(body: dict) -> str | None:
    """OpenAI's predicted output, {"type": "content", "content": text or [{"type": "text",
    "text": ...}, ...]} -> its text (None: none given)."""
    prediction = body.get("prediction")
    if prediction is None:
        return None
    is_content = isinstance(prediction, dict) and prediction.get("type") == "content"
    content = prediction.get("content") if is_content else None
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise _bad("'prediction' must be {\"type\": \"content\", \"content\": text or a list of text parts}",
                   "prediction")
    return content or None


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's {"<token id>": bias} (JSON keys are strings) -> {token id: bias}."""
    bias = _get(body, "logit_bias", dict, {})
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(f"'logit_bias' values must be numbers, got {value!r}", "logit_bias")
        out[token] = float(value)
    return out


def completion_prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            return list(prompt)
    raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise _bad(f"messages[{i}] needs a role of system, user, assistant or tool", "messages")
        reasoning = m.get("reasoning_content") or m.get("reasoning")  # an earlier answer's (gateway/reasoning.py)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can be served
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text", ""), str)
                       for p in content):
                raise _bad(f"messages[{i}]: only text content parts (a string 'text' each) are supported", "messages")
            content = "".join(p.get("text", "") for p in content)
        if m["role"] == "assistant" and m.get("tool_calls") and (content is None or isinstance(content, str)):
            # an earlier turn's calls (its content may be null)
            out.append(template_message(m, content or "")
                       | ({"reasoning_content": reasoning} if isinstance(reasoning, str) else {}))
            continue
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or text parts", "messages")
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if m["role"] == "tool":
            message["tool_call_id"] = m.get("tool_call_id")
        if m["role"] == "assistant" and isinstance(reasoning, str):  # templates that keep it (Qwen3's) show it
            message["reasoning_content"] = reasoning
        out.append(message)
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          prediction: tuple[int, int] | None = None, reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache;
    prediction: (accepted, rejected) tokens of a predicted output, when one was given;
    reasoning_tokens: of the completion's, a reasoning model's section's."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    details = {}
    if prediction is not None:
        details = {"accepted_prediction_tokens": prediction[0], "rejected_prediction_tokens": prediction[1]}
    if reasoning_tokens is not None:
        details["reasoning_tokens"] = reasoning_tokens
    if details:
        out["completion_tokens_details"] = details
    return out
