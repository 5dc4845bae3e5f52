"""One choice of a completion as its engine request's outputs arrive (Choice), and the
outputs of several requests merged into one stream (pump)."""

from __future__ import annotations

import asyncio
import time

from . import tracing
from .reasoning import ReasoningSplit


class Choice:
    """Accumulates one engine request's outputs, and records its latencies."""

    def __init__(self, index: int, prompt_index: int, prompt_len: int, metrics, labels: tuple[str, str], charge=None,
                 split: ReasoningSplit | None = None):
        self.index, self.prompt_index, self.prompt_len, self.charge = index, prompt_index, prompt_len, charge
        self.split = split  # a reasoning model's chat answer: its text split into reasoning and content
        self.delta = ("", "")  # the (reasoning, content) text the last output placed
        self.text, self.tokens, self.logprobs, self.finish_reason, self.stop_reason = "", [], [], None, None
        self.prompt_logprobs = None  # with echo + logprobs: the prompt tokens' entries
        self.cached_tokens = 0  # of the prompt, served from the prefix cache
        self.prediction = (0, 0)  # (accepted, rejected) tokens of a predicted output
        self.metrics, self.labels = metrics, labels  # (tenant, adapter) of the token counters
        self.start = self.last = time.monotonic()
        self.first = None  # when the first output arrived
        self.queue_seconds = None  # the engine's wait for the batch, once finished
        self.trace = tracing.current()  # the request's span, where requests are traced

    def add(self, out) -> list:
        t = time.monotonic()
        # metered as generated, like the rate limit's charge: a stream the client drops midway
        # still used (and was sent) the tokens before it
        self.metrics.output(self.labels, t - self.last, self.first is None, len(out.new_token_ids))
        if self.trace is not None:
            self.trace.output(len(out.new_token_ids))
        self.last = t
        if self.first is None:
            self.first = t
        self.cached_tokens = out.num_cached_tokens
        accepted = out.num_accepted_prediction_tokens
        self.prediction = (accepted, max(out.num_prediction_tokens - accepted, 0))
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.delta_text
        self.delta = self.split.feed(out.delta_text, out.finished) if self.split else ("", out.delta_text)
        new = list(zip(out.new_token_ids, out.new_logprobs)) if out.new_logprobs else []
        self.tokens += out.new_token_ids
        self.logprobs += new
        if self.charge is not None:
            self.charge(len(out.new_token_ids))
        if out.finished:
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
            self.stop_reason = out.stop_reason  # vLLM's: the stop string or token id that ended it
            self.queue_seconds = out.queue_seconds
            self.metrics.finish(self.finish_reason, t - self.start, out.queue_seconds, self.first - self.start,
                                self.prompt_len, len(self.tokens))
            if self.trace is not None:
                self.trace.finished(self.finish_reason, out.queue_seconds)
        return new

    def timing(self) -> dict | None:
        """vLLM's per-request metrics (--enable-per-request-metrics), timed from when the
        engine scheduled the request: None until it finished."""
        if self.queue_seconds is None:
            return None
        scheduled, n = self.start + self.queue_seconds, len(self.tokens)
        decode = self.last - self.first
        return {"time_to_first_token_ms": max(self.first - scheduled, 0.0) * 1000,
                "generation_time_ms": decode * 1000, "queue_time_ms": self.queue_seconds * 1000,
                "mean_itl_ms": decode * 1000 / (n - 1) if n > 1 else None,
                "tokens_per_second": n / (self.last - scheduled) if self.last > scheduled else None}

    @property
    def content(self) -> str:
        """The answer's text (without a reasoning section)."""
        return self.split.content if self.split else self.text



async def pump(streams):
    """Yield (choice position, output) from all streams as they arrive; cancelling the
    consumer cancels every stream (and so aborts its engine request)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
