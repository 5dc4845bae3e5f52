"""Stored responses of the Responses API (`store`, on by default as in OpenAI's API): what
`previous_response_id` continues from, and what GET and DELETE /v1/responses/{id} and GET
/v1/responses/{id}/input_items serve.

SQLite in `<root>/responses.db`, one row per response, written once when the response has
completed (a failed or cancelled one is never stored, so a conversation never continues
from half an answer). A row keeps the response object as it was returned and the
conversation it closes, as chat messages: the earlier conversation, this request's input
and its answer, without the instructions, which OpenAI does not carry over either. So a
continuation reads one row, however long the conversation. Rows older than the retention
(30 days by default, as OpenAI keeps stored responses) are deleted. So are a tenant's oldest
rows once its rows hold more than `max_bytes_per_tenant` (a row keeps its whole conversation,
so a long one grows the store quadratically): one tenant cannot fill the disk that every
tenant's responses share. The newest row is always kept.

Engines of a fleet may share one root (one LORAGATE_HOME volume), as with the batch store:
the rollback journal and BEGIN IMMEDIATE keep concurrent writers safe. Every method blocks
and is thread-safe (one connection behind a lock): async code calls them through
asyncio.to_thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DAY_S = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL,
    response TEXT NOT NULL, conversation TEXT NOT NULL, input_items TEXT NOT NULL DEFAULT '[]',
    size INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""
_TENANT_INDEX = "CREATE INDEX IF NOT EXISTS responses_by_tenant ON responses (tenant, created_at)"
_SIZE = "length(response) + length(conversation) + length(input_items)"


@dataclass(frozen=True)
class StoredResponse:
    id: str
    tenant: str
    response: dict  # the response object as returned
    conversation: list[dict]  # chat messages: the conversation up to and including this answer
    input_items: list[dict]  # the request's input, as Responses items with ids


class ResponseStore:
    def __init__(self, root: str | os.PathLike, retention_days: int = 30, max_bytes_per_tenant: int = 0):
        self.retention_s = retention_days * DAY_S
        self.max_bytes_per_tenant = max_bytes_per_tenant  # 0: no limit
        Path(root).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(Path(root) / "responses.db", check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "input_items" not in columns:  # a store written before input items were kept
            self._db.execute("ALTER TABLE responses ADD COLUMN input_items TEXT NOT NULL DEFAULT '[]'")
        if "size" not in columns:  # a store written before sizes were kept
            self._db.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            self._db.execute(f"UPDATE responses SET size = {_SIZE}")
        self._db.execute(_TENANT_INDEX)
        self._pruned_at = 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, tenant: str, response: dict, conversation: list[dict], input_items: list[dict] = ()) -> None:
        if time.time() - self._pruned_at > 3600:  # at most hourly: the first write, then now and then
            self.prune()
        row = (json.dumps(response), json.dumps(conversation), json.dumps(list(input_items)))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the insert and the evictions it causes, at once
            try:
                self._db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (response["id"], tenant, response["created_at"], *row, sum(map(len, row))))
                if self.max_bytes_per_tenant:
                    self._evict_oldest(tenant, keep=response["id"])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _evict_oldest(self, tenant: str, keep: str) -> None:
        """Delete the tenant's oldest rows (not `keep`) while its rows hold more than the cap."""
        total = self._db.execute("SELECT SUM(size) FROM responses WHERE tenant = ?", (tenant,)).fetchone()[0]
        if total <= self.max_bytes_per_tenant:
            return
        doomed = []
        for response_id, size in self._db.execute(
                "SELECT id, size FROM responses WHERE tenant = ? AND id != ? ORDER BY created_at, rowid",
                (tenant, keep)):
            if total <= self.max_bytes_per_tenant:
                break
            doomed.append((response_id,))
            total -= size
        self._db.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM responses WHERE tenant = ?",
                                    (tenant,)).fetchone()[0]

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute("SELECT tenant, response, conversation, input_items FROM responses WHERE id = ?",
                                   (response_id,)).fetchone()
        if row is None:
            return None
        return StoredResponse(response_id, row[0], *(json.loads(column) for column in row[1:]))

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def prune(self, now: float | None = None) -> int:
        """Delete the responses older than the retention; how many went."""
        now = time.time() if now is None else now
        self._pruned_at = now
        cutoff = int(now - self.retention_s)
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE created_at < ?", (cutoff,)).rowcount
