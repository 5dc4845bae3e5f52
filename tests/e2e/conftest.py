"""Real `loragate serve` processes for the end-to-end tests: start one on a free port, wait
for a condition while checking that none of them died (and saying why from its log), stop
them without leaving orphans."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx

AUTH = {"Authorization": "Bearer key-a"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`loragate serve *args --port <free port>` in a subprocess; its stderr is appended to
    `log`, so a restart on the same log keeps the first run's output."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as stderr:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loragate.gateway.cli", "serve", *args, "--port", str(self.port)],
                env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop_all([self])


def wait_until(predicate: Callable[[], object], what: str, servers: Iterable[ServeProcess], timeout: float = 60):
    """predicate()'s first truthy value; fails at once, with its log, if a server exits first.
    Connection errors count as "not yet": a server opens its port some time after it starts."""
    servers, deadline = list(servers), time.time() + timeout
    while time.time() < deadline:
        for s in servers:
            if s.proc.poll() is not None:
                raise AssertionError(f"{what}: {s.url} exited ({s.proc.returncode}):\n{s.log_tail()}")
        try:
            value = predicate()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    logs = "".join(f"\n--- {s.log}:\n{s.log_tail()}" for s in servers)
    raise AssertionError(f"timed out waiting for {what}{logs}")


def stop_all(servers: Iterable[ServeProcess]) -> None:
    """SIGTERM every live server first (they shut down in parallel), then reap each; SIGKILL
    one that has not exited after 20 s."""
    servers = list(servers)
    for s in servers:
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in servers:
        try:
            s.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


class TinyServer(ServeProcess):
    """One `loragate serve` over the tiny model (fp32, tenant-a's key), ready when constructed."""

    def __init__(self, model_dir: Path, home: Path, log: Path):
        env = dict(os.environ, LORAGATE_HOME=str(home), LORAGATE_API_KEYS="key-a=tenant-a")
        super().__init__(["--model", str(model_dir), "--dtype", "float32", "--num-threads", "1",
                          "--served-model-name", "tiny"], env, log)
        try:
            wait_until(lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 200, "the server to be ready",
                       [self], timeout=90)
        except BaseException:
            self.stop()  # no orphaned server when start-up fails
            raise
