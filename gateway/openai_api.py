"""OpenAI-compatible inference: /v1/completions and /v1/chat/completions (models: models_api.py).

Every choice is one engine request. Streams are SSE `data: {json}` chunks ending in
`data: [DONE]`; an error mid-stream is a `data: {"error": ...}` event before [DONE]. A client
that goes away (streaming or not) cancels its requests, which frees their KV blocks.
`complete()` is the non-streaming path without HTTP: the batch runner answers lines with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from loragate.engine.beam_search import start_beam_search
from loragate.engine.fill_in_middle import require_fim_format
from loragate.engine.reasoning import reasoning_start, reasoning_token_count

from . import tracing
from .auth import authorization_of
from .choices import Choice, pump
from .errors import APIError, to_api_error
from .logprobs_format import chat_logprobs, completion_logprobs, echo_logprobs, vllm_prompt_logprobs
from .reasoning import ReasoningSplit, with_effort, with_reasoning
from .protocol import chat_messages, completion_prompts, parse_common, truncated, usage
from .tool_calls import StreamedCalls, check_template


async def json_body(request: Request) -> dict:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", param="body") from None


def principal_of(request: Request):
    return request.app.state.server.keys.authenticate(authorization_of(request.headers))


async def _start(state, principal, gen, prompts_ids: list[list[int]], model: str):
    engine = state.require_engine()
    adapter = await state.resolve_model(principal, model)
    state.check_capacity(principal.tenant)
    choices, requests = [], []
    labels = (principal.tenant, state.metrics.adapter_label(adapter))
    gen.sampling["priority"] = state.priority_of(principal.tenant, gen.sampling["priority"])
    if (trace := tracing.current()) is not None:
        trace.started(model, state.model_name, principal.tenant, labels[1], sum(map(len, prompts_ids)), n=gen.n,
                      max_tokens=gen.max_tokens, temperature=gen.sampling["temperature"], top_p=gen.sampling["top_p"])
    for pi, ids in enumerate(prompts_ids):
        state.metrics.prompt(labels, len(ids))
        if gen.charge is not None:
            gen.charge(len(ids))
        for ci, params in enumerate(gen.sampling_params(len(ids), engine.engine.max_model_len)):
            split = ReasoningSplit(*gen.reasoning) if gen.reasoning else None
            choices.append(Choice(pi * gen.n + ci, pi, len(ids), state.metrics, labels, gen.charge, split))
            requests.append((ids, params))
    if gen.beam is not None:  # one search per prompt: its n best hypotheses are the prompt's n choices
        return choices, _start_beams(engine, gen, prompts_ids, adapter, principal.tenant)
    # All at once: a refused prompt queues none of them
    return choices, await engine.add_requests(requests, adapter=adapter, tenant=principal.tenant,
                                              cache_salt=gen.cache_salt)


def _start_beams(engine, gen, prompts_ids: list[list[int]], adapter: str | None, tenant: str) -> list:
    streams = []
    try:
        for ids in prompts_ids:
            params = gen.beam_params(len(ids), engine.engine.max_model_len)
            streams += start_beam_search(engine, ids, params, adapter=adapter, tenant=tenant, cache_salt=gen.cache_salt)
    except BaseException:  # a refused prompt runs none of the searches
        for stream in streams:
            stream.close()
        raise
    return streams


async def until_disconnect(request: Request, coro):
    task = asyncio.ensure_future(coro)
    while not task.done():
        done, _ = await asyncio.wait([task], timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client closed the request", code="client_closed")
    return task.result()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def submit_choices(state, principal, body: dict, gen, *, chat: bool):
    """Tokenise the request's prompts and queue one engine request per choice."""
    engine = state.require_engine()
    tok = engine.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        if gen.tools is not None:
            check_template(gen.tools, tok.chat_template)
        template_kwargs = with_effort(gen.template_kwargs, gen.reasoning_effort, tok.chat_template)
        prompts = [tok.apply_chat_template(chat_messages(body), tools=gen.tools.shown if gen.tools else None,
                                           tokenize=True, return_dict=False, **template_kwargs)]
        if state.think_markers is not None:  # a reasoning model: where its output starts decides the split
            gen.reasoning = (state.think_markers, reasoning_start(prompts[0], state.think_markers, tok))
            gen.sampling["reasoning"] = True
    else:
        texts = completion_prompts(body)
        if gen.suffix is not None:
            texts = _fill_in_middle(tok, gen, texts)
        prompts = [tok.encode(p, add_special_tokens=gen.add_special_tokens) if isinstance(p, str) else list(p)
                   for p in texts]
        if gen.echo:  # what echo repeats: the prompt as sent (token ids decoded)
            gen.prompt_texts = [p if isinstance(p, str) else tok.decode(p) for p in texts]
    prompts = truncated(prompts, gen.truncate_prompt_tokens, engine.engine.max_model_len)
    choices, streams = await _start(state, principal, gen, prompts, gen.model)
    return prompts, choices, streams


def _fill_in_middle(tok, gen, texts: list) -> list[str]:
    """Each prompt laid out with the suffix in the model's fill-in-the-middle format, and
    generation stopped where the model marks the gap filled."""
    fim = require_fim_format(tok)
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, "'suffix' needs the prompt as text, not token ids", param="suffix")
    gen.sampling["stop_token_ids"] = [*gen.sampling["stop_token_ids"], *fim.stop_token_ids]
    return [fim.prompt(t, gen.suffix) for t in texts]


async def collect_answer(state, principal, body: dict, gen, *, chat: bool) -> dict:
    prompts, choices, streams = await submit_choices(state, principal, body, gen, chat=chat)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    tok = state.engine.tokenizer
    async for i, out in pump(streams):
        choices[i].add(out)
    out_choices = []
    for c in choices:
        if chat:
            logprobs = chat_logprobs(tok, c.logprobs, gen.tokens_as_ids) if gen.logprobs is not None else None
            message, finish_reason = ({"role": "assistant", "content": c.content}, c.finish_reason) if gen.tools is None \
                else gen.tools.message(c.content, c.finish_reason)
            if c.split is not None:
                message = with_reasoning(message, c.split.reasoning, gen.include_reasoning)
            out_choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                                "finish_reason": finish_reason, "stop_reason": c.stop_reason,
                                **_token_ids(gen, c, c.tokens)})
        else:
            text, logprobs = _completion_piece(gen, tok, prompts, c, c.text, c.logprobs, True, 0)
            out_choices.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason, **_token_ids(gen, c, c.tokens, prompts),
                                **_prompt_logprobs(gen, tok, prompts, c)})
    prompt_ids = {"prompt_token_ids": prompts[0]} if chat and gen.return_token_ids else {}
    prompt_scores = _prompt_logprobs(gen, tok, prompts, choices[0]) if chat else {}
    return {"id": rid, "object": kind, "created": created, "model": gen.model, "choices": out_choices,
            "usage": _usage(gen, prompts, choices), "service_tier": gen.service_tier, **prompt_ids, **prompt_scores,
            **_metrics(state, choices)}


def _prompt_logprobs(gen, tok, prompts: list[list[int]], c: Choice) -> dict:
    """vLLM's prompt_logprobs field for choice c's prompt, when asked for (chat: one prompt)."""
    if gen.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": vllm_prompt_logprobs(tok, prompts[c.prompt_index], c.prompt_logprobs or [],
                                                    gen.prompt_logprobs, gen.tokens_as_ids)}


def _token_ids(gen, c: Choice, tokens: list[int], prompts: list[list[int]] | None = None) -> dict:
    """vLLM's return_token_ids fields of a choice (or a streamed piece of it): the tokens it
    returns, and on completions (whose choices may have different prompts) its prompt's."""
    if not gen.return_token_ids:
        return {}
    ids = {"token_ids": [] if gen.prompt_only else tokens}
    return ids if prompts is None else {"prompt_token_ids": prompts[c.prompt_index], **ids}


def _metrics(state, choices: list[Choice]) -> dict:
    """{"metrics": ...} with --enable-per-request-metrics (null unless the request was one
    engine request: n > 1 or several prompts have no one timing, as in vLLM), else {}."""
    if not state.per_request_metrics:
        return {}
    return {"metrics": choices[0].timing() if len(choices) == 1 else None}


def _usage(gen, prompts, choices: list[Choice]) -> dict:
    """Each prompt counts once (n choices share it): its cached tokens are its least cached choice's."""
    cached = sum(min(c.cached_tokens for c in choices if c.prompt_index == i) for i in range(len(prompts)))
    prediction = tuple(map(sum, zip(*(c.prediction for c in choices)))) if gen.sampling.get("prediction") else None
    markers, start = gen.reasoning or (None, None)
    reasoning = sum(reasoning_token_count(c.tokens, start, markers) for c in choices) if markers else None
    return usage(sum(len(p) for p in prompts), sum(_generated(gen, c) for c in choices), cached, prediction, reasoning)


def _generated(gen, c: Choice) -> int:
    """Tokens a choice returns (with max_tokens 0 and echo, the engine's one token is not)."""
    return 0 if gen.prompt_only else len(c.tokens)


def _completion_piece(gen, tok, prompts, c: Choice, text: str, entries, first: bool, offset: int):
    """(text, logprobs) of a completions choice, whole or one streamed piece: with echo the
    first piece starts with the prompt (and its tokens' logprobs); with max_tokens 0 nothing
    generated is returned. offset: where `text` starts in the generated text."""
    prefix, logprobs = "", None
    if gen.echo and first:
        prefix = gen.prompt_texts[c.prompt_index]
        if gen.logprobs is not None:
            top = gen.logprobs  # the engine's top-k may be prompt_logprobs' larger one
            scored = [(lp, dict(list(alts.items())[:top]), rank) for lp, alts, rank in c.prompt_logprobs]
            logprobs = echo_logprobs(tok, prompts[c.prompt_index], scored, gen.tokens_as_ids)
    if gen.prompt_only:
        text, entries = "", []
    if gen.logprobs is None:
        return prefix + text, None
    base = len(gen.prompt_texts[c.prompt_index]) if gen.echo else 0
    generated = completion_logprobs(tok, entries, base + offset, gen.tokens_as_ids)
    return prefix + text, generated if logprobs is None else {k: logprobs[k] + generated[k] for k in generated}


async def complete(state, principal, body: dict, *, chat: bool) -> dict:
    """The body POST /v1/chat/completions (chat) or /v1/completions answers with status 200
    for this request body, run as `principal`; errors raise exactly as the handler raises
    them. The batch runner calls it, so a batch line gets what the interactive call gets."""
    gen = parse_common(body, chat=chat)
    if gen.stream:
        raise APIError(400, "'stream' is not supported here: the whole response is returned at once", param="stream")
    return await collect_answer(state, principal, body, gen, chat=chat)


async def _generate(request: Request, *, chat: bool):
    state = request.app.state.server
    principal = principal_of(request)
    state.require_engine()
    body = await json_body(request)
    gen = parse_common(body, chat=chat)
    slot = state.open_tenant_request(principal.tenant, request.headers)
    gen.charge = slot.charge
    if not gen.stream:
        try:
            answer = collect_answer(state, principal, body, gen, chat=chat)
            return JSONResponse(await until_disconnect(request, answer), headers=slot.response_headers())
        finally:
            slot.release()
    try:
        prompts, choices, streams = await submit_choices(state, principal, body, gen, chat=chat)
    except BaseException:
        slot.release()
        raise

    async def events():
        try:
            # aclosing: a client that hangs up closes the chunks at once, which aborts the requests
            async with contextlib.aclosing(stream_chunks(state, gen, prompts, choices, streams, chat=chat)) as chunks:
                async for piece in chunks:
                    yield _sse(piece)
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in-band
            yield _sse(to_api_error(e).body())
        finally:
            slot.release()
        yield "data: [DONE]\n\n"

    return StreamingResponse(slot.reported(events()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **slot.response_headers()})


async def stream_chunks(state, gen, prompts, choices, streams, *, chat: bool):
    """The chunk objects of a streamed answer (chat.completion.chunk or text_completion), in
    order, for the requests submit_choices queued; the usage chunk last when asked for. Errors
    raise."""
    tok = state.engine.tokenizer
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    calls = {c.index: StreamedCalls(gen.tools) for c in choices} if gen.tools and gen.tools.mode != "none" else None
    num_prompt_tokens = sum(len(p) for p in prompts)

    def chunk(c: Choice, delta_text: str, new, first: bool) -> dict | None:
        if chat:
            reasoning, delta_text = c.delta
            reasoning = reasoning if gen.include_reasoning else ""
            delta, finish_reason = {"content": delta_text} if delta_text or not reasoning else {}, c.finish_reason
            if calls is not None:  # tool calls: what the text turns into decides what is sent
                delta, finish_reason = (calls[c.index].final(c.content, c.finish_reason) if c.finish_reason
                                        else (calls[c.index].delta(c.content), None))
                if delta is None and not (first or finish_reason or new or reasoning):
                    return None
            if reasoning:
                delta = with_reasoning(delta or {}, reasoning, True)
            delta = {"role": "assistant", **(delta or {})} if first else (delta or {})
            choice = {"index": c.index, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": chat_logprobs(tok, new, gen.tokens_as_ids) if gen.logprobs is not None else None,
                      "stop_reason": c.stop_reason, **_token_ids(gen, c, c.tokens[sent_tokens.get(c.index, 0):])}
        else:
            text, logprobs = _completion_piece(gen, tok, prompts, c, delta_text, new, first,
                                               len(c.text) - len(delta_text))
            choice = {"index": c.index, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs,
                      "stop_reason": c.stop_reason,
                      **_token_ids(gen, c, c.tokens[sent_tokens.get(c.index, 0):], prompts if first else None),
                      **(_prompt_logprobs(gen, tok, prompts, c) if first else {})}
        piece = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": gen.model,
                 "choices": [choice], "service_tier": gen.service_tier}
        if chat and not started:  # the stream's first chunk: the prompt's ids and scores, if asked for
            piece.update({"prompt_token_ids": prompts[0]} if gen.return_token_ids else {},
                         **_prompt_logprobs(gen, tok, prompts, c))
        if gen.continuous_usage:  # the counts so far; their details come with the final usage chunk
            generated = sum(_generated(gen, c) for c in choices)
            piece["usage"] = {"prompt_tokens": num_prompt_tokens, "completion_tokens": generated,
                              "total_tokens": num_prompt_tokens + generated}
        return piece

    started, sent_tokens = set(), {}  # choices that have sent a chunk; tokens each has sent
    async with contextlib.aclosing(pump(streams)) as outputs:
        async for i, out in outputs:
            c = choices[i]
            new = c.add(out)
            if any(c.delta) or out.finished or new or i not in started:
                piece = chunk(c, c.delta[1], new, i not in started)
                if piece is not None:
                    yield piece
                    started.add(i)
                    sent_tokens[c.index] = len(c.tokens)
    if gen.include_usage:
        yield {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": gen.model,
               "choices": [], "usage": _usage(gen, prompts, choices), **_metrics(state, choices)}


async def completions(request: Request):
    return await _generate(request, chat=False)


async def chat_completions(request: Request):
    return await _generate(request, chat=True)
