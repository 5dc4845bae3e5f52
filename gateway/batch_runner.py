"""The batch API's background worker: validates new batches, feeds their lines to the engine,
and writes the output files, for as long as the app runs.

Priority. Batch lines are background work, so the runner
- keeps at most `batch_max_concurrency` lines in the engine at once (all batches together),
  so a large batch never fills the engine's running set by itself; and
- submits a new line only while nothing waits in the engine (`engine.num_waiting == 0`).
  Requests wait there when the engine is at capacity, so while an interactive request waits
  no batch line joins the queue: it waits at most for the few lines already in the engine,
  which finish (aborting them would waste their work). Under light interactive load the
  batch uses the engine's spare capacity; under saturation it stops until the queue drains;
- runs chat and completions lines at scheduling priority BATCH_PRIORITY or less urgent, so
  an interactive request that finds the KV cache full preempts a batch line for room.
The alternative, a count of interactive requests in flight kept by the handlers, would hold
batches back whenever anyone is being served, even with the engine far from full.

Exactly the interactive answer: a line runs through openai_api.complete (responses_api.respond
for /v1/responses batches, embeddings_api.embed for /v1/embeddings), the code behind the HTTP
handlers, as its batch's tenant.
Errors: 429/503 (engine busy, loading or stopped) leave the line pending and the runner
backs off; any other error is the line's result.

Fleet: engines sharing one LORAGATE_HOME share the store; only the holder of its lease
(batch_lease.py) runs lines, the others poll it and take over when the holder is gone.

Restart: the store is the only truth. Each finished line is committed before the next tick
looks at it; on start-up the first tick resumes in_progress batches (their pending lines),
re-validates validating ones, and finishes cancelling and finalizing ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time

from .auth import Principal
from .batch_input import (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT, MESSAGES_ENDPOINT, RERANK_ENDPOINT, RESPONSES_ENDPOINT,
                          SCORE_ENDPOINT, BatchInputError, error_line, output_line, read_input)
from .batch_lease import RunnerLease
from .batch_store import (CANCELLING, FINALIZING, IN_PROGRESS, LINE_CANCELLED, LINE_EXPIRED, LINE_FAILED,
                          ORPHAN_MIN_AGE_S, SUCCEEDED, VALIDATING, BatchRecord, BatchStore, PendingLine)
from .errors import APIError, to_api_error
from .embeddings_api import embed
from .messages_api import answer_message
from .openai_api import complete
from .responses_api import respond
from .scores_api import rerank, score

log = logging.getLogger("loragate.gateway")

IDLE_POLL_S = 1.0  # nothing to do: look again this often (API calls wake the runner at once)
HOLD_BACK_POLL_S = 0.05  # waiting for the engine's queue to drain
NOT_READY_POLL_S = 0.5  # the model is still loading
LEASE_POLL_S = 2.0  # another process runs the batches: see whether it still does
MAX_BACKOFF_S = 30.0
RETRY_STATUSES = (429, 503)  # the engine's state, not the request's fault
POOLING_ENDPOINTS = {EMBEDDINGS_ENDPOINT: embed, SCORE_ENDPOINT: score, RERANK_ENDPOINT: rerank}
BATCH_PRIORITY = 1  # a chat or completions line's least scheduling urgency: interactive requests' default is 0


def validate_batch(store: BatchStore, batch: BatchRecord, max_lines: int) -> None:
    """validating -> in_progress with its lines stored, or -> failed. Blocking."""
    try:
        # Opened before the row is checked, so a concurrent DELETE cannot pull it out from under us.
        with open(store.file_path(batch.input_file_id), "rb") as src:
            if store.get_file(batch.input_file_id) is None:
                raise FileNotFoundError(batch.input_file_id)
            store.start_batch(batch.id, read_input(src, batch.endpoint, max_lines))
    except FileNotFoundError:
        store.fail_batch(batch.id, [{"code": "input_file_deleted", "param": "input_file_id", "line": None,
                                     "message": f"input file {batch.input_file_id!r} was deleted before the batch ran"}])
    except BatchInputError as e:
        store.fail_batch(batch.id, [e.as_error()])


def _expired_line(custom_id: str) -> str:
    return error_line(custom_id, "batch_expired", "the batch's completion window ended before this request ran")


async def _blocking(fn, *args):
    """Run fn in a thread and wait for it even if cancelled meanwhile, so that a store call
    (a line's commit, a file being written) is over before the cancellation is re-raised:
    shutdown then never closes the store under a running call."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class BatchRunner:
    def __init__(self, state, store: BatchStore, lease: RunnerLease, *, max_concurrency: int = 4,
                 max_lines: int = 50_000):
        self.state, self.store, self.lease = state, store, lease
        self.max_concurrency, self.max_lines = max_concurrency, max_lines
        self._lines: dict[tuple[str, int], asyncio.Task] = {}  # (batch id, line_no) -> its task
        self._wake = asyncio.Event()
        self._main: asyncio.Task | None = None
        self._backoff_s = 0.0
        self._resume_at = 0.0  # time.monotonic() before which no line is submitted
        self._next_sweep = time.monotonic() + ORPHAN_MIN_AGE_S
        self._is_holder = False

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name="loragate-batch-runner")

    async def stop(self) -> None:
        """Abort the lines in flight (they stay pending, and run again after a restart)."""
        if self._main is not None:
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        await self._abort_lines(list(self._lines))
        if self._is_holder:
            with contextlib.suppress(Exception):  # the next holder then need not wait for it to expire
                await _blocking(self.lease.release)

    def notify(self) -> None:
        """Something changed (a batch created or cancelled): look now rather than at the next poll."""
        self._wake.set()

    @property
    def num_running_lines(self) -> int:
        return len(self._lines)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self._pass()
            except Exception:  # noqa: BLE001 - a broken store or engine must not end the worker
                log.exception("batch runner: pass failed; retrying")
                delay = MAX_BACKOFF_S / 10
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _pass(self) -> float:
        engine = self.state.engine
        if engine is None or engine.error is not None:
            # Only a process that can run lines holds the lease: one whose model failed to
            # load, or whose engine died, leaves the batches to the rest of the fleet.
            if self._is_holder:
                await self._abort_lines(list(self._lines))
                await _blocking(self.lease.release)
                self._is_holder = False
            return NOT_READY_POLL_S
        self._is_holder = await _blocking(self.lease.acquire)
        if not self._is_holder:
            await self._abort_lines(list(self._lines))  # lost it: this process stalled past the lease
            return LEASE_POLL_S
        delay = await self._tick()
        await self._sweep_orphans()
        return delay

    async def _sweep_orphans(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + ORPHAN_MIN_AGE_S
            await _blocking(self.store.remove_orphan_files)

    async def _tick(self) -> float:
        """One pass over the unfinished batches, oldest first; returns when to look again."""
        delay = IDLE_POLL_S
        now = time.time()
        for batch in await _blocking(self.store.active_batches):
            if batch.status == VALIDATING:
                await _blocking(validate_batch, self.store, batch, self.max_lines)
                delay = 0.0
            elif batch.status == CANCELLING:
                await self._close(batch, LINE_CANCELLED)
            elif batch.status == FINALIZING:
                await self._close(batch, None)
            elif batch.status == IN_PROGRESS and now >= batch.expires_at:
                await self._close(batch, LINE_EXPIRED)
            elif batch.status == IN_PROGRESS:
                delay = min(delay, await self._feed(batch))
        return delay

    def _submit_delay(self) -> float:
        """0 when a line may be submitted now, else how long to wait before asking again."""
        engine = self.state.engine
        if engine is None or engine.error is not None:
            return NOT_READY_POLL_S
        if time.monotonic() < self._resume_at:
            return self._resume_at - time.monotonic()
        return HOLD_BACK_POLL_S if engine.num_waiting > 0 else 0.0

    async def _feed(self, batch: BatchRecord) -> float:
        running = {line_no for batch_id, line_no in self._lines if batch_id == batch.id}
        num_free = self.max_concurrency - len(self._lines)
        lines = await _blocking(self.store.pending_lines, batch.id, len(running) + max(num_free, 1))
        lines = [line for line in lines if line.line_no not in running]
        if not lines:
            if not running:
                await self._close(batch, None)  # every line has its result
            return IDLE_POLL_S
        if num_free <= 0:
            return IDLE_POLL_S  # a finishing line wakes the runner
        delay = self._submit_delay()
        if delay > 0:
            return delay
        for line in lines[:num_free]:
            self._lines[(batch.id, line.line_no)] = asyncio.create_task(self._run_line(batch, line))
        return IDLE_POLL_S

    async def _run_line(self, batch: BatchRecord, line: PendingLine) -> None:
        try:
            outcome = await self._answer(batch, line)
            if outcome is not None:
                await _blocking(self.store.record_line, batch.id, line.line_no, *outcome)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the store failed: the line stays pending for a retry
            log.exception("batch %s line %d: could not record the result", batch.id, line.line_no)
            self._back_off()
        finally:
            self._lines.pop((batch.id, line.line_no), None)
            self._wake.set()

    async def _answer(self, batch: BatchRecord, line: PendingLine) -> tuple[str, str] | None:
        """(line state, result line), or None to leave the line pending for a later try."""
        try:
            body, principal = json.loads(line.body), Principal(batch.tenant)
            if batch.endpoint == RESPONSES_ENDPOINT:
                response = await respond(self.state, principal, body)
            elif batch.endpoint in POOLING_ENDPOINTS:
                response = await POOLING_ENDPOINTS[batch.endpoint](self.state, principal, body)
            elif batch.endpoint == MESSAGES_ENDPOINT:
                response = await answer_message(self.state, principal, body, BATCH_PRIORITY)
            else:
                if isinstance(body, dict) and isinstance(body.get("priority", 0), int):
                    # behind interactive requests in the engine too: they preempt a batch line for room
                    body["priority"] = max(body.get("priority", 0), BATCH_PRIORITY)
                response = await complete(self.state, principal, body, chat=batch.endpoint == CHAT_ENDPOINT)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every error becomes the line's result
            error = to_api_error(e)
            if error.status in RETRY_STATUSES:
                self._back_off()
                return None
            if not isinstance(e, APIError) and error.status >= 500:
                log.error("batch %s line %d failed", batch.id, line.line_no, exc_info=e)
            return LINE_FAILED, output_line(line.custom_id, error.status, error.body())
        self._backoff_s = 0.0
        return SUCCEEDED, await asyncio.to_thread(output_line, line.custom_id, 200, response)  # 25 MB for embeddings

    def _back_off(self) -> None:
        self._backoff_s = min(MAX_BACKOFF_S, max(0.5, self._backoff_s * 2))
        self._resume_at = time.monotonic() + self._backoff_s

    async def _abort_lines(self, keys) -> None:
        tasks = [self._lines[k] for k in keys if k in self._lines]
        for task in tasks:
            task.cancel()  # closes its engine streams: the engine aborts the requests
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close(self, batch: BatchRecord, unfinished_state: str | None) -> None:
        """Abort the batch's lines in flight, settle its pending lines as `unfinished_state`
        (cancelled, expired) and write its files."""
        await self._abort_lines([k for k in self._lines if k[0] == batch.id])
        if unfinished_state is not None:
            result_for = _expired_line if unfinished_state == LINE_EXPIRED else None
            await _blocking(self.store.close_pending_lines, batch.id, unfinished_state, result_for)
        final = await _blocking(self.store.finalize, batch.id)
        log.info("batch %s %s", batch.id, final.status)


@contextlib.asynccontextmanager
async def batch_service(app, state):
    """For the app's lifetime: the store under $LORAGATE_HOME/batches (app.state.batch_store)
    and its runner (app.state.batch_runner). A store that cannot open leaves the rest of the
    server up; the batch and files endpoints then answer 503 with the reason."""
    from loragate.engine.models.prepare import loragate_home

    from .settings import GatewaySettings

    settings = getattr(app.state, "settings", None)

    def open_store():
        store = BatchStore(loragate_home() / "batches")
        return store, RunnerLease(store)

    try:
        store, lease = await asyncio.to_thread(open_store)
    except (OSError, sqlite3.Error) as e:
        log.error("batch API unavailable: cannot open its store under %s: %s", loragate_home() / "batches", e)
        app.state.batch_store_error = f"the batch store could not be opened: {e}"
        yield
        return
    runner = BatchRunner(state, store, lease,
                         max_concurrency=getattr(settings, "batch_max_concurrency", GatewaySettings.batch_max_concurrency),
                         max_lines=getattr(settings, "batch_max_lines", GatewaySettings.batch_max_lines))
    app.state.batch_store, app.state.batch_runner = store, runner
    runner.start()
    try:
        yield
    finally:
        await runner.stop()
        store.close()
