"""Durable state of the batch API: uploaded files, batches, and one row per input line.

SQLite in `<root>/batches.db`; file bytes live next to it in `<root>/files/` (batch_files.py:
complete before their row commits). Each line's result is committed on its own, and only
while the line is still pending (primary key (batch_id, line_no)): a kill -9 loses at most
the lines in flight, and a restart runs exactly those again, so no line is lost or written
twice.

Engines of a fleet may share one root (one LORAGATE_HOME volume): SQLite's locks serialise
their writes, and the rollback journal (not WAL, whose shared memory needs every process on
one host) keeps that true on a shared volume with working POSIX locks. batch_lease.py picks
the one process that runs lines. Every method blocks and is thread-safe (one connection
behind a lock): async code calls them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from collections.abc import Callable, Iterable

from .batch_files import FileBytes

VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
# Line states; a line's `result` is its output-file line (succeeded) or error-file line (failed, expired).
PENDING, SUCCEEDED, LINE_FAILED, LINE_CANCELLED, LINE_EXPIRED = "pending", "succeeded", "failed", "cancelled", "expired"
ORPHAN_MIN_AGE_S = 600.0  # unreferenced file bytes younger than this may still be another process's
TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
              "cancelled_at")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
    endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    status TEXT NOT NULL, metadata TEXT, errors TEXT, output_file_id TEXT, error_file_id TEXT,
    created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, {", ".join(t + " INTEGER" for t in TIMESTAMPS)});
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT, body TEXT,
    state TEXT NOT NULL, result TEXT, PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_lines_by_state ON batch_lines (batch_id, state, line_no);
"""


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int


@dataclass(frozen=True)
class BatchRecord:
    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: dict | None
    errors: list | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None


@dataclass(frozen=True)
class PendingLine:
    line_no: int
    custom_id: str
    body: str  # JSON text of the request body


class BatchConflict(Exception):
    """The batch is in a state that does not allow the change asked for."""


def _record(cls, row: sqlite3.Row):
    values = {f.name: row[f.name] for f in fields(cls)}
    if cls is BatchRecord:
        values["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
        values["errors"] = json.loads(row["errors"]) if row["errors"] else None
    return cls(**values)


class BatchStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.files = FileBytes(self.root / "files")
        self._path = self.root / "batches.db"
        self._lock = threading.Lock()
        # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE of transaction().
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=FULL")  # a committed line result survives even a power cut
        self._db.executescript(_SCHEMA)
        self.remove_orphan_files()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def remove_orphan_files(self, min_age_s: float = ORPHAN_MIN_AGE_S) -> int:
        return self.files.remove_orphans({r["id"] for r in self._rows("SELECT id FROM files")}, min_age_s)

    def file_path(self, file_id: str) -> Path:
        return self.files.path(file_id)

    # ---- files ----

    def add_file(self, tenant: str, purpose: str, filename: str, chunks: Iterable[bytes]) -> FileRecord:
        """Store the bytes `chunks` yields (it may raise to refuse them: nothing is kept)."""
        file_id, num_bytes = self.files.write_new(chunks)
        record = FileRecord(file_id, tenant, purpose, filename, num_bytes, int(time.time()))
        try:
            with self.transaction() as db:
                self._insert_file(db, record)
        except BaseException:
            self.files.remove(file_id)
            raise
        return record

    @staticmethod
    def _insert_file(db: sqlite3.Connection, r: FileRecord) -> None:
        db.execute("INSERT INTO files (id, tenant, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (r.id, r.tenant, r.purpose, r.filename, r.bytes, r.created_at))

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._rows("SELECT * FROM files WHERE id = ?", (file_id,))
        return _record(FileRecord, rows[0]) if rows else None

    def list_files(self, tenant: str | None, purpose: str | None, limit: int, after: str | None,
                   ascending: bool = False) -> tuple[list[FileRecord], bool]:
        rows = self._page("files", tenant, limit, after, ascending, ("purpose", purpose))
        return [_record(FileRecord, r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        with self.transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount == 1
        self.files.remove(file_id)
        return deleted

    def _page(self, table: str, tenant: str | None, limit: int, after: str | None, ascending: bool,
              extra: tuple[str, str | None] = ("1", None)) -> list[sqlite3.Row]:
        """Rows newest first (or oldest first), starting after the row whose id is `after`;
        one row beyond `limit` tells the caller whether there are more."""
        where, args = ["(? IS NULL OR tenant = ?)", f"(? IS NULL OR {extra[0]} = ?)"], [tenant, tenant, extra[1], extra[1]]
        if after is not None:
            cursor = self._rows(f"SELECT seq FROM {table} WHERE id = ?", (after,))
            if not cursor:
                raise KeyError(after)
            where.append("seq > ?" if ascending else "seq < ?")
            args.append(cursor[0]["seq"])
        sql = (f"SELECT * FROM {table} WHERE {' AND '.join(where)} ORDER BY seq {'ASC' if ascending else 'DESC'} "
               "LIMIT ?")
        return self._rows(sql, (*args, limit + 1))

    # ---- batches ----

    def create_batch(self, tenant: str, endpoint: str, input_file_id: str, completion_window: str,
                     window_seconds: int, metadata: dict | None) -> BatchRecord:
        now = int(time.time())
        record = BatchRecord("batch_" + uuid.uuid4().hex, tenant, endpoint, input_file_id, completion_window,
                             VALIDATING, metadata, None, None, None, now, now + window_seconds)
        with self.transaction() as db:
            db.execute("INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, "
                       "metadata, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.id, tenant, endpoint, input_file_id, completion_window, VALIDATING,
                        json.dumps(metadata) if metadata is not None else None, now, record.expires_at))
        return record

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        rows = self._rows("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _record(BatchRecord, rows[0]) if rows else None

    def list_batches(self, tenant: str | None, limit: int, after: str | None, endpoint: str | None = None,
                     ascending: bool = False) -> tuple[list[BatchRecord], bool]:
        rows = self._page("batches", tenant, limit, after, ascending, ("endpoint", endpoint))
        return [_record(BatchRecord, r) for r in rows[:limit]], len(rows) > limit

    def active_batches(self) -> list[BatchRecord]:
        marks = ", ".join("?" * len(ACTIVE))
        return [_record(BatchRecord, r) for r in
                self._rows(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)]

    def request_counts(self, batch_id: str) -> dict:
        row = self._rows("SELECT COUNT(*) AS total, COALESCE(SUM(state = ?), 0) AS completed, "
                         "COALESCE(SUM(state IN (?, ?)), 0) AS failed FROM batch_lines WHERE batch_id = ?",
                         (SUCCEEDED, LINE_FAILED, LINE_EXPIRED, batch_id))[0]
        return {"total": row["total"], "completed": row["completed"], "failed": row["failed"]}

    def line_states(self, batch_id: str) -> dict[str, int]:  # {state: lines in it}, for those with any
        sql = "SELECT state, COUNT(*) AS n FROM batch_lines WHERE batch_id = ? GROUP BY state"
        return {r["state"]: r["n"] for r in self._rows(sql, (batch_id,))}

    def line_results(self, batch_id: str, after: int, limit: int) -> list[tuple]:  # (line_no, custom_id, state, result)
        sql = "SELECT * FROM batch_lines WHERE batch_id = ? AND line_no > ? ORDER BY line_no LIMIT ?"
        return [(r["line_no"], r["custom_id"], r["state"], r["result"]) for r in self._rows(sql, (batch_id, after, limit))]

    def delete_batch(self, batch_id: str) -> None:
        """A finished batch, its lines and its files (the input's too) gone."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row["status"] in ACTIVE:
                raise BatchConflict(row["status"])
            files = [row[f] for f in ("input_file_id", "output_file_id", "error_file_id") if row[f]]
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
            db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            db.executemany("DELETE FROM files WHERE id = ?", [(f,) for f in files])
        for file_id in files:
            self.files.remove(file_id)

    def request_cancel(self, batch_id: str) -> BatchRecord:
        with self.transaction() as db:
            status = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()["status"]
            if status in (VALIDATING, IN_PROGRESS):
                db.execute("UPDATE batches SET status = ?, cancelling_at = ? WHERE id = ?",
                           (CANCELLING, int(time.time()), batch_id))
            elif status not in (CANCELLING, CANCELLED):
                raise BatchConflict(status)
        return self.get_batch(batch_id)

    def start_batch(self, batch_id: str, lines: Iterable[tuple[int, str | None, str | None, str, str | None]]) -> None:
        """Validation done: store (line_no, custom_id, body, state, result) rows, all or none, and
        move to in_progress (a batch cancelled meanwhile stays cancelling)."""
        with self.transaction() as db:
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
            db.executemany("INSERT INTO batch_lines (batch_id, line_no, custom_id, body, state, result) "
                           "VALUES (?, ?, ?, ?, ?, ?)", ((batch_id, *line) for line in lines))
            db.execute("UPDATE batches SET status = ?, in_progress_at = ? WHERE id = ? AND status = ?",
                       (IN_PROGRESS, int(time.time()), batch_id, VALIDATING))

    def fail_batch(self, batch_id: str, errors: list[dict]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE batches SET status = ?, failed_at = ?, errors = ? WHERE id = ? AND status IN (?, ?)",
                       (FAILED, int(time.time()), json.dumps(errors), batch_id, VALIDATING, CANCELLING))

    def pending_lines(self, batch_id: str, limit: int) -> list[PendingLine]:
        rows = self._rows("SELECT line_no, custom_id, body FROM batch_lines WHERE batch_id = ? AND state = ? "
                          "ORDER BY line_no LIMIT ?", (batch_id, PENDING, limit))
        return [PendingLine(r["line_no"], r["custom_id"], r["body"]) for r in rows]

    def record_line(self, batch_id: str, line_no: int, state: str, result: str) -> bool:
        """Commit one line's outcome; False if it was no longer pending (then nothing changes)."""
        with self.transaction() as db:
            return db.execute("UPDATE batch_lines SET state = ?, result = ? WHERE batch_id = ? AND line_no = ? "
                              "AND state = ?", (state, result, batch_id, line_no, PENDING)).rowcount == 1

    def close_pending_lines(self, batch_id: str, state: str, result_for: Callable[[str], str] | None) -> None:
        """Mark every pending line `state` (cancelled or expired), with `result_for(custom_id)` as result."""
        with self.transaction() as db:
            rows = db.execute("SELECT line_no, custom_id FROM batch_lines WHERE batch_id = ? AND state = ?",
                              (batch_id, PENDING)).fetchall()
            db.executemany("UPDATE batch_lines SET state = ?, result = ? WHERE batch_id = ? AND line_no = ?",
                           [(state, result_for(r["custom_id"]) if result_for else None, batch_id, r["line_no"])
                            for r in rows])

    def finalize(self, batch_id: str) -> BatchRecord:
        """Write the output and error files of a batch with no pending line left, and give it
        its final status: cancelled if it was cancelling, expired if lines expired, else completed.
        Idempotent, so a crash half-way is repaired by calling it again."""
        now = int(time.time())
        with self.transaction() as db:
            status = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()["status"]
            if status == IN_PROGRESS:
                db.execute("UPDATE batches SET status = ?, finalizing_at = ? WHERE id = ?", (FINALIZING, now, batch_id))
            elif status not in (FINALIZING, CANCELLING):
                return self._get_locked(db, batch_id)
            if db.execute("SELECT 1 FROM batch_lines WHERE batch_id = ? AND state = ? LIMIT 1",
                          (batch_id, PENDING)).fetchone():
                raise BatchConflict(f"batch {batch_id} still has pending lines")
            num_expired = db.execute("SELECT COUNT(*) FROM batch_lines WHERE batch_id = ? AND state = ?",
                                     (batch_id, LINE_EXPIRED)).fetchone()[0]
        tenant = self.get_batch(batch_id).tenant
        written = {kind: self._write_results(batch_id, states)
                   for kind, states in (("output", (SUCCEEDED,)), ("error", (LINE_FAILED, LINE_EXPIRED)))}
        final, stamp = ((CANCELLED, "cancelled_at") if status == CANCELLING else
                        (EXPIRED, "expired_at") if num_expired else (COMPLETED, "completed_at"))
        try:
            with self.transaction() as db:
                for kind, (file_id, num_bytes) in written.items():
                    if file_id is not None:
                        name = f"{batch_id}_{kind}.jsonl"
                        self._insert_file(db, FileRecord(file_id, tenant, "batch_output", name, num_bytes, now))
                db.execute(f"UPDATE batches SET status = ?, {stamp} = ?, output_file_id = ?, error_file_id = ? "
                           "WHERE id = ?", (final, now, written["output"][0], written["error"][0], batch_id))
                return self._get_locked(db, batch_id)
        except BaseException:
            for file_id, _ in written.values():
                if file_id is not None:
                    self.files.remove(file_id)
            raise

    def _write_results(self, batch_id: str, states: tuple[str, ...]) -> tuple[str | None, int]:
        """(file id, size) of a new file of these lines' results in line order; (None, 0) if none."""
        marks = ", ".join("?" * len(states))
        sql = (f"SELECT line_no, result FROM batch_lines WHERE batch_id = ? AND state IN ({marks}) "
               "AND result IS NOT NULL AND line_no > ? ORDER BY line_no LIMIT 1000")
        if not self._rows(sql, (batch_id, *states, 0)):
            return None, 0

        def chunks():
            # Page by page, each read short: a large batch never holds the lock (or the
            # database, for the other processes) for the whole write.
            after = 0
            while rows := self._rows(sql, (batch_id, *states, after)):
                yield "".join(r["result"] + "\n" for r in rows).encode()
                after = rows[-1]["line_no"]

        return self.files.write_new(chunks())

    def _get_locked(self, db: sqlite3.Connection, batch_id: str) -> BatchRecord:
        return _record(BatchRecord, db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone())
