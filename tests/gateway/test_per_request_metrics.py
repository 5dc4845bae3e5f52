"""--enable-per-request-metrics: answers carry their own timings as vLLM's do ("metrics":
time to first token, generation time, queue time, mean inter-token latency, tokens per
second), on completions, chat (a stream's usage chunk) and the Responses API."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import RunningServer

FIELDS = {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms", "tokens_per_second"}


@pytest.fixture(scope="module")
def timed(tiny_llama, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAGATE_HOME", str(tmp_path_factory.mktemp("home")))
        s = RunningServer(tiny_llama, None)
    s.state.per_request_metrics = True
    yield s
    s.stop()


def post(s, path, body):
    return httpx.post(s.url + path, json=body, headers=s.headers(), timeout=60).json()


def test_a_completion_carries_its_timings_and_they_add_up(timed):
    answer = post(timed, "/v1/completions", {"model": "tiny", "prompt": "t5 t6", "max_tokens": 8, "ignore_eos": True})
    m = answer["metrics"]
    assert set(m) == FIELDS and answer["usage"]["completion_tokens"] == 8
    assert m["time_to_first_token_ms"] > 0 and m["generation_time_ms"] > 0 and m["queue_time_ms"] >= 0
    assert m["mean_itl_ms"] == pytest.approx(m["generation_time_ms"] / 7)
    # throughput over the inference interval: from scheduling to the last token
    assert m["tokens_per_second"] == pytest.approx(8 / ((m["time_to_first_token_ms"] + m["generation_time_ms"]) / 1000))
    one = post(timed, "/v1/completions", {"model": "tiny", "prompt": "t5", "max_tokens": 1})["metrics"]
    assert one["mean_itl_ms"] is None and one["generation_time_ms"] == 0  # a single token has no inter-token gap
    several = post(timed, "/v1/completions", {"model": "tiny", "prompt": "t5", "max_tokens": 4, "n": 2})
    assert several["metrics"] is None and len(several["choices"]) == 2  # no one timing for two sequences
    assert post(timed, "/v1/completions", {"model": "tiny", "prompt": ["t5", "t6"], "max_tokens": 2})["metrics"] is None


def test_chat_streams_and_responses_carry_them_too(timed):
    client = openai.OpenAI(base_url=timed.url + "/v1", api_key="key-a", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=4,
                                          extra_body={"ignore_eos": True})
    assert set(chat.model_extra["metrics"]) == FIELDS
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t5"}], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert set(chunks[-1].model_extra["metrics"]) == FIELDS and chunks[-1].usage.completion_tokens == 4
    assert all("metrics" not in c.model_extra for c in chunks[:-1])  # the usage chunk only
    response = client.responses.create(model="tiny", input="t5", max_output_tokens=4)
    assert set(response.model_extra["metrics"]) == FIELDS
    events = list(client.responses.create(model="tiny", input="t5", max_output_tokens=4, stream=True))
    done = [e for e in events if e.type in ("response.completed", "response.incomplete")][-1]
    assert set(done.response.model_extra["metrics"]) == FIELDS


def test_off_by_default(server):
    answer = post(server, "/v1/completions", {"model": "tiny", "prompt": "t5", "max_tokens": 2})
    assert "metrics" not in answer
    text = httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=60,
                      json={"model": "tiny", "prompt": "t5", "max_tokens": 2, "stream": True,
                            "stream_options": {"include_usage": True}}).text
    assert all("metrics" not in json.loads(line[6:]) for line in text.splitlines()
               if line.startswith("data: {"))
