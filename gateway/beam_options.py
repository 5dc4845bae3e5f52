"""vLLM's beam search options of a completions or chat request (engine/beam_search.py runs it)."""

from __future__ import annotations

from loragate.engine.errors import InvalidRequestError


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param)


# What beam search leaves at its default: it ranks whole sequences by the model's own logprobs,
# so nothing that samples, reshapes the distribution, or ends a beam on text can apply.
_NOT_WITH_BEAMS = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "repetition_penalty": 1.0, "logit_bias": {}, "min_tokens": 0, "allowed_token_ids": None,
                   "bad_words": [], "grammar": None, "prediction": None, "include_stop_str_in_output": False,
                   "skip_special_tokens": True}


def beam_search_options(body: dict, sampling: dict, scored: bool) -> dict | None:
    """vLLM's use_beam_search (n beams, n choices, as transformers' beam search ranks them:
    engine/beam_search.py) with its length_penalty and transformers' early_stopping; None
    without it. scored: the request asks for echo, a suffix or prompt logprobs."""
    given = {name: body[name] for name in ("length_penalty", "early_stopping") if body.get(name) is not None}
    options = {"length_penalty": 1.0, "early_stopping": False, **given}
    if body.get("use_beam_search") not in (None, False, True):
        raise _bad("'use_beam_search' must be of type bool", "use_beam_search")
    if not body.get("use_beam_search"):
        for name in given:
            raise _bad(f"'{name}' applies to beam search only ('use_beam_search': true)", name)
        return None
    if isinstance(options["length_penalty"], bool) or not isinstance(options["length_penalty"], (int, float)):
        raise _bad("'length_penalty' must be a number", "length_penalty")
    if not (isinstance(options["early_stopping"], bool) or options["early_stopping"] == "never"):
        raise _bad("'early_stopping' must be true, false or \"never\"", "early_stopping")
    if sampling["stop"]:
        raise _bad("stop strings do not end beams; use 'stop_token_ids' with beam search", "stop")
    if sampling["temperature"] not in (0.0, 1.0):
        raise _bad("beam search ranks the model's own logprobs: 'temperature' must be left at 1 (or 0)", "temperature")
    for name, default in _NOT_WITH_BEAMS.items():
        if sampling[name] != default and name == "grammar":
            raise _bad("a structured output format (response_format, structured_outputs, guided_*, or a forced tool "
                       "call) cannot be combined with beam search ('use_beam_search')", "response_format")
        if sampling[name] != default:
            raise _bad(f"'{name}' cannot be combined with beam search ('use_beam_search')", name)
    if scored:
        raise _bad("echo, suffix and prompt_logprobs cannot be combined with beam search ('use_beam_search')",
                   "use_beam_search")
    return options
