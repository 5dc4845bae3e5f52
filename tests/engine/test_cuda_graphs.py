"""Decode steps as CUDA graphs (engine/cuda_graphs.py). A graph replays a padded, sync-free
form of the step. Here that form runs eagerly (capture=False) on any machine, inside an
engine, against the same engine's regular path: same tokens and logprobs, and the same KV
cache outside the scratch block that padded rows write to. On a GPU, the engine's captured
graphs are checked against the same engine without them."""

from __future__ import annotations

import pytest
import torch

from loragate.engine import EngineConfig, LLMEngine, SamplingParams
from loragate.engine import cuda_graphs
from loragate.engine.cuda_graphs import DecodeGraphs

PARAMS = dict(temperature=0, ignore_eos=True, logprobs=1)
# Every adapter of a workload in a slot, and whole prompts in one step: decode batches shrink
# only as requests finish.
ROOMY = {"max_loras": 3, "max_num_batched_tokens": 512}


def make_engine(model_dir, adapters: dict, graphs: str, device: str = "cpu", **config) -> tuple[LLMEngine, list]:
    """graphs: 'off', 'eager' (the padded form, not captured) or 'captured' (CUDA). Returns the
    engine and the list its graph steps are recorded in: (tokens, sampling requests, graph key)."""
    config = {"max_loras": 2, "max_num_batched_tokens": 64, "kv_cache_memory": "32MiB", **config}
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=device, dtype="float32",
                                    cuda_graphs=graphs == "captured", **config), progress=False)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    steps = []
    r = engine.runner
    if graphs == "eager":
        r.graphs = DecodeGraphs(engine.model, r.kv_caches, r.block_size, engine.kv.num_blocks,
                                engine.config.max_num_seqs, engine.lora_pool, capture=False)
    if graphs != "off":
        real = r.graphs.run
        r.graphs.run = lambda batch, key: steps.append(
            (batch.input_ids.numel(), len(batch.sampled_requests), key)) or real(batch, key)
    return engine, steps


def engine_pair(model_dir, adapters: dict, graphs: str = "eager", device: str = "cpu", **config):
    """The same engine without graphs and with them: (plain, with graphs, its graph steps)."""
    plain, _ = make_engine(model_dir, adapters, "off", device=device, **config)
    return (plain, *make_engine(model_dir, adapters, graphs, device=device, **config))


def run(engine: LLMEngine, work) -> list[tuple[list[int], list[float], list[float]]]:
    """Per request: its tokens, their logprobs and its prompt logprobs (if asked for)."""
    reqs = [engine.add_request(prompt, params, adapter=adapter) for prompt, adapter, params in work]
    while engine.has_unfinished:
        engine.step()
    return [(r.output_token_ids, [lp for lp, _ in r.logprobs], [lp for lp, _, _ in r.prompt_logprobs or []])
            for r in reqs]


def assert_same(a, b, atol: float = 1e-5) -> None:
    for i, ((ta, la, pa), (tb, lb, pb)) in enumerate(zip(a, b)):
        assert ta == tb, f"request {i} diverged"
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=atol, rtol=0)
        torch.testing.assert_close(torch.tensor(pa), torch.tensor(pb), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory, save_lora):
    root = tmp_path_factory.mktemp("graph-adapters")
    return {"a": save_lora(tiny_llama, root / "a", 0.4, seed=1, r=8, lora_alpha=16, target_modules="all-linear"),
            "b": save_lora(tiny_llama, root / "b", 0.4, seed=2, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
            "c": save_lora(tiny_llama, root / "c", 0.4, seed=3, r=16, lora_alpha=16,
                           target_modules=["o_proj", "down_proj"]),
            "dora": save_lora(tiny_llama, root / "dora", 0.4, seed=4, r=4, lora_alpha=8, use_dora=True,
                              target_modules=["q_proj", "v_proj", "down_proj"]),
            "bias": save_lora(tiny_llama, root / "bias", 0.4, seed=5, r=8, lora_alpha=8, lora_bias=True,
                              target_modules=["k_proj", "o_proj", "up_proj"])}


def mixed_decode_work() -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(3, 250, (n,), generator=g).tolist(), adapter, SamplingParams(max_tokens=m, **PARAMS))
            for n, adapter, m in [(3, None, 20), (40, "a", 4), (150, "b", 9), (20, "c", 6), (70, "a", 16),
                                  (10, None, 21), (30, None, 22), (5, None, 23)]]


def test_padded_decode_steps_match_the_regular_path_and_touch_only_the_scratch_block(tiny_llama, adapters):
    """Eight requests, three adapters and the base model, prompts from 3 to 150 tokens (1 to
    10 KV blocks), finishing one after another: decode batches of 8 down to 1 rows, padded to
    8, 4, 2 and 1, with LoRA rows and base rows side by side, and rows a larger step filled
    that are padding again later."""
    work = mixed_decode_work()
    plain, padded, steps = engine_pair(tiny_llama, adapters, **ROOMY)
    assert_same(run(padded, work), run(plain, work))
    rows = {n for n, _, _ in steps}
    assert {1, 3, 4, 5, 8} <= rows, rows  # padded (3 -> 4, 5 -> 8) and exact sizes
    assert any(key[2] is None for _, _, key in steps) and any(key[2] is not None for _, _, key in steps)
    assert {key[1] for _, _, key in steps} >= {4, 16}  # context buckets: the minimum and 150 tokens' 10 blocks
    # Rows a larger step filled are padding again (else they would rewrite the cache slots of
    # requests that may have finished, whose blocks can belong to others by then).
    graphs = padded.runner.graphs
    last_rows = {key: n for n, _, key in steps}
    assert any(n < max(m for m, _, k in steps if k == key) for key, n in last_rows.items())
    for key, n in last_rows.items():
        host = graphs.graphs[key].host
        assert torch.equal(host[n:], graphs._padding(key[1]).expand(key[0] - n, -1))
    # The same K/V everywhere but the scratch block, which only padded rows wrote.
    torch.testing.assert_close(padded.runner.kv_cache[:, :, :-1], plain.runner.kv_cache[:, :, :-1], atol=1e-4, rtol=0)
    assert plain.runner.kv_cache[:, :, -1].abs().sum() == 0 and padded.runner.kv_cache[:, :, -1].abs().sum() > 0


def test_padded_decode_steps_with_sliding_window_layers_match_the_regular_path(tiny_gemma3, save_lora, tmp_path):
    """Gemma 3's local layers see only their last 12 positions, global ones everything: the
    padded form masks each row's window as the regular path does, at contexts far past it."""
    lora = save_lora(tiny_gemma3, tmp_path / "a", 0.4, seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    work = [(prompt, adapter and "a", params) for prompt, adapter, params in mixed_decode_work()]
    plain, padded, steps = engine_pair(tiny_gemma3, {"a": lora}, **ROOMY)
    assert_same(run(padded, work), run(plain, work))
    assert {key[1] for _, _, key in steps} >= {4, 16}  # contexts of 4 to 10 blocks of 16 tokens


def test_verification_short_prompts_and_row_terms_take_the_graphs_and_long_prefills_do_not(tiny_llama, adapters):
    """Speculative verification (1 + k token rows per request), short prompt chunks and DoRA /
    lora_bias row terms run on the graphs; long prefill chunks keep a step off them. Either way
    the output is the regular path's, prompt logprobs included."""
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
    work = [(prompt, "dora", SamplingParams(max_tokens=5, **PARAMS)),
            (prompt, None, SamplingParams(max_tokens=9, prompt_logprobs=1, **PARAMS)),
            (list(range(3, 30)), "a", SamplingParams(max_tokens=12, **PARAMS)),
            (prompt * 3, "bias", SamplingParams(max_tokens=14, **PARAMS))]
    plain, padded, steps = engine_pair(tiny_llama, adapters, speculative="ngram", num_speculative_tokens=3)
    seen = []  # per step: (what it holds, whether it has a long prefill chunk, the graph chosen)
    real_key = padded.runner.graphs.key

    def key(batch):
        kind = ("verify" if any(n > 1 for n in batch.num_logits) else
                "prompt logprobs" if batch.prompt_logprob_rows else
                "row terms" if batch.lora is not None and batch.lora.row_terms else "")
        seen.append((kind, bool(batch.attention.prefill_spans), real_key(batch)))
        return seen[-1][2]

    padded.runner.graphs.key = key
    assert_same(run(padded, work), run(plain, work))
    # alone, so its prompt (11 tokens: a short query) is a step of its own
    alone = [([9, 8, 7, 6, 5, 9, 8, 7, 6, 5, 4], "a", SamplingParams(max_tokens=3, prompt_logprobs=2, **PARAMS))]
    assert_same(run(padded, alone), run(plain, alone))
    assert steps, "no step took the graph path"
    assert any(long for _, long, _ in seen) and all(k is None for _, long, k in seen if long)
    for kind in ("verify", "prompt logprobs", "row terms"):
        assert any(k is not None for what, _, k in seen if what == kind), f"no {kind} step took the graphs"


def test_rows_times_context_past_the_bound_run_eagerly(tiny_llama, adapters, monkeypatch):
    """A bound on a graph's rows x context (the memory its attention gather holds): past it,
    steps run eagerly, with the same output."""
    monkeypatch.setattr(cuda_graphs, "MAX_ROW_CONTEXT", 32 * 16)  # e.g. 8 rows of 4 blocks
    plain, padded, steps = engine_pair(tiny_llama, adapters, **ROOMY)
    g = torch.Generator().manual_seed(3)
    work = [(torch.randint(3, 250, (100,), generator=g).tolist(), None, SamplingParams(max_tokens=m, **PARAMS))
            for m in range(2, 10)]  # contexts of 7 blocks, 8 requests finishing one by one
    assert_same(run(padded, work), run(plain, work))
    assert steps and all(rows * blocks <= 32 for _, _, (rows, blocks, _) in steps)
    assert any(blocks == 8 for _, _, (_, blocks, _) in steps)  # with 4 rows or fewer


def test_least_recently_used_graphs_go_past_the_limit(tiny_llama, adapters, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    plain, padded, steps = engine_pair(tiny_llama, adapters, **ROOMY)
    graphs = padded.runner.graphs
    batches = {}  # the first batch of each graph
    real = graphs.run

    def remember(batch, key):
        batches.setdefault(key, batch)
        return real(batch, key)

    graphs.run = remember
    assert_same(run(padded, mixed_decode_work()), run(plain, mixed_decode_work()))
    keys = [key for _, _, key in steps]
    assert len(set(keys)) > 2 and len(graphs.graphs) == 2
    assert list(graphs.graphs) == list(dict.fromkeys(reversed(keys)))[:2][::-1]
    # Used again, a graph is the most recent: of a, b, a, c the two kept are a and c.
    a, b, c = list(batches)[:3]
    for key in (a, b, a, c):
        real(batches[key], key)
    assert list(graphs.graphs) == [a, c]


def test_a_failed_capture_leaves_every_step_eager_with_one_warning(tiny_llama, adapters, monkeypatch, caplog):
    def fail(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs._Graph, "__init__", fail)
    plain, padded, steps = engine_pair(tiny_llama, adapters)
    assert_same(run(padded, mixed_decode_work()), run(plain, mixed_decode_work()))
    assert len(steps) == 1 and not padded.runner.graphs.graphs and not padded.runner.graphs.enabled
    assert [r.message for r in caplog.records].count(
        "CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing); "
        "every step runs eagerly from now on") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("speculative", ["off", "ngram", "draft"])
def test_captured_graphs_on_the_gpu_give_what_the_eager_gpu_engine_gives(tiny_llama, adapters, speculative):
    """Decode steps, and with speculation verification steps (and the draft model's steps)."""
    config = {**ROOMY, "speculative": speculative}
    if speculative == "draft":
        config.update(draft_model=str(tiny_llama), draft_quantization="none")
    eager, captured, steps = engine_pair(tiny_llama, adapters, "captured", device="cuda", **config)
    work = mixed_decode_work()
    assert_same(run(captured, work), run(eager, work), atol=1e-4)
    # Base requests alone: whether the mixed run ends in base-only steps depends on how many
    # tokens speculation accepted per step, which the controller chooses by timing.
    base = [w for w in work if w[1] is None]
    assert_same(run(captured, base), run(eager, base), atol=1e-4)
    graphs = captured.runner.graphs
    assert all(g.graph is not None for g in graphs.graphs.values())
    assert {key for _, _, key in steps} == set(graphs.graphs)
    assert any(key[2] is None for _, _, key in steps) and any(key[2] is not None for _, _, key in steps)
    if speculative == "draft":
        assert any(tokens > sampled for tokens, sampled, _ in steps), "no verification step was replayed"
        assert captured.speculator.proposer.runner.graphs.graphs, "the draft model replayed no graph"
    # Replayed again for new requests (new blocks, other adapters' slots): the same answers.
    assert_same(run(captured, work), run(eager, work), atol=1e-4)
    # Adapters with row terms arrive after graphs exist: DoRA's scale tables first, then
    # lora_bias's shift tables, each made after graphs that apply the tables before them.
    for name in ("dora", "bias"):
        terms = [(p, name if i % 2 else a, params) for i, (p, a, params) in enumerate(work)]
        assert_same(run(captured, terms), run(eager, terms), atol=1e-4)
    assert len({key[2][2] for _, _, key in steps if key[2] is not None and key[2][2] is not None}) >= 2
    if speculative == "off":  # (speculation leaves rejected proposals' K/V, and how many it makes is timed)
        torch.testing.assert_close(captured.runner.kv_cache[:, :, :-1], eager.runner.kv_cache[:, :, :-1],
                                   atol=1e-3, rtol=0)
