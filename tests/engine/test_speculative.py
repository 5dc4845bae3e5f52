"""Speculative decoding in the engine: lossless greedy output (draft and n-gram proposers,
with LoRA adapters in the same batch), the target's distribution when sampling (also with a
deliberately bad draft), KV accounting over many random accept/reject steps, and refusals."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from loragate.engine import LLM, LLMEngine, EngineConfig, ModelConfigError, SamplingParams
from loragate.engine.request import RequestStatus


def bad_draft(base_dir, out_dir, noise=0.05, seed=5):
    """The base model with its weights perturbed: same tokenizer, different (worse) guesses."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def draft_dir(tiny_llama, tmp_path_factory):
    return bad_draft(tiny_llama, tmp_path_factory.mktemp("draft") / "m", noise=0.02)


@pytest.fixture(scope="module")
def worse_draft_dir(tiny_llama, tmp_path_factory):
    return bad_draft(tiny_llama, tmp_path_factory.mktemp("worse") / "m", noise=0.2, seed=9)


def always_speculate(llm: LLM) -> LLM:
    """Tiny models decode faster without speculation, so the throughput switch would turn
    it off; these tests are about what speculation computes, so keep it on."""
    spec = llm.engine.speculator
    spec.controller.plan = lambda reqs, limits, batch_size: [min(lim, spec.controller.max_k) for lim in limits]
    return llm


def spec_llm(model_dir, mode, draft=None, **kw) -> LLM:
    extra = {"draft_model": str(draft)} if draft is not None else {}
    return always_speculate(LLM(str(model_dir), dtype="float32", progress=False, speculative=mode, **extra, **kw))


def prompts_20() -> list[list[int]]:
    rng = random.Random(0)
    out = []
    for i in range(20):
        if i % 2:  # repetitive prompts: the n-gram proposer finds matches
            unit = [rng.randrange(3, 512) for _ in range(rng.randrange(2, 6))]
            out.append([1] + unit * rng.randrange(2, 6))
        else:
            out.append([1] + [rng.randrange(3, 512) for _ in range(rng.randrange(3, 40))])
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory, save_lora):
    root = tmp_path_factory.mktemp("spec-adapters")
    # With row terms too (engine/models/slot_rows.py): a lora_bias adapter and a DoRA one.
    return {"attn": save_lora(tiny_llama, root / "attn", 0.3, seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                              lora_bias=True),
            "mlp": save_lora(tiny_llama, root / "mlp", 0.3, seed=2, r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"],
                             use_dora=True),
            # the vocabulary modules: the head's LoRA on every verified row (engine/models/vocab_lora.py)
            "vocab": save_lora(tiny_llama, root / "vocab", 0.3, seed=3, r=4, lora_alpha=8,
                               target_modules=["embed_tokens", "lm_head"])}


def run(llm: LLM, prompts, params, adapters=None):
    for name, path in (adapters or {}).items():
        llm.add_adapter(name, path)
    names = [None, *adapters] if adapters else [None]
    return llm.generate(prompts, params, adapters=[names[i % len(names)] for i in range(len(prompts))])


@pytest.mark.parametrize("mode", ["draft", "ngram"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_greedy_output_identical_to_plain_decoding(tiny_llama, draft_dir, adapters, mode, with_lora):
    prompts = prompts_20()
    params = [SamplingParams(max_tokens=12 + i % 9, temperature=0, logprobs=2 if i % 5 == 0 else None,
                             stop=["t17"] if i % 7 == 3 else [], ignore_eos=i % 3 == 0) for i in range(20)]
    ads = adapters if with_lora else None
    plain = run(LLM(str(tiny_llama), dtype="float32", progress=False), prompts, params, ads)
    llm = spec_llm(tiny_llama, mode, draft_dir if mode == "draft" else None)
    spec = run(llm, prompts, params, ads)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids
        assert (b.text, b.finish_reason, b.stop_reason) == (a.text, a.finish_reason, a.stop_reason)
    stats = llm.engine.speculator.stats
    assert stats.num_proposed > 50 and 0 < stats.num_accepted <= stats.num_proposed
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("mode", [None, "draft", "ngram"])
def test_min_p_one_samples_only_the_most_likely_token(tiny_llama, draft_dir, mode):
    """min_p = 1 leaves only the argmax, so sampling at temperature 1 must decode greedily, in
    plain sampling and in verification alike (a min_p dropped on either path shows up as a
    sampled token)."""
    prompts = prompts_20()[:8]
    greedy = LLM(str(tiny_llama), dtype="float32", progress=False).generate(
        prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    llm = spec_llm(tiny_llama, mode, draft_dir if mode == "draft" else None) if mode else \
        LLM(str(tiny_llama), dtype="float32", progress=False)
    sampled = llm.generate(prompts, [SamplingParams(max_tokens=16, temperature=1.0, min_p=1.0, seed=i, ignore_eos=True)
                                     for i in range(8)])
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]
    loose = llm.generate(prompts, [SamplingParams(max_tokens=16, temperature=1.0, min_p=0.0, seed=i, ignore_eos=True)
                                   for i in range(8)])
    assert [o.token_ids for o in loose] != [o.token_ids for o in greedy]  # the test can tell


@pytest.mark.parametrize("quantization", ["int4", "none"])
def test_draft_weights_quantized_or_not_output_is_plain_decodings(tiny_llama, draft_dir, quantization):
    from loragate.kernels.dense import Int4Weight, int4_available

    prompts = prompts_20()
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(str(tiny_llama), dtype="float32", progress=False).generate(prompts, params)
    llm = always_speculate(LLM(str(tiny_llama), dtype="float32", progress=False, speculative="draft",
                               draft_model=str(draft_dir), draft_quantization=quantization))
    draft = llm.engine.speculator.proposer
    packed = [m.packed for m in draft.model.modules() if hasattr(m, "packed")] + [draft.head.packed]
    assert all(isinstance(p, Int4Weight) == (quantization == "int4" and int4_available(draft.model.device))
               for p in packed)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in plain]
    stats = llm.engine.speculator.stats
    assert stats.num_proposed > 50 and stats.num_accepted > 0


def test_logprobs_match_plain_decoding(tiny_llama):
    prompt = [1] + [5, 6, 7, 8] * 6
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=3, ignore_eos=True)
    plain = LLM(str(tiny_llama), dtype="float32", progress=False).generate(prompt, params)[0]
    llm = spec_llm(tiny_llama, "ngram")
    req = llm.engine.add_request(prompt, params)
    while llm.engine.has_unfinished:
        llm.engine.step()
    assert req.output_token_ids == plain.token_ids
    assert llm.engine.speculator.stats.num_accepted > 0
    for (c1, top1), (c2, top2) in zip(req.logprobs, plain_logprobs(tiny_llama, prompt, params)):
        assert c1 == pytest.approx(c2, abs=1e-4)
        assert top1.keys() == top2.keys()


def plain_logprobs(model_dir, prompt, params):
    llm = LLM(str(model_dir), dtype="float32", progress=False)
    req = llm.engine.add_request(prompt, params)
    while llm.engine.has_unfinished:
        llm.engine.step()
    return req.logprobs


def test_per_request_opt_out_proposes_nothing(tiny_llama):
    llm = spec_llm(tiny_llama, "ngram")
    llm.generate([1] + [5, 6, 7] * 8, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative=False))
    assert llm.engine.speculator.stats.num_proposed == 0
    llm.generate([1] + [5, 6, 7] * 8, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert llm.engine.speculator.stats.num_proposed > 0


def check_kv_accounting(kv, holders) -> None:
    refs = [0] * kv.num_blocks
    for req in holders:
        for b in req.block_ids:
            refs[b] += 1
    assert refs == kv.ref_counts
    assert set(kv.free_blocks) == {b for b, n in enumerate(refs) if n == 0}


def test_kv_blocks_accounted_for_after_1000_random_speculative_steps(tiny_llama, worse_draft_dir):
    llm = spec_llm(tiny_llama, "draft", worse_draft_dir, block_size=4, kv_cache_memory=40 * 1024)  # 40 blocks of 4 tokens
    engine: LLMEngine = llm.engine
    draft = engine.speculator.proposer
    rng = random.Random(1)
    steps = 0
    while engine.speculator.stats.num_speculative_steps < 1000:
        if len(engine.scheduler.requests) < 6:
            prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(max_tokens=rng.randrange(1, 40), temperature=rng.choice([0, 0.8, 1.5]),
                                    top_k=rng.choice([0, 20]), seed=rng.randrange(1 << 30), ignore_eos=True)
            engine.add_request(prompt, params)
        if rng.random() < 0.02 and engine.scheduler.running:  # aborts mid-speculation too
            engine.abort(rng.choice(engine.scheduler.running).request_id)
        engine.step()
        steps += 1
        check_kv_accounting(engine.kv, engine.scheduler.running)
        check_kv_accounting(draft.kv, draft.shadows.values())
    stats = engine.speculator.stats
    assert 0 < stats.num_accepted < stats.num_proposed  # both outcomes happened, many times
    assert engine.scheduler.num_preemptions > 0  # the cache was small enough to preempt
    while engine.has_unfinished:
        engine.step()
    engine.speculator.propose(engine.scheduler.running)  # lets the draft drop finished requests
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert draft.kv.num_free_blocks == draft.kv.num_blocks and not draft.shadows


def test_draft_with_another_vocabulary_is_refused(tiny_llama, tiny_qwen2, tmp_path):
    with pytest.raises(ModelConfigError, match="different tokenizer"):
        LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", speculative="draft",
                               draft_model=str(tiny_qwen2)), progress=False)
    import json

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 600
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="vocabulary of 600 tokens, more than the target's 512"):
        LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", speculative="draft", draft_model=str(other)),
                  progress=False)


@pytest.mark.parametrize("fields, message", [
    ({"speculative": "eagle"}, "speculative must be one of"),
    ({"speculative": "draft"}, "needs a draft model"),
    ({"speculative": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"speculative": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min"),
    ({"speculative": "ngram", "draft_quantization": "int3"}, "draft_quantization must be one of"),
])
def test_bad_speculative_config_is_refused(fields, message):
    with pytest.raises(ModelConfigError, match=message):
        EngineConfig(**fields)


def test_lengths_and_stops_are_exact_under_speculation(tiny_llama):
    llm = spec_llm(tiny_llama, "draft", tiny_llama)  # a perfect draft: every proposal accepted
    out = llm.generate([1] + [7, 8, 9] * 4, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    plain = LLM(str(tiny_llama), dtype="float32", progress=False).generate(
        [1] + [7, 8, 9] * 4, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop_id = plain.token_ids[5]
    out = llm.generate([1] + [7, 8, 9] * 4, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == plain.token_ids[: plain.token_ids.index(stop_id) + 1]
    assert out.stop_reason == stop_id
    assert llm.engine.speculator.stats.mean_accepted_length > 2
    assert RequestStatus.FINISHED_STOPPED.value == out.finish_reason


def _joint_reference(hf, prompt, top_k):
    """Exact P(t1, t2) of plain sampling (temperature 1, top-k) from the target."""
    from loragate.kernels.spec_sampling import sampling_probs

    with torch.no_grad():
        p1 = sampling_probs(hf(torch.tensor([prompt])).logits[0, -1:], 1.0, top_k, 1.0)[0]
        joint = {}
        for t1 in p1.nonzero().flatten().tolist():
            p2 = sampling_probs(hf(torch.tensor([prompt + [t1]])).logits[0, -1:], 1.0, top_k, 1.0)[0]
            for t2 in p2.nonzero().flatten().tolist():
                joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint


def _prompt_with_useful_ngram_guesses(model_dir, top_k):
    """A random tiny model rarely continues its prompt the way it went before, so grow a
    prompt (deterministically) with the target's likeliest token pairs until the n-gram guess
    for the second token carries real probability: the test then sees deterministic proposals
    both accepted and rejected."""
    from transformers import AutoModelForCausalLM

    from loragate.engine.spec.ngram import NgramProposer

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lookup = NgramProposer(1, 4).lookup
    rng = random.Random(3)
    prompt = [1] + [rng.randrange(3, 512) for _ in range(8)]
    for _ in range(12):
        joint = _joint_reference(hf, prompt, top_k)
        if sum(p for (t1, t2), p in joint.items() if lookup(prompt + [t1], 1) == [t2]) > 0.12:
            return prompt, joint
        prompt += list(max(joint, key=joint.get))
    raise AssertionError("no prompt found")


def assert_first_two_tokens_follow(joint: dict, outs) -> None:
    """Chi-square of the outputs' first two tokens against the exact joint distribution of
    plain sampling (16 pairs: df 15, p = 0.001; seeds are fixed, so it is deterministic)."""
    counts: dict = {}
    for o in outs:
        key = tuple(o.token_ids[:2])
        assert key in joint, f"{key} has probability 0 under the target"
        counts[key] = counts.get(key, 0) + 1
    n = len(outs)
    chi2 = sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in joint.items())
    assert len(joint) == 16 and chi2 < 37.70, chi2


@pytest.mark.parametrize("mode", ["draft", "ngram"])
def test_sampled_tokens_follow_the_targets_distribution(tiny_llama, draft_dir, mode):
    """Chi-square of the first two tokens over 2000 seeds: the second is the first one that
    speculation produces (verified against a bad draft, or an n-gram guess)."""
    top_k, n = 4, 2000
    prompt, joint = _prompt_with_useful_ngram_guesses(tiny_llama, top_k)
    extra = {"ngram_min": 1} if mode == "ngram" else {}
    llm = spec_llm(tiny_llama, mode, draft_dir if mode == "draft" else None, **extra)
    outs = llm.generate([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, seed=s,
                                                      ignore_eos=True) for s in range(n)])
    assert_first_two_tokens_follow(joint, outs)
    stats = llm.engine.speculator.stats
    assert stats.num_proposed > 200 and 0 < stats.num_accepted < stats.num_proposed


def test_draft_head_over_part_of_the_vocabulary(tiny_llama, draft_dir):
    """A draft restricted to the 100 lowest ids plus each request's own tokens proposes only
    those, and the output is still exactly plain decoding's."""
    prompts = prompts_20()
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(str(tiny_llama), dtype="float32", progress=False).generate(prompts, params)
    llm = spec_llm(tiny_llama, "draft", draft_dir, draft_vocab_size=100)
    proposer = llm.engine.speculator.proposer
    seen: list[tuple[list[int], list[int]]] = []
    real_propose = proposer.propose

    def recording(requests, num_tokens, hidden=None):
        proposals = real_propose(requests, num_tokens, hidden)
        seen.extend((r.all_token_ids, list(p.token_ids)) for r, p in zip(requests, proposals))
        return proposals

    proposer.propose = recording
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in plain]
    assert seen and all(t < 100 or t in text for text, proposal in seen for t in proposal)
    assert any(t >= 100 for _, proposal in seen for t in proposal)  # its own rare tokens do come up

    from loragate.engine.spec.draft_head import DraftHead

    head = DraftHead(proposer.model, 100)
    head.add_tokens("r", [5, 300, 301])
    hidden = torch.randn(1, proposer.model.config.hidden_size, device=proposer.model.device)
    full = proposer.model.compute_logits(hidden).cpu()
    got = head.logits(hidden, ["r"])
    keep = list(range(100)) + [300, 301]
    assert torch.allclose(got[0, keep], full[0, keep], atol=1e-5)
    assert torch.isinf(got[0, 100:300]).all() and torch.isinf(got[0, 302:]).all()


def test_a_proposer_can_draft_from_the_targets_hidden_states(tiny_llama):
    """The interface a parallel block drafter (DFlash-style) needs: the target's final hidden
    states at each request's sampled positions reach the proposer after every step."""
    from loragate.engine.spec import Proposal

    class FeatureDrafter:
        wants_hidden_states = True
        cost_per_token = 0.001

        def __init__(self):
            self.seen = []

        def propose(self, requests, num_tokens, hidden_states=None):
            self.seen.append({r.request_id: (hidden_states[r.request_id], r.output_token_ids[-1]) for r in requests})
            return [Proposal([]) for _ in requests]

        def forget(self, keep):
            pass

    llm = LLM(str(tiny_llama), dtype="float32", progress=False)
    drafter = FeatureDrafter()
    llm.engine.use_proposer(drafter)
    always_speculate(llm)
    llm.generate([[1, 5, 6, 7], [1, 9, 9]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert drafter.seen
    model = llm.engine.model
    for step in drafter.seen:
        for hidden, last_token in step.values():
            assert hidden.shape == (1, model.config.hidden_size)
            # The features are the ones the target sampled its newest token from.
            assert int(model.compute_logits(hidden).argmax()) == last_token


def test_draft_mode_falls_back_to_ngram_lookup_where_drafting_does_not_pay(tiny_llama, draft_dir):
    """When the draft's controller plans nothing (as on a busy batch), the n-gram lookup, with
    its own controller and acceptance estimates, may propose; output is still plain decoding's."""
    prompts = [p for i, p in enumerate(prompts_20()) if i % 2]  # repetitive: lookups find matches
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(str(tiny_llama), dtype="float32", progress=False).generate(prompts, params)
    llm = LLM(str(tiny_llama), dtype="float32", progress=False, speculative="draft", draft_model=str(draft_dir))
    spec = llm.engine.speculator
    spec.controller.plan = lambda reqs, limits, batch_size: [0] * len(reqs)
    fallback = spec.fallback_controller
    fallback.plan = lambda reqs, limits, batch_size: [min(lim, fallback.max_k) for lim in limits]
    drafted = []
    real_propose = spec.proposer.propose
    spec.proposer.propose = lambda *a: drafted.append(a) or real_propose(*a)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in plain]
    assert not drafted and spec.stats.num_accepted > 0
    # Speculative steps are measured for the lookup's guard only; plain ones for both.
    assert any(speculative for _, speculative in fallback.realized)
    assert not any(speculative for _, speculative in spec.controller.realized)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_a_gemma2_draft_proposes_from_softcapped_logits(tiny_gemma2):
    """Gemma 2 caps its final logits (cap * tanh(logits / cap)); a draft that skipped the cap
    would sample from another distribution than the target's. As its own draft, sampling, the
    model's proposals are then accepted with probability min(1, p/q) = 1, up to rounding."""
    prompts = prompts_20()
    params = SamplingParams(max_tokens=16, temperature=0.5, seed=3, ignore_eos=True)
    llm = spec_llm(tiny_gemma2, "draft", tiny_gemma2, draft_quantization="none", draft_vocab_size=0)
    llm.generate(prompts, params)
    stats = llm.engine.speculator.stats
    assert stats.num_proposed > 100 and stats.num_accepted >= 0.97 * stats.num_proposed, stats


@pytest.fixture(scope="module")
def short_vocab_draft(tiny_llama, tmp_path_factory):
    """The model with its last 12 embedding rows cut off, as a smaller size of a family whose
    vocabulary is padded less; the tokenizer (512 ids) is the same, so the target's prompts
    and outputs hold ids the draft has no row for."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("short-vocab") / "m"
    shutil.copytree(tiny_llama, out)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model.resize_token_embeddings(500)
    model.save_pretrained(str(out))
    return out


def test_a_draft_with_fewer_vocabulary_rows_speculates_losslessly(tiny_llama, short_vocab_draft):
    """Same tokenizer, fewer rows (Qwen2.5-0.5B drafting for 14B and up): the draft proposes
    only ids it has and reads the others as id 0. Output stays plain decoding's; where no
    token is past its rows, it proposes exactly what the target picks."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = LLM(str(tiny_llama), dtype="float32", progress=False)
    clean = [[t for t in p if t < 500] for p in prompts_20()]
    with_high = [[1, 505, 7, 511, 9, 505, 7]] + clean[1:]  # ids past the draft's rows, repeated
    for prompts, all_accepted in ((clean, True), (with_high, False)):
        llm = spec_llm(tiny_llama, "draft", short_vocab_draft, draft_vocab_size=0, draft_quantization="none")
        assert llm.engine.speculator.proposer.rows == 500
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(prompts, params)]
        stats = llm.engine.speculator.stats
        assert stats.num_proposed > 100
        assert (stats.num_accepted == stats.num_proposed) == all_accepted, stats
    accepted = stats.num_accepted
    sampled = llm.generate(with_high, SamplingParams(max_tokens=16, temperature=0.8, seed=1, ignore_eos=True))
    assert all(len(o.token_ids) == 16 for o in sampled) and stats.num_accepted > accepted  # probabilities padded
