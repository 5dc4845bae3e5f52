"""The batch API over HTTP: a batch's answers equal the interactive ones, bad lines land in the
error file while the others run, cancel, tenant isolation, and refused requests."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def jsonl(entries) -> bytes:
    return "".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries).encode()


def line(custom_id, body, url=COMPLETIONS):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(server, data: bytes, key="key-a", purpose="batch"):
    return httpx.post(server.url + "/v1/files", headers=server.headers(key), data={"purpose": purpose},
                      files={"file": ("in.jsonl", data)}, timeout=30)


def create(server, file_id, endpoint=COMPLETIONS, key="key-a", **extra):
    return httpx.post(server.url + "/v1/batches", headers=server.headers(key), timeout=30,
                      json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra})


def get(server, path, key="key-a"):
    return httpx.get(server.url + path, headers=server.headers(key), timeout=30)


def wait_for(server, batch_id, statuses=("completed", "failed", "cancelled", "expired"), key="key-a", timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = get(server, f"/v1/batches/{batch_id}", key).json()
        if batch["status"] in statuses:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch['status']} after {timeout}s")


def content_lines(server, file_id, key="key-a") -> list[dict]:
    r = get(server, f"/v1/files/{file_id}/content", key)
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines()]


def run_batch(server, entries, endpoint=COMPLETIONS, key="key-a") -> dict:
    r = upload(server, jsonl(entries), key)
    assert r.status_code == 200, r.text
    r = create(server, r.json()["id"], endpoint, key)
    assert r.status_code == 200, r.text
    return wait_for(server, r.json()["id"], key=key)


def tokens(choice: dict, chat: bool) -> list[str] | None:
    logprobs = choice["logprobs"]
    if logprobs is None:
        return None
    return [t["token"] for t in logprobs["content"]] if chat else logprobs["tokens"]


def assert_same_answer(batch_body: dict, interactive: dict, chat: bool):
    """Same choices (text, tokens, finish reason) and usage; ids and timestamps differ."""
    assert batch_body["object"] == interactive["object"] and batch_body["model"] == interactive["model"]
    assert batch_body["usage"] == interactive["usage"]
    key = "message" if chat else "text"
    for got, want in zip(batch_body["choices"], interactive["choices"], strict=True):
        assert (got["index"], got[key], got["finish_reason"]) == (want["index"], want[key], want["finish_reason"])
        assert tokens(got, chat) == tokens(want, chat)


def test_fifty_line_chat_batch_with_the_openai_client_equals_interactive_answers(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
    bodies = {f"req-{i}": {"model": "tiny", "messages": [{"role": "user", "content": f"t{10 + i} t{70 + 3 * i} t9"}],
                           "max_tokens": 4 + i % 7, "temperature": 0, **({"logprobs": True} if i % 2 else {})}
              for i in range(50)}
    entries = [line(cid, body, CHAT) for cid, body in bodies.items()]
    uploaded = client.files.create(file=("in.jsonl", jsonl(entries)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(entries))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h",
                                  metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    deadline = time.time() + 180
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.time() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (50, 50, 0)
    assert batch.error_file_id is None and batch.completed_at >= batch.in_progress_at >= batch.created_at
    outputs = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in outputs] == list(bodies)  # one per line, in input order
    for out in outputs:
        assert out["error"] is None and out["response"]["status_code"] == 200 and out["id"].startswith("batch_req_")
        interactive = httpx.post(server.url + CHAT, json=bodies[out["custom_id"]], headers=server.headers(), timeout=30)
        assert_same_answer(out["response"]["body"], interactive.json(), chat=True)
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_a_responses_batch_equals_interactive_responses(server):
    bodies = {f"r{i}": {"model": "tiny", "input": f"t{10 + i} t{40 + i}", "instructions": "t7", "max_output_tokens": 3 + i,
                        "temperature": 0} for i in range(4)}
    bodies["bad"] = {"model": "tiny", "input": "t3", "conversation": "conv_1"}
    batch = run_batch(server, [line(cid, body, "/v1/responses") for cid, body in bodies.items()], "/v1/responses")
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    outputs = {o["custom_id"]: o for o in content_lines(server, batch["output_file_id"])}
    for cid, body in bodies.items():
        if cid == "bad":
            continue
        got = outputs[cid]["response"]["body"]
        want = httpx.post(server.url + "/v1/responses", json=body, headers=server.headers(), timeout=30).json()
        assert got["object"] == "response" and got["output"][0]["content"] == want["output"][0]["content"]
        assert (got["status"], got["usage"]) == (want["status"], want["usage"])
    [error] = content_lines(server, batch["error_file_id"])
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "conversation"


def test_an_embeddings_batch_equals_interactive_embeddings(server):
    bodies = {f"e{i}": {"model": "tiny", "input": [f"t{10 + i} t{40 + i}", "t5"]} for i in range(3)}
    bodies["bad"] = {"model": "tiny", "input": "t5", "dimensions": 0}
    batch = run_batch(server, [line(cid, body, "/v1/embeddings") for cid, body in bodies.items()], "/v1/embeddings")
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    outputs = {o["custom_id"]: o["response"]["body"] for o in content_lines(server, batch["output_file_id"])}
    for cid, body in bodies.items():
        if cid != "bad":
            want = httpx.post(server.url + "/v1/embeddings", json=body, headers=server.headers(), timeout=30).json()
            assert outputs[cid]["usage"] == want["usage"] and len(outputs[cid]["data"]) == 2
            for got, expected in zip(outputs[cid]["data"], want["data"]):
                assert got["embedding"] == pytest.approx(expected["embedding"], abs=1e-6)
    [error] = content_lines(server, batch["error_file_id"])
    assert error["custom_id"] == "bad" and error["response"]["body"]["error"]["param"] == "dimensions"


@pytest.mark.parametrize("endpoint, body, bad, scores", [
    ("/v1/score", {"model": "tiny", "text_1": "t5 t6", "text_2": ["t5 t7", "t9 t10"]}, {"text_1": ["a", "b", "c"]},
     lambda answer: [(d["index"], d["score"]) for d in answer["data"]]),
    ("/v1/rerank", {"model": "tiny", "query": "t5 t6", "documents": ["t5 t7", "t9 t10"]}, {"query": ""},
     lambda answer: [(r["index"], r["relevance_score"]) for r in answer["results"]]),
])
def test_score_and_rerank_batches_equal_interactive_calls(server, endpoint, body, bad, scores):
    batch = run_batch(server, [line("ok", body, endpoint), line("bad", {**body, **bad}, endpoint)], endpoint)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    [output] = content_lines(server, batch["output_file_id"])
    want = httpx.post(server.url + endpoint, json=body, headers=server.headers(), timeout=30).json()
    assert output["custom_id"] == "ok" and output["response"]["body"]["usage"] == want["usage"]
    (got_order, got), (want_order, wanted) = zip(*scores(output["response"]["body"])), zip(*scores(want))
    assert got_order == want_order and got == pytest.approx(wanted, abs=1e-6)
    [error] = content_lines(server, batch["error_file_id"])
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400


def test_bad_lines_go_to_the_error_file_and_the_others_run(server):
    good = {"model": "tiny", "prompt": "t5 t6", "max_tokens": 5, "temperature": 0}
    hot = dict(good, temperature=5)
    entries = [
        line("a", good),
        "{not json",
        "[" * 3000,  # nested past the JSON parser's limit
        {"method": "POST", "url": COMPLETIONS, "body": good},  # no custom_id
        line("a", good),  # duplicate
        line("b", good, url=CHAT),
        dict(line("c", good), method="GET"),
        line("d", dict(good, stream=True)),
        line("e", hot),
        line("f", dict(good, model="nope")),
        "",
        line("g", dict(good, prompt="t7 t8 t9")),
    ]
    batch = run_batch(server, entries)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 11, "completed": 2, "failed": 9}
    outputs = content_lines(server, batch["output_file_id"])
    assert [o["custom_id"] for o in outputs] == ["a", "g"]
    interactive = httpx.post(server.url + COMPLETIONS, json=good, headers=server.headers()).json()
    assert_same_answer(outputs[0]["response"]["body"], interactive, chat=False)
    errors = content_lines(server, batch["error_file_id"])
    codes = [(e["custom_id"], e["error"] and e["error"]["code"]) for e in errors]
    assert codes == [(None, "invalid_json"), (None, "invalid_json"), (None, "missing_custom_id"),
                     ("a", "duplicate_custom_id"), ("b", "invalid_url"), ("c", "invalid_method"), ("d", "streaming_unsupported"),
                     ("e", None), ("f", None)]
    assert errors[0]["error"]["line"] == 2 and "line 1" in errors[3]["error"]["message"]
    assert all(e["error"]["message"] for e in errors[:7])
    # A request the endpoint refuses: its own status and error body, word for word.
    for entry, body in ((errors[7], hot), (errors[8], dict(good, model="nope"))):
        want = httpx.post(server.url + COMPLETIONS, json=body, headers=server.headers())
        assert entry["response"]["status_code"] == want.status_code and want.status_code in (400, 404)
        assert entry["response"]["body"] == want.json()


def test_cancel_stops_the_unfinished_lines(server):
    slow = {"model": "tiny", "prompt": "t3 t4", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    file_id = upload(server, jsonl(line(f"r{i}", slow) for i in range(40))).json()["id"]
    batch_id = create(server, file_id).json()["id"]
    deadline = time.time() + 120
    while get(server, f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    r = httpx.post(server.url + f"/v1/batches/{batch_id}/cancel", headers=server.headers())
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled") and r.json()["cancelling_at"]
    batch = wait_for(server, batch_id)
    assert batch["status"] == "cancelled" and batch["cancelled_at"]
    done = batch["request_counts"]["completed"]
    assert 1 <= done < 40 and batch["request_counts"]["failed"] == 0
    assert len(content_lines(server, batch["output_file_id"])) == done
    engine = server.state.engine.engine
    deadline = time.time() + 10
    while engine.has_unfinished and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished  # the lines in flight were aborted, the rest never sent
    time.sleep(0.5)
    assert get(server, f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] == done
    again = httpx.post(server.url + f"/v1/batches/{batch_id}/cancel", headers=server.headers())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_a_finished_batch_cannot_be_cancelled(server):
    batch = run_batch(server, [line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 2})])
    r = httpx.post(server.url + f"/v1/batches/{batch['id']}/cancel", headers=server.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "batch_not_cancellable"


def test_other_tenants_see_nothing_and_admin_sees_all(server):
    batch = run_batch(server, [line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 2})])
    file_id, out_id = batch["input_file_id"], batch["output_file_id"]
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/files/{out_id}",
                 f"/v1/batches/{batch['id']}"):
        r = get(server, path, key="key-b")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
    h = server.headers("key-b")
    assert httpx.post(server.url + f"/v1/batches/{batch['id']}/cancel", headers=h).status_code == 404
    assert httpx.delete(server.url + f"/v1/files/{file_id}", headers=h).status_code == 404
    assert create(server, file_id, key="key-b").status_code == 404
    assert file_id not in [f["id"] for f in get(server, "/v1/files", "key-b").json()["data"]]
    assert batch["id"] not in [b["id"] for b in get(server, "/v1/batches", "key-b").json()["data"]]
    assert get(server, f"/v1/batches/{batch['id']}", key="key-admin").status_code == 200
    assert batch["id"] in [b["id"] for b in get(server, "/v1/batches?tenant=tenant-a", "key-admin").json()["data"]]
    assert get(server, f"/v1/files/{file_id}", "key-a").status_code == 200  # untouched by the attempts


def test_list_pagination_and_file_deletion(server):
    ids = [create(server, upload(server, jsonl([line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 1})]))
                  .json()["id"], key="key-a").json()["id"] for _ in range(3)]
    page = get(server, "/v1/batches?limit=2").json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = get(server, f"/v1/batches?limit=2&after={page['last_id']}").json()
    assert rest["data"][0]["id"] == ids[0]
    assert get(server, "/v1/batches?limit=0").status_code == 400
    assert get(server, "/v1/batches?after=batch_nope").status_code == 400
    for batch_id in ids:
        wait_for(server, batch_id)
    file_id = get(server, f"/v1/batches/{ids[0]}").json()["input_file_id"]
    r = httpx.delete(server.url + f"/v1/files/{file_id}", headers=server.headers())
    assert r.json() == {"id": file_id, "object": "file", "deleted": True}
    assert get(server, f"/v1/files/{file_id}").status_code == 404
    assert get(server, f"/v1/batches/{ids[0]}").json()["status"] == "completed"  # its results stay


@pytest.mark.parametrize("case", ["unknown_file", "output_file_as_input", "endpoint", "window", "window_not_text",
                                  "metadata", "no_file_id", "not_json"])
def test_bad_batch_requests_in_openai_shape(server, case):
    good = upload(server, jsonl([line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 1})])).json()["id"]
    if case == "output_file_as_input":
        good = run_batch(server, [line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 1})])["output_file_id"]
    status, param, r = {
        "unknown_file": lambda: (404, "input_file_id", create(server, "file-nope")),
        "output_file_as_input": lambda: (400, "input_file_id", create(server, good)),
        "endpoint": lambda: (400, "endpoint", create(server, good, endpoint="/v1/moderations")),
        "window": lambda: (400, "completion_window", create(server, good, completion_window="1h")),
        "window_not_text": lambda: (400, "completion_window", create(server, good, completion_window=["24h"])),
        "metadata": lambda: (400, "metadata", create(server, good, metadata={"k": 1})),
        "no_file_id": lambda: (400, "input_file_id", create(server, "")),
        "not_json": lambda: (400, "body", httpx.post(server.url + "/v1/batches", content=b"{", headers=server.headers())),
    }[case]()
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] in ("invalid_request_error", "not_found_error")


@pytest.mark.parametrize("data, purpose, code", [
    (b'{"custom_id": "x"}\n', "fine-tune", None),
    (b"", "batch", "invalid_file"),
    (b"\xff\xfe not utf-8\n", "batch", "invalid_file"),
])
def test_refused_uploads(server, data, purpose, code):
    r = upload(server, data, purpose=purpose)
    assert r.status_code == 400 and r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/files", headers=server.headers(), data={"purpose": "batch"}).status_code == 400
    assert upload(server, b"x\n", key="wrong").status_code == 401


def test_a_batch_runs_with_its_tenants_adapter(server, tiny_llama, tmp_path, save_lora):
    adapter = save_lora(tiny_llama, tmp_path / "adapter", 0.3, seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    files = [("file", (p.name, p.read_bytes())) for p in sorted(adapter.iterdir()) if p.is_file()]
    r = httpx.post(server.url + "/v1/adapters", data={"name": "mine"}, files=files, headers=server.headers(), timeout=30)
    assert r.status_code == 201, r.text
    body = {"model": "mine", "prompt": "t5 t6 t7", "max_tokens": 6, "temperature": 0}
    batch = run_batch(server, [line("x", body)])
    got = content_lines(server, batch["output_file_id"])[0]["response"]["body"]
    want = httpx.post(server.url + COMPLETIONS, json=body, headers=server.headers()).json()
    base = httpx.post(server.url + COMPLETIONS, json=dict(body, model="tiny"), headers=server.headers()).json()
    assert_same_answer(got, want, chat=False)
    assert got["choices"][0]["text"] != base["choices"][0]["text"]  # the adapter did apply
    # Another tenant's batch naming the same model: as interactively, that model does not exist.
    other = run_batch(server, [line("x", body)], key="key-b")
    error = content_lines(server, other["error_file_id"], key="key-b")[0]["response"]
    assert error["status_code"] == 404 and error["body"]["error"]["code"] == "model_not_found"


def test_an_admin_uploads_and_batches_for_a_tenant(server):
    data = jsonl([line("x", {"model": "tiny", "prompt": "t5", "max_tokens": 2})])
    r = httpx.post(server.url + "/v1/files?tenant=tenant-b", headers=server.headers("key-admin"),
                   data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}, timeout=30)
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    assert get(server, f"/v1/files/{file_id}", "key-b").status_code == 200
    assert get(server, f"/v1/files/{file_id}", "key-a").status_code == 404
    batch_id = create(server, file_id, key="key-admin").json()["id"]
    assert wait_for(server, batch_id, key="key-b")["status"] == "completed"  # the tenant's own batch
