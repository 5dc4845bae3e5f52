"""A batch survives kill -9: `loragate serve` runs a 50-line batch, is SIGKILLed half-way,
and restarts on the same LORAGATE_HOME. The restarted server runs only the unfinished lines;
the output file then has exactly one line per custom_id, the lines finished before the kill
exactly as they were committed, and every answer equal to the greedy interactive one."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from loragate.gateway.batch_store import BatchStore

from .conftest import AUTH, TinyServer

NUM_LINES = 50


class Server(TinyServer):
    def batch(self, batch_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/batches/{batch_id}", headers=AUTH, timeout=10).json()


def body(i: int) -> dict:
    # ignore_eos: every line generates all its tokens, so the batch lasts a few seconds.
    return {"model": "tiny", "prompt": f"t{20 + i} t{100 + 7 * i} t{300 + i}", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}


async def interactive_answers(url: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=120) as client:
        responses = await asyncio.gather(*(client.post(url + "/v1/completions", json=body(i), headers=AUTH)
                                           for i in range(NUM_LINES)))
    return [r.json() for r in responses]


def test_kill_9_mid_batch_then_restart_loses_and_repeats_no_line(tiny_llama, tmp_path):
    home, log = tmp_path / "home", tmp_path / "server.log"
    server = Server(Path(tiny_llama), home, log)
    try:
        data = "".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                                   "body": body(i)}) + "\n" for i in range(NUM_LINES)).encode()
        file_id = httpx.post(server.url + "/v1/files", headers=AUTH, data={"purpose": "batch"},
                             files={"file": ("in.jsonl", data)}, timeout=30).json()["id"]
        batch_id = httpx.post(server.url + "/v1/batches", headers=AUTH, timeout=30, json={
            "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}).json()["id"]
        deadline = time.time() + 120
        while server.batch(batch_id)["request_counts"]["completed"] < 3:
            assert time.time() < deadline, "the batch made no progress"
            time.sleep(0.05)
        server.proc.kill()  # SIGKILL: no shutdown code runs
        server.proc.wait()
    finally:
        server.stop()

    store = BatchStore(home / "batches")  # the server is dead: read what it had committed
    counts = store.request_counts(batch_id)
    before = {line.line_no for line in store.pending_lines(batch_id, NUM_LINES)}
    committed = dict(store._rows("SELECT line_no, result FROM batch_lines WHERE batch_id = ? AND state = ?",
                                 (batch_id, "succeeded")))
    store.close()
    assert counts["total"] == NUM_LINES and 3 <= counts["completed"] < NUM_LINES, counts
    assert len(before) == NUM_LINES - counts["completed"] == NUM_LINES - len(committed)

    server = Server(Path(tiny_llama), home, log)
    try:
        deadline = time.time() + 300
        while (batch := server.batch(batch_id))["status"] != "completed":
            assert batch["status"] in ("in_progress", "finalizing") and time.time() < deadline, batch
            time.sleep(0.2)
        assert batch["request_counts"] == {"total": NUM_LINES, "completed": NUM_LINES, "failed": 0}
        text = httpx.get(f"{server.url}/v1/files/{batch['output_file_id']}/content", headers=AUTH, timeout=30).text
        lines = text.splitlines()
        outputs = [json.loads(x) for x in lines]
        assert [o["custom_id"] for o in outputs] == [f"req-{i}" for i in range(NUM_LINES)]
        for line_no, result in committed.items():  # finished before the kill: kept, not run again
            assert lines[line_no - 1] == result
        expected = asyncio.run(interactive_answers(server.url))
        for out, want in zip(outputs, expected, strict=True):
            got = out["response"]["body"]
            assert out["response"]["status_code"] == 200 and got["usage"] == want["usage"]
            assert [(c["text"], c["finish_reason"]) for c in got["choices"]] == \
                   [(c["text"], c["finish_reason"]) for c in want["choices"]]
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()
