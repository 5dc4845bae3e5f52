"""Speculative decoding behind the HTTP API: same greedy text as plain decoding, the
per-request opt-out, and the metrics the gateway exports."""

from __future__ import annotations

import httpx
import pytest

from .conftest import RunningServer


@pytest.fixture(scope="module")
def spec_server(tiny_llama, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("LORAGATE_HOME", str(tmp_path_factory.mktemp("spec-home")))
    s = RunningServer(tiny_llama, None, speculative="ngram")
    spec = s.state.engine.engine.speculator
    spec.controller.plan = lambda reqs, limits, batch_size: [min(lim, spec.controller.max_k) for lim in limits]
    yield s
    s.stop()


def complete(server, **fields):
    body = {"model": "tiny", "prompt": " ".join(["t5 t6 t7 t8"] * 6), "max_tokens": 16, "temperature": 0,
            "ignore_eos": True} | fields
    return httpx.post(server.url + "/v1/completions", json=body, headers=server.headers(), timeout=60)


def test_speculative_output_and_metrics(spec_server, server):
    plain = complete(server).json()["choices"][0]["text"]
    r = complete(spec_server)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain
    metrics = httpx.get(spec_server.url + "/metrics").text
    proposed = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("loragate_spec_proposed_tokens "))
    assert proposed > 0
    assert "loragate_spec_acceptance_ratio" in metrics and "loragate_spec_mean_accepted_length" in metrics


def test_opt_out_and_bad_value(spec_server):
    stats = spec_server.state.engine.engine.speculator.stats
    before = stats.num_proposed
    assert complete(spec_server, speculative=False).status_code == 200
    assert stats.num_proposed == before
    r = complete(spec_server, speculative="sometimes")
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative"
