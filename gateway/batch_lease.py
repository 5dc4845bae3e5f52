"""Which process runs the batches: engines that share one LORAGATE_HOME (a fleet behind the
router) share one batch database, and exactly one of them may feed its lines to an engine.

The holder renews a lease row on every pass; the others only poll. A holder that stops
cleanly releases it. One that died is replaced when its lease runs out, or at once when it
is known dead: same host and its pid no longer running, or same host and same pid as the
new process (a restarted container, whose main process has the same pid again)."""

from __future__ import annotations

import os
import socket
import time
import uuid

LEASE_TTL_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runner_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1), owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    expires_at REAL NOT NULL);
"""


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


class RunnerLease:
    def __init__(self, store, ttl_s: float = LEASE_TTL_S):
        self.store, self.ttl_s = store, ttl_s
        self.owner, self.host, self.pid = uuid.uuid4().hex, socket.gethostname(), os.getpid()
        self._renewed_at: float | None = None  # time.monotonic() of our last successful acquire
        with store.transaction() as db:
            db.execute(_SCHEMA)

    def _is_stale(self, row, now: float) -> bool:
        if row["expires_at"] < now:
            return True
        return row["host"] == self.host and (row["pid"] == self.pid or not _is_running(row["pid"]))

    def acquire(self) -> bool:
        """Take or renew the lease; False while another live process holds it. Blocking."""
        if self._renewed_at is not None and time.monotonic() - self._renewed_at < self.ttl_s / 3:
            return True  # renewed recently: spare the database a write on every pass
        self._renewed_at = None
        now = time.time()
        with self.store.transaction() as db:
            row = db.execute("SELECT owner, host, pid, expires_at FROM runner_lease WHERE id = 1").fetchone()
            if row is not None and row["owner"] != self.owner and not self._is_stale(row, now):
                return False
            db.execute("INSERT OR REPLACE INTO runner_lease (id, owner, host, pid, expires_at) VALUES (1, ?, ?, ?, ?)",
                       (self.owner, self.host, self.pid, now + self.ttl_s))
        self._renewed_at = time.monotonic()
        return True

    def release(self) -> None:
        self._renewed_at = None
        with self.store.transaction() as db:
            db.execute("DELETE FROM runner_lease WHERE id = 1 AND owner = ?", (self.owner,))
