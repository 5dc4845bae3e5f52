"""Batches (and stored responses) in a fleet: two `loragate serve --role engine` sharing one
LORAGATE_HOME (so one batch database) behind a `--role router`. A batch created through the router is run by
exactly one engine (the lease holder); SIGKILL that engine mid-batch and the other one takes
the batch over and finishes it: every line answered once, none lost, none run twice."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import httpx
import pytest

from loragate.gateway.batch_store import BatchStore

from .conftest import ServeProcess, stop_all, wait_until

# slow: three server processes, like tests/e2e/test_router.py; it runs in CI like every test.
pytestmark = pytest.mark.slow

AUTH = {"Authorization": "Bearer key-a"}
NUM_LINES = 40


def lease_holder_pid(db_path: Path) -> int | None:
    with sqlite3.connect(db_path, timeout=30) as db:
        row = db.execute("SELECT pid FROM runner_lease WHERE id = 1").fetchone()
    return row[0] if row else None


def test_the_other_engine_finishes_a_batch_whose_engine_was_killed(tiny_llama, tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, LORAGATE_HOME=str(home), LORAGATE_API_KEYS="key-a=tenant-a")
    engines = [ServeProcess(["--role", "engine", "--model", str(tiny_llama), "--dtype", "float32", "--num-threads", "1",
                             "--served-model-name", "tiny"], env, tmp_path / f"engine{i}.log") for i in range(2)]
    router = ServeProcess(["--role", "router", "--engine-urls", ",".join(e.url for e in engines),
                           "--health-interval", "0.5"], env, tmp_path / "router.log")
    router_url = router.url
    procs = [*engines, router]
    try:
        wait_until(lambda: len(httpx.get(router_url + "/readyz", timeout=2).json().get("engines", [])) == 2,
                   "both engines behind the router", procs, timeout=120)
        # Stored responses live in the shared home too: either engine continues one the other stored.
        first = httpx.post(router_url + "/v1/responses", headers=AUTH, timeout=60,
                           json={"model": "tiny", "input": "t3 t4", "max_output_tokens": 4, "temperature": 0}).json()
        for engine in engines:
            r = httpx.post(engine.url + "/v1/responses", headers=AUTH, timeout=60, json={
                "model": "tiny", "input": "t5", "max_output_tokens": 4, "temperature": 0,
                "previous_response_id": first["id"]})
            assert r.status_code == 200 and r.json()["previous_response_id"] == first["id"], r.text
            assert httpx.get(f"{engine.url}/v1/responses/{first['id']}", headers=AUTH, timeout=10).json() == first
        body = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        data = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                   "body": dict(body, prompt=f"t{5 + i} t6")}) + "\n" for i in range(NUM_LINES))
        r = httpx.post(router_url + "/v1/files", headers=AUTH, data={"purpose": "batch"},
                       files={"file": ("in.jsonl", data.encode())}, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(router_url + "/v1/batches", headers=AUTH, timeout=30, json={
            "input_file_id": r.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
        assert r.status_code == 200, r.text
        batch_id = r.json()["id"]

        def batch() -> dict:
            return httpx.get(f"{router_url}/v1/batches/{batch_id}", headers=AUTH, timeout=10).json()

        wait_until(lambda: batch()["request_counts"]["completed"] >= 3, "the first lines", procs, timeout=120)
        holder = lease_holder_pid(home / "batches" / "batches.db")
        victim = next(e for e in engines if e.proc.pid == holder)  # exactly one engine runs the lines
        victim.proc.kill()
        victim.proc.wait()
        procs.remove(victim)
        store = BatchStore(home / "batches")
        committed = dict(store._rows("SELECT line_no, result FROM batch_lines WHERE batch_id = ? AND state = ?",
                                     (batch_id, "succeeded")))
        store.close()
        assert 3 <= len(committed) < NUM_LINES

        final = wait_until(lambda: (b := batch())["status"] == "completed" and b, "the batch to complete", procs,
                           timeout=120)
        assert final["request_counts"] == {"total": NUM_LINES, "completed": NUM_LINES, "failed": 0}
        survivor = next(e for e in engines if e is not victim)
        assert lease_holder_pid(home / "batches" / "batches.db") == survivor.proc.pid
        text = httpx.get(f"{router_url}/v1/files/{final['output_file_id']}/content", headers=AUTH, timeout=30).text
        lines = text.splitlines()
        assert [json.loads(x)["custom_id"] for x in lines] == [f"r{i}" for i in range(NUM_LINES)]
        for line_no, result in committed.items():
            assert lines[line_no - 1] == result  # finished before the kill: kept as committed
        one = httpx.post(router_url + "/v1/completions", headers=AUTH, timeout=60, json=dict(body, prompt="t5 t6"))
        assert json.loads(lines[0])["response"]["body"]["choices"][0]["text"] == one.json()["choices"][0]["text"]
    finally:
        stop_all(procs)
