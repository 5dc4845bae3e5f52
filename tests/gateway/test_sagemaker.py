"""SageMaker's contract (gateway/sagemaker_api.py): /invocations answers each kind of body as
the endpoint its fields name would, streams included, through a router too; /ping is the
readiness check."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from loragate.gateway.router import build_router_app
from loragate.gateway.settings import GatewaySettings

from .conftest import _module_server

BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 6, "temperature": 0},
    "/v1/completions": {"prompt": "t5 t6", "max_tokens": 6, "temperature": 0},
    "/v1/rerank": {"query": "t5", "documents": ["t6 t7", "t5"]},
    "/v1/score": {"text_1": "t5", "text_2": ["t6 t7", "t5"]},
    "/v1/embeddings": {"input": ["t5 t6", "t7"]},
}


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, monkeypatch_module):
    yield from _module_server(tiny_llama, tmp_path_factory, monkeypatch_module)


def comparable(path: str, answer: dict) -> tuple[object, list[float]]:
    """What must match between two calls: what must be equal, and numbers equal to fp32
    rounding (scores and vectors: the engine may run the texts in other steps)."""
    if path in ("/v1/chat/completions", "/v1/completions"):
        return (answer["object"], answer["choices"], answer["usage"]), []
    if path == "/v1/rerank":
        return [r["index"] for r in answer["results"]], [r["relevance_score"] for r in answer["results"]]
    if path == "/v1/score":
        return len(answer["data"]), [d["score"] for d in answer["data"]]
    return answer["usage"], [v for d in answer["data"] for v in d["embedding"]]


@pytest.mark.parametrize("path", list(BODIES))
def test_invocations_answer_as_the_endpoint_the_body_names(server, path):
    body = {"model": "tiny", **BODIES[path]}
    direct = httpx.post(server.url + path, json=body, headers=server.headers(), timeout=60).json()
    invoked = httpx.post(server.url + "/invocations", json=body, headers=server.headers(), timeout=60)
    assert invoked.status_code == 200, invoked.text
    (same, numbers), (want_same, want_numbers) = comparable(path, invoked.json()), comparable(path, direct)
    assert same == want_same and numbers == pytest.approx(want_numbers, abs=1e-6)


def test_bodies_without_a_model_are_for_the_base_model_and_bedrock_claude_bodies_are_messages(server):
    chat = {**BODIES["/v1/chat/completions"], "temperature": 0}
    unnamed = httpx.post(server.url + "/invocations", json=chat, headers=server.headers(), timeout=60).json()
    named = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", **chat}, headers=server.headers(),
                       timeout=60).json()
    assert unnamed["model"] == "tiny" and unnamed["choices"] == named["choices"]
    claude = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 4, "temperature": 0,
              "messages": [{"role": "user", "content": [{"type": "text", "text": "t5 t6"}]}]}
    invoked = httpx.post(server.url + "/invocations", json=claude, headers=server.headers(), timeout=60).json()
    direct = httpx.post(server.url + "/v1/messages", json={"model": "tiny", **claude}, headers=server.headers(),
                        timeout=60).json()
    assert invoked["type"] == "message" and invoked["model"] == "tiny"
    assert (invoked["content"], invoked["usage"]) == (direct["content"], direct["usage"])


def test_a_streamed_invocation_streams_and_bad_ones_are_400s(server):
    body = {"model": "tiny", **BODIES["/v1/chat/completions"], "stream": True}
    events = httpx.post(server.url + "/invocations", json=body, headers=server.headers(), timeout=60).text
    assert events.count("chat.completion.chunk") >= 2 and events.rstrip().endswith("data: [DONE]")
    unknown = httpx.post(server.url + "/invocations", json={"model": "tiny", "question": "t5"},
                         headers=server.headers())
    assert unknown.status_code == 400 and "names no inference endpoint" in unknown.json()["error"]["message"]
    assert httpx.post(server.url + "/invocations", content=b"[1]", headers=server.headers()).status_code == 400
    assert httpx.post(server.url + "/invocations", json={"model": "tiny", "prompt": "t5"}).status_code == 401
    assert httpx.get(server.url + "/ping").status_code == httpx.post(server.url + "/ping").status_code == 200


def test_a_router_passes_invocations_and_pings_on(server):
    settings = GatewaySettings(role="router", engine_urls=server.url, health_interval=60.0)
    body = {"model": "tiny", **BODIES["/v1/completions"]}
    direct = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers(), timeout=60).json()
    with TestClient(build_router_app(settings)) as router:
        assert router.get("/ping").status_code == 200
        invoked = router.post("/invocations", json=body, headers=server.headers())
        assert invoked.status_code == 200 and invoked.json()["choices"] == direct["choices"]
