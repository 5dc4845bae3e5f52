"""An append-only audit log of adapter management (`--audit-log`): who stored, replaced or
deleted which adapter, when, from where, and what came of it, refusals included.

One JSON object per line: `time` (UTC, ISO 8601), `event` (adapter.create, adapter.replace,
adapter.delete, adapter.runtime_load, adapter.runtime_unload), `outcome` (ok or refused),
`status`, `actor` (the caller's tenant, "admin", or null for a key that did not
authenticate), `client` (its address), `tenant` and `adapter` acted on, and on success the
`version` and `sha256` stored; a refusal has `error` (its code and message). Keys never
appear. Each line is one append (O_APPEND) followed by an fsync, so lines from engines that
share the file do not interleave and a line that was written survives a crash; the file is
created readable by its owner only. "-" writes the lines to stderr instead (a container's
log).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import os
import sys
import threading

from .auth import authorization_of
from .errors import APIError, to_api_error
from .request_ids import request_id


class AuditLog:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._fd = None if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fd is None:
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                os.write(self._fd, line.encode())
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def audited(event: str):
    """Decorate an adapter-management handler so each call leaves a line in the server's
    audit log (state.audit; none: nothing is recorded)."""
    def wrap(handler):
        @functools.wraps(handler)
        async def run(request):
            log = request.app.state.server.audit
            if log is None:
                return await handler(request)
            try:
                response = await handler(request)
            except Exception as e:
                await _record(log, request, event, None, to_api_error(e))
                raise
            await _record(log, request, event, response, None)
            return response
        return run
    return wrap


async def _record(log: AuditLog, request, event: str, response, error: APIError | None) -> None:
    state = request.app.state.server
    try:
        principal = state.keys.authenticate(authorization_of(request.headers))
        actor = "admin" if principal.is_admin else principal.tenant
    except APIError:
        principal, actor = None, None
    record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
              "event": event, "outcome": "refused" if error else "ok",
              "status": error.status if error else response.status_code, "actor": actor,
              "client": request.client.host if request.client else None, "request_id": request_id(request),
              **_target(request, principal, response)}
    if error is not None:
        record["error"] = {"code": error.code, "message": error.message}
    await asyncio.to_thread(log.write, record)


def acting_on(request, tenant: str, name: str) -> None:
    """A handler says which adapter the call acts on once it knows (an upload's form, a
    runtime call's lora_name), so a refusal after that point names it too."""
    request.state.audit_target = (tenant, name)


def _target(request, principal, response) -> dict:
    """The tenant and adapter acted on, as the handler said (acting_on), else as far as the
    URL and the key tell; and the version stored, from the answer."""
    answer = {}
    if response is not None and response.media_type == "application/json":
        answer = json.loads(response.body)
    target = getattr(request.state, "audit_target", None)
    if target is None and principal is not None:
        from .adapters_api import _tenant  # it imports this module

        target = (_tenant(request, principal), request.path_params.get("name"))
    tenant, name = target or (None, None)
    out = {"tenant": tenant, "adapter": name}
    if "version" in answer:
        out.update(version=answer["version"], sha256=answer.get("sha256"))
    return out
