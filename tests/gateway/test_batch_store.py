"""The batch API's pieces without a server: the SQLite store (each line committed once, files
complete, crash leftovers removed), the runner lease, input checks, and the runner's
priority rule (no new line while anything waits in the engine)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import pytest

from loragate.gateway.batch_input import BatchInputError, checked_upload_chunks, read_input
from loragate.gateway.batch_lease import RunnerLease
from loragate.gateway.batch_runner import HOLD_BACK_POLL_S, BatchRunner, validate_batch
from loragate.gateway.batch_store import BatchConflict, BatchStore
from loragate.gateway.errors import APIError

ENDPOINT = "/v1/completions"


def request_line(custom_id: str, prompt: str = "t5") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                       "body": {"model": "tiny", "prompt": prompt, "max_tokens": 1}})


def started_batch(store: BatchStore, num_lines: int, tenant: str = "tenant-a"):
    data = "\n".join(request_line(f"c{i}") for i in range(num_lines)).encode()
    file = store.add_file(tenant, "batch", "in.jsonl", [data])
    batch = store.create_batch(tenant, ENDPOINT, file.id, "24h", 86400, None)
    validate_batch(store, batch, max_lines=1000)
    return store.get_batch(batch.id)


def test_each_line_is_committed_once_and_survives_a_reopen(tmp_path):
    store = BatchStore(tmp_path)
    batch = started_batch(store, 5)
    assert batch.status == "in_progress" and store.request_counts(batch.id) == {"total": 5, "completed": 0, "failed": 0}
    assert store.record_line(batch.id, 2, "succeeded", '{"n": 2}')
    assert not store.record_line(batch.id, 2, "failed", '{"n": "again"}')  # already has its result
    store.close()
    store = BatchStore(tmp_path)  # as after a kill -9: only committed state is there
    assert [line.line_no for line in store.pending_lines(batch.id, 10)] == [1, 3, 4, 5]
    for line_no in (1, 3, 4):
        store.record_line(batch.id, line_no, "succeeded", json.dumps({"n": line_no}))
    store.record_line(batch.id, 5, "failed", '{"n": 5}')
    final = store.finalize(batch.id)
    assert final.status == "completed" and final.completed_at and final.finalizing_at
    with pytest.raises(BatchConflict):
        store.request_cancel(batch.id)
    outputs = store.file_path(final.output_file_id).read_text().splitlines()
    assert [json.loads(x)["n"] for x in outputs] == [1, 2, 3, 4]
    assert store.file_path(final.error_file_id).read_text() == '{"n": 5}\n'
    assert store.finalize(batch.id) == final  # idempotent: no second set of files
    assert len(os.listdir(store.files.root)) == 3


def test_finalize_refuses_a_batch_with_pending_lines(tmp_path):
    store = BatchStore(tmp_path)
    batch = started_batch(store, 2)
    with pytest.raises(BatchConflict):
        store.finalize(batch.id)
    assert store.get_batch(batch.id).status == "in_progress"


def test_expired_lines_go_to_the_error_file(tmp_path):
    store = BatchStore(tmp_path)
    batch = started_batch(store, 3)
    store.record_line(batch.id, 1, "succeeded", "{}")
    store.close_pending_lines(batch.id, "expired", lambda cid: json.dumps({"custom_id": cid}))
    final = store.finalize(batch.id)
    assert final.status == "expired" and final.expired_at
    errors = [json.loads(x)["custom_id"] for x in store.file_path(final.error_file_id).read_text().splitlines()]
    assert errors == ["c1", "c2"] and store.request_counts(batch.id) == {"total": 3, "completed": 1, "failed": 2}


def test_orphan_files_are_removed_only_when_old(tmp_path):
    store = BatchStore(tmp_path)
    kept = store.add_file("t", "batch", "in.jsonl", [b"x\n"])
    old, young = store.files.root / ".tmp-crashed", store.files.root / "file-renamed-not-committed"
    old.write_bytes(b"partial")
    young.write_bytes(b"in flight")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert store.remove_orphan_files() == 1
    assert not old.exists() and young.exists() and store.file_path(kept.id).exists()


def test_a_refused_upload_leaves_nothing(tmp_path):
    store = BatchStore(tmp_path)
    with pytest.raises(APIError) as e:
        store.add_file("t", "batch", "in.jsonl", checked_upload_chunks(io.BytesIO(b"a\nb\nc\nd\n"), 100, 3))
    assert e.value.status == 400 and e.value.code == "too_many_lines"
    with pytest.raises(APIError) as e:
        store.add_file("t", "batch", "in.jsonl", checked_upload_chunks(io.BytesIO(b"x" * 101), 100, 3))
    assert e.value.status == 413
    assert os.listdir(store.files.root) == [] and store.list_files(None, None, 10, None) == ([], False)


def test_input_lines_are_split_into_requests_and_error_lines():
    data = b"\xef\xbb\xbf" + request_line("a").encode() + b"\r\n\n" + request_line("b").encode()
    rows = list(read_input(io.BytesIO(data), ENDPOINT, 10))
    assert [(row[0], row[1], row[3]) for row in rows] == [(1, "a", "pending"), (3, "b", "pending")]
    assert json.loads(rows[0][2]) == {"model": "tiny", "prompt": "t5", "max_tokens": 1}


def test_input_files_with_no_or_too_many_requests_fail(tmp_path):
    with pytest.raises(BatchInputError, match="no requests"):
        list(read_input(io.BytesIO(b"\n  \n"), ENDPOINT, 10))
    with pytest.raises(BatchInputError, match="more than 2"):
        list(read_input(io.BytesIO("\n".join(request_line(f"c{i}") for i in range(3)).encode()), ENDPOINT, 2))
    store = BatchStore(tmp_path)
    file = store.add_file("t", "batch", "in.jsonl", [request_line("a").encode()])
    batch = store.create_batch("t", ENDPOINT, file.id, "24h", 86400, None)
    store.delete_file(file.id)
    validate_batch(store, batch, 10)
    failed = store.get_batch(batch.id)
    assert failed.status == "failed" and failed.errors[0]["code"] == "input_file_deleted"


def test_one_lease_holder_and_takeover(tmp_path):
    store = BatchStore(tmp_path)
    first, second = RunnerLease(store), RunnerLease(store)
    first.host, second.host = "host-1", "host-2"  # live processes on two hosts
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire() and not first.acquire()
    with store.transaction() as db:
        db.execute("UPDATE runner_lease SET expires_at = 0")
    assert first.acquire()  # the holder stopped renewing: its lease ran out

    def held_by(host: str, pid: int) -> None:
        with store.transaction() as db:
            db.execute("UPDATE runner_lease SET owner = 'old', host = ?, pid = ?, expires_at = ?",
                       (host, pid, time.time() + 60))

    newcomer = RunnerLease(store)
    held_by(newcomer.host, os.getppid())  # a live process on this host
    assert not newcomer.acquire()
    held_by(newcomer.host, 2 ** 22 + 7)  # no such process on this host: dead, taken over at once
    assert newcomer.acquire()
    newcomer._renewed_at = None
    held_by(newcomer.host, newcomer.pid)  # our own pid, another owner: a restarted container
    assert newcomer.acquire()


class _Engine:
    error = None

    def __init__(self, num_waiting: int):
        self.num_waiting = num_waiting


class _State:
    def __init__(self, engine):
        self.engine = engine


def test_the_runner_holds_back_while_requests_wait_and_caps_concurrency(tmp_path, monkeypatch):
    store = BatchStore(tmp_path)
    batch = started_batch(store, 10)
    state = _State(_Engine(num_waiting=1))
    sent = []

    async def never_answers(state, principal, body, *, chat):
        sent.append((principal.tenant, body["prompt"], chat))
        await asyncio.Event().wait()

    monkeypatch.setattr("loragate.gateway.batch_runner.complete", never_answers)

    async def main():
        runner = BatchRunner(state, store, RunnerLease(store), max_concurrency=3)
        assert await runner._feed(batch) == HOLD_BACK_POLL_S and runner.num_running_lines == 0
        state.engine.num_waiting = 0
        await runner._feed(batch)
        assert runner.num_running_lines == 3
        await runner._feed(batch)  # full: nothing more
        await asyncio.sleep(0.05)
        assert runner.num_running_lines == 3 and sent == [("tenant-a", "t5", False)] * 3
        await runner.stop()

    asyncio.run(main())
    assert len(store.pending_lines(batch.id, 100)) == 10  # aborted lines stay pending


def test_a_batch_past_its_window_expires_and_a_cancelled_validating_batch_runs_nothing(tmp_path, monkeypatch):
    store = BatchStore(tmp_path)
    file = store.add_file("t", "batch", "in.jsonl", ["\n".join(request_line(f"c{i}") for i in range(3)).encode()])
    late = store.create_batch("t", ENDPOINT, file.id, "24h", 0, None)  # its window is already over
    validate_batch(store, late, 10)
    early = store.create_batch("t", ENDPOINT, file.id, "24h", 86400, None)
    store.request_cancel(early.id)
    sent = []

    async def record(state, principal, body, *, chat):
        sent.append(body)

    monkeypatch.setattr("loragate.gateway.batch_runner.complete", record)

    async def main():
        runner = BatchRunner(_State(_Engine(num_waiting=0)), store, RunnerLease(store))
        await runner._tick()
        await runner._tick()

    asyncio.run(main())
    expired = store.get_batch(late.id)
    assert expired.status == "expired" and expired.output_file_id is None
    errors = [json.loads(x)["error"]["code"] for x in store.file_path(expired.error_file_id).read_text().splitlines()]
    assert errors == ["batch_expired"] * 3
    cancelled = store.get_batch(early.id)
    assert cancelled.status == "cancelled" and cancelled.output_file_id is cancelled.error_file_id is None
    assert sent == [] and store.request_counts(early.id)["completed"] == 0
