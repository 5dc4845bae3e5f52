"""vLLM's score and rerank APIs (gateway/scores_api.py): cosine similarities of the texts'
embeddings against transformers' last_hidden_state, pairing rules, ranking and top_n, the
Jina/Cohere paths, bad input, another tenant's adapter, and a router in front."""

from __future__ import annotations

import httpx
import pytest
import torch
from starlette.testclient import TestClient
from transformers import AutoModel

from loragate.gateway.router import build_router_app
from loragate.gateway.settings import GatewaySettings

from .conftest import _module_server
from .test_embeddings import hf_embedding

QUERY = "t5 t6 t7"
DOCUMENTS = ["t5 t6 t8", "t9 t10 t11 t12", "t7 t6 t5", "t13"]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, monkeypatch_module):
    yield from _module_server(tiny_llama, tmp_path_factory, monkeypatch_module)


@pytest.fixture(scope="module")
def cosine(server, tiny_llama):
    hf = AutoModel.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = server.state.engine.tokenizer

    def similarity(a: str, b: str) -> float:
        return float(hf_embedding(hf, tok.encode(a), "last") @ hf_embedding(hf, tok.encode(b), "last"))
    return similarity


def post(server, path: str, key: str = "key-a", **body) -> httpx.Response:
    return httpx.post(server.url + path, headers=server.headers(key), json={"model": "tiny", **body}, timeout=60)


def same_ranking(got: list[dict], want: list[dict]) -> None:
    """The same order and documents, the scores within fp32 rounding (texts batched differently)."""
    assert [(r["index"], r.get("document")) for r in got] == [(r["index"], r.get("document")) for r in want]
    assert [r["relevance_score"] for r in got] == pytest.approx([r["relevance_score"] for r in want], abs=1e-6)


def test_scores_are_the_cosine_similarities_of_the_embeddings(server, cosine):
    tok = server.state.engine.tokenizer
    one_to_many = post(server, "/v1/score", text_1=QUERY, text_2=DOCUMENTS).json()
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2, 3] and one_to_many["object"] == "list"
    for item, document in zip(one_to_many["data"], DOCUMENTS):
        assert item["object"] == "score" and item["score"] == pytest.approx(cosine(QUERY, document), abs=5e-5)
    # each distinct text is embedded once
    assert one_to_many["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in [QUERY, *DOCUMENTS])
    pairs = post(server, "/score", text_1=DOCUMENTS[:2], text_2=DOCUMENTS[2:]).json()["data"]
    assert [p["score"] for p in pairs] == pytest.approx([cosine(DOCUMENTS[0], DOCUMENTS[2]),
                                                         cosine(DOCUMENTS[1], DOCUMENTS[3])], abs=5e-5)
    [same] = post(server, "/v1/score", text_1=QUERY, text_2=QUERY).json()["data"]
    assert same["score"] == pytest.approx(1.0, abs=1e-5)


def test_rerank_orders_the_documents_by_score_and_keeps_top_n(server, cosine):
    want = sorted(range(len(DOCUMENTS)), key=lambda i: -cosine(QUERY, DOCUMENTS[i]))
    answer = post(server, "/v1/rerank", query=QUERY, documents=DOCUMENTS).json()
    assert [r["index"] for r in answer["results"]] == want and answer["id"].startswith("rerank-")
    for r in answer["results"]:
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
        assert r["relevance_score"] == pytest.approx(cosine(QUERY, DOCUMENTS[r["index"]]), abs=5e-5)
    top = post(server, "/v2/rerank", query=QUERY, documents=[{"text": d} for d in DOCUMENTS], top_n=2,
               return_documents=False).json()["results"]
    assert [r["index"] for r in top] == want[:2] and all("document" not in r for r in top)
    same_ranking(post(server, "/rerank", query=QUERY, documents=DOCUMENTS).json()["results"], answer["results"])


@pytest.mark.parametrize("path, body, param", [
    ("/v1/score", {"text_2": "t5"}, "text_1"),
    ("/v1/score", {"text_1": ["t5", "t6"], "text_2": ["t5", "t6", "t7"]}, "text_2"),
    ("/v1/score", {"text_1": "t5", "text_2": []}, "text_2"),
    ("/v1/score", {"text_1": "t5", "text_2": "t6", "model": None}, "model"),
    ("/v1/rerank", {"documents": ["t5"]}, "query"),
    ("/v1/rerank", {"query": "t5", "documents": [{"title": "t6"}]}, "documents"),
    ("/v1/rerank", {"query": "t5", "documents": ["t6"], "top_n": -1}, "top_n"),
    ("/v1/rerank", {"query": "t5", "documents": ["t6"], "return_documents": "yes"}, "return_documents"),
    ("/v1/rerank", {"query": "t5", "documents": [f"t{i}" for i in range(10, 2058)]}, "documents"),  # 2,049 texts
])
def test_bad_score_and_rerank_requests_are_400s(server, path, body, param):
    r = post(server, path, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert server.state.engine.num_waiting == 0 and server.state.tenant_in_flight == {}


def test_another_tenants_adapter_cannot_score(server, tiny_llama, tmp_path, save_lora):
    path = save_lora(tiny_llama, tmp_path / "emb", 0.3, seed=5, r=8, lora_alpha=16, target_modules="all-linear")
    files = [("files", (f.name, f.read_bytes())) for f in path.iterdir() if f.is_file()]
    assert httpx.post(server.url + "/v1/adapters", headers=server.headers(), data={"name": "emb"},
                      files=files, timeout=60).status_code == 201
    body = {"model": "emb", "text_1": QUERY, "text_2": DOCUMENTS}
    mine = httpx.post(server.url + "/v1/score", headers=server.headers(), json=body).json()["data"]
    base = post(server, "/v1/score", text_1=QUERY, text_2=DOCUMENTS).json()["data"]
    assert [m["score"] for m in mine] != pytest.approx([b["score"] for b in base], abs=1e-4)  # the adapter's own
    assert httpx.post(server.url + "/v1/score", headers=server.headers("key-b"), json=body).status_code == 404


def test_a_router_routes_score_and_rerank_to_an_engine(server):
    settings = GatewaySettings(role="router", engine_urls=server.url, health_interval=60.0)
    direct = post(server, "/v1/rerank", query=QUERY, documents=DOCUMENTS).json()["results"]
    with TestClient(build_router_app(settings)) as router:
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            r = router.post(path, json={"model": "tiny", "query": QUERY, "documents": DOCUMENTS},
                            headers=server.headers())
            assert r.status_code == 200
            same_ranking(r.json()["results"], direct)
        for path in ("/v1/score", "/score"):
            r = router.post(path, json={"model": "tiny", "text_1": QUERY, "text_2": DOCUMENTS},
                            headers=server.headers())
            assert [d["score"] for d in r.json()["data"]] == pytest.approx(
                [d["relevance_score"] for d in sorted(direct, key=lambda d: d["index"])], abs=1e-6)
