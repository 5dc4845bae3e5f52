"""Logprobs as the APIs render them: OpenAI's chat shape (content entries with top_logprobs)
and legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset; with echo,
the prompt's tokens first), and vLLM's prompt_logprobs. Entries come from the engine as
(logprob, {alternative: logprob}) per token, a prompt token's with its rank too."""

from __future__ import annotations


def _token_name(tokenizer, token: int, as_id: bool) -> str:
    """How logprobs name a token: its text, or with vLLM's return_tokens_as_token_ids
    "token_id:<id>" (a token that is part of a character decodes to no usable text)."""
    return f"token_id:{token}" if as_id else tokenizer.decode([token])


def completion_logprobs(tokenizer, entries: list[tuple[int, tuple[float, dict[int, float]]]], offset: int,
                        as_ids: bool = False) -> dict:
    """Legacy completions shape from (token, (logprob, {alt: logprob})) pairs."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, (lp, alts, *_) in entries:  # a prompt token's entry has its rank too
        offsets.append(offset)
        offset += len(tokenizer.decode([token]))
        tokens.append(_token_name(tokenizer, token, as_ids))
        token_logprobs.append(lp)
        tops.append({_token_name(tokenizer, t, as_ids): v for t, v in alts.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(tokenizer, prompt_ids: list[int], entries: list[tuple[float, dict[int, float]]],
                  as_ids: bool = False) -> dict:
    """Legacy completions shape for the prompt's own tokens: the first has no context, so its
    logprob and alternatives are null."""
    first = tokenizer.decode([prompt_ids[0]])
    out = completion_logprobs(tokenizer, list(zip(prompt_ids[1:], entries)), len(first), as_ids)
    return {"tokens": [_token_name(tokenizer, prompt_ids[0], as_ids)] + out["tokens"],
            "token_logprobs": [None] + out["token_logprobs"],
            "top_logprobs": [None] + out["top_logprobs"], "text_offset": [0] + out["text_offset"]}


def vllm_prompt_logprobs(tokenizer, prompt_ids: list[int], entries: list[tuple[float, dict[int, float], int]],
                         top: int, as_ids: bool = False) -> list[dict | None]:
    """vLLM's prompt_logprobs: null for the first token (it has no context), then for each
    token {"<id>": {"logprob", "rank", "decoded_token"}}: itself (its rank among the whole
    vocabulary) and the `top` likeliest (ranks 1..top)."""
    def item(token: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": _token_name(tokenizer, token, as_ids)}

    out = [None]
    for token, (lp, alts, rank) in zip(prompt_ids[1:], entries):
        position = {str(token): item(token, lp, rank)}
        for i, (t, v) in enumerate(list(alts.items())[:top]):
            position.setdefault(str(t), item(t, v, i + 1))
        out.append(position)
    return out


def chat_logprobs(tokenizer, entries: list[tuple[int, tuple[float, dict[int, float]]]], as_ids: bool = False) -> dict:
    def item(token: int, lp: float) -> dict:
        text = _token_name(tokenizer, token, as_ids)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [dict(item(token, lp), top_logprobs=[item(t, v) for t, v in alts.items()])
                        for token, (lp, alts) in entries]}
