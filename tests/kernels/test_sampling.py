"""kernels.sampling: top-k/top-p filtering against a naive per-row version, greedy and random
sampling (per-request generators, empirical distributions), and logprobs."""

from __future__ import annotations

import pytest
import torch

from loragate.kernels.sampling import greedy, logprobs_of, sample, filter_logits

NEG_INF = float("-inf")


def naive_keep(row: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, bool]:
    """The kept-token mask of one row, and whether the row is ambiguous (a token's mass before
    it lies within rounding distance of top_p, so fp32 and fp64 may legitimately disagree)."""
    vocab = row.shape[0]
    order = sorted(range(vocab), key=lambda i: -float(row[i]))
    k = vocab if top_k <= 0 else min(top_k, vocab)
    candidates = order[:k]
    logits = row.double()[candidates]
    probs = torch.softmax(logits, dim=0).tolist()
    keep = torch.zeros(vocab, dtype=torch.bool)
    mass, ambiguous = 0.0, False
    for token, p in zip(candidates, probs):
        # The first token's mass before it is exactly 0 in any precision; a -inf token's
        # verdict does not change the output.
        if mass > 0 and p > 0 and abs(mass - top_p) < 1e-5:
            ambiguous = True
        if mass >= top_p:  # the smallest prefix reaching top_p is complete
            break
        keep[token] = True
        mass += p
    return keep, ambiguous


def test_filter_logits_matches_naive():
    g = torch.Generator().manual_seed(0)
    vocab, n = 50, 400
    logits = torch.randn(n, vocab, generator=g) * 2
    logits[::7, :5] = NEG_INF  # some rows have banned tokens
    ks = torch.tensor([0, 1, 2, 5, 49, 50, 100])[torch.randint(0, 7, (n,), generator=g)]
    ps = torch.tensor([1e-6, 0.1, 0.5, 0.9, 0.99, 1.0], dtype=torch.float32)[torch.randint(0, 6, (n,), generator=g)]
    out = filter_logits(logits, ks, ps)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    num_ambiguous = 0
    for i in range(n):
        keep, ambiguous = naive_keep(logits[i], int(ks[i]), float(ps[i]))
        if ambiguous:
            num_ambiguous += 1
            continue
        want = torch.where(keep, logits[i], torch.full_like(logits[i], NEG_INF))
        assert torch.equal(out[i], want), (
            f"row {i} (top_k={int(ks[i])}, top_p={float(ps[i])}): kept {out[i].isfinite().nonzero().flatten().tolist()}, "
            f"want {want.isfinite().nonzero().flatten().tolist()}")
    assert num_ambiguous < n // 20, num_ambiguous  # the comparison really covered the rows
    assert not torch.equal(out.isfinite(), logits.isfinite())  # and filtering happened at all


def test_filter_edge_cases():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                           [2.0, 1.0, 0.0, -1.0],
                           [2.0, 1.0, 0.0, -1.0],
                           [0.0, 3.0, NEG_INF, 1.0],
                           [1.0, 2.0, 3.0, 4.0]])
    top_k = torch.tensor([0, 1, 0, 0, 10])
    top_p = torch.tensor([1e-9, 1.0, 1.0, 0.8, 1.0])
    out = filter_logits(logits, top_k, top_p)
    # top_p tiny still keeps the most likely token; top_k=1 keeps only it; no filter keeps all.
    assert out[0].isfinite().tolist() == [True, False, False, False]
    assert out[1].isfinite().tolist() == [True, False, False, False]
    assert torch.equal(out[2], logits[2])
    # probs of [0, 3, -inf, 1] ~ [0.042, 0.844, 0, 0.114]: 0.844 < 0.8 is false -> only token 1.
    assert out[3].isfinite().tolist() == [False, True, False, False]
    assert torch.equal(out[4], logits[4])  # top_k above the vocab size = off
    assert logits[3, 2] == NEG_INF  # input untouched (a new tensor is returned)


def test_min_p_after_top_k_matches_hf_warpers():
    """HF's order (top-k, then min-p relative to the most likely token) on random rows; the
    top-p part is covered against the naive version above."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 100, generator=g) * 3
    for top_k, min_p in ((0, 0.05), (0, 0.3), (10, 0.1), (3, 0.9), (0, 1.0)):
        want = logits.clone()
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        want = MinPLogitsWarper(min_p)(None, want)
        out = filter_logits(logits, torch.full((64,), top_k), torch.ones(64), torch.full((64,), min_p))
        assert torch.equal(out.isfinite(), want.isfinite()), (top_k, min_p)
        assert 0 < int(out.isfinite().sum()) < out.numel()  # it kept some and dropped some
    # min_p 0 is off, row by row.
    mixed = filter_logits(logits[:2], torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.tensor([0.0, 0.5]))
    assert torch.equal(mixed[0], logits[0]) and not bool(mixed[1].isfinite().all())


def test_top_p_keeps_the_token_that_crosses():
    # Sorted probs 0.4, 0.3, 0.2, 0.1: top_p = 0.6 keeps 0.4 and 0.3 (the crossing token);
    # 0.69 is also reached by the first two, so the third is dropped; 0.71 needs three.
    logits = torch.tensor([0.3, 0.1, 0.4, 0.2]).log().expand(3, 4).contiguous()
    out = filter_logits(logits, torch.zeros(3, dtype=torch.int64), torch.tensor([0.6, 0.69, 0.71]))
    assert out[0].isfinite().tolist() == [True, False, True, False]
    assert out[1].isfinite().tolist() == [True, False, True, False]
    assert out[2].isfinite().tolist() == [True, False, True, True]


def params(n, temperature=1.0, top_k=0, top_p=1.0):
    return (torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.int64), torch.full((n,), top_p))


def test_greedy_rows_take_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(33, 1000, generator=g) * 3
    temperature = torch.zeros(33)
    temperature[::3] = 0.7  # random rows between the greedy ones
    top_k = torch.randint(0, 5, (33,), generator=g)
    top_p = torch.full((33,), 0.5)
    gens = [torch.Generator().manual_seed(i) for i in range(33)]
    tokens = sample(logits, temperature, top_k, top_p, gens)
    assert tokens.shape == (33,) and tokens.dtype == torch.int64
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(dim=-1)[greedy])
    # All greedy: no generator is consulted (None is fine).
    assert torch.equal(sample(logits, torch.zeros(33), top_k, top_p, [None] * 33), logits.argmax(dim=-1))


@pytest.mark.parametrize("x_params", [(0.8, 0, 1.0), (1.0, 0, 0.9), (1.3, 20, 1.0)])
def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch(x_params):
    # Request X draws the same tokens alone and in a batch with greedy rows, rows with other
    # seeds and rows that need filtering (which sends X's row through the filter too).
    temperature, top_k, top_p = x_params
    vocab, steps = 500, 40
    g = torch.Generator().manual_seed(2)
    x_logits = torch.randn(steps, vocab, generator=g) * 4  # a wide range: some tokens ~1e-10 likely
    other_logits = torch.randn(steps, 3, vocab, generator=g)

    gen_alone = torch.Generator().manual_seed(1234)
    alone = [int(sample(x_logits[s:s + 1], *params(1, temperature, top_k, top_p), [gen_alone])[0])
             for s in range(steps)]

    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(1234), None, torch.Generator().manual_seed(9)]
    in_batch = []
    for s in range(steps):
        logits = torch.stack([other_logits[s, 0], x_logits[s], other_logits[s, 1], other_logits[s, 2]])
        tokens = sample(logits, torch.tensor([1.0, temperature, 0.0, 0.5]), torch.tensor([0, top_k, 0, 3]),
                        torch.tensor([0.95, top_p, 1.0, 1.0]), gens)
        in_batch.append(int(tokens[1]))
    assert in_batch == alone

    gen_other = torch.Generator().manual_seed(4321)
    other_seed = [int(sample(x_logits[s:s + 1], *params(1, temperature, top_k, top_p), [gen_other])[0])
                  for s in range(steps)]
    assert other_seed != alone  # the draws are random, so the equality above means something


def draw(logits: torch.Tensor, num: int, seed: int, **kw) -> torch.Tensor:
    """num draws from one row of logits, as num rows sharing one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return sample(logits.expand(num, -1).contiguous(), *params(num, **kw), [gen] * num)


def assert_frequencies(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square goodness of fit at p ~ 1e-6 (fixed seeds: deterministic, not flaky)."""
    num = tokens.shape[0]
    counts = torch.bincount(tokens, minlength=probs.shape[0]).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens of probability 0: {counts.tolist()}"
    expected = probs[support].double() * num
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # chi-square quantiles at 1 - 1e-6 for 1..7 degrees of freedom
    critical = {1: 23.9, 2: 27.6, 3: 30.7, 4: 33.4, 5: 35.9, 6: 38.3, 7: 40.5}[dof]
    assert chi2 < critical, f"chi2 {chi2:.1f} >= {critical} (dof {dof}): counts {counts.tolist()}, expected {expected.tolist()}"
    assert float((counts / num - probs.double()).abs().max()) < 0.015


LOGITS8 = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.5, 0.25])


def test_sampling_frequencies_match_softmax():
    tokens = draw(LOGITS8, 20000, seed=3)
    assert_frequencies(tokens, LOGITS8.softmax(dim=-1))


def test_temperature_sharpens_the_distribution():
    tokens = draw(LOGITS8, 20000, seed=4, temperature=0.5)
    assert_frequencies(tokens, (LOGITS8 / 0.5).softmax(dim=-1))


def test_top_k_sampling_stays_in_the_top_k():
    tokens = draw(LOGITS8, 20000, seed=5, top_k=2)
    top2 = LOGITS8.topk(2).indices
    probs = torch.zeros(8)
    probs[top2] = LOGITS8[top2].softmax(dim=-1)
    assert set(tokens.unique().tolist()) <= set(top2.tolist())
    assert_frequencies(tokens, probs)


def test_top_p_sampling_renormalises_the_nucleus():
    base = torch.tensor([0.05, 0.4, 0.02, 0.3, 0.2, 0.03])
    tokens = draw(base.log(), 20000, seed=6, top_p=0.6)
    probs = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.0, 0.0]) / 0.7
    assert_frequencies(tokens, probs)


def test_logprobs_of():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 300, generator=g) * 3
    tokens = torch.randint(0, 300, (5,), generator=g)
    chosen, top_vals, top_ids = logprobs_of(logits, tokens, 6)
    logp = logits.double() - logits.double().logsumexp(dim=-1, keepdim=True)
    assert chosen.shape == (5,) and top_vals.shape == top_ids.shape == (5, 6)
    torch.testing.assert_close(chosen.double(), logp.gather(1, tokens[:, None]).squeeze(1), atol=1e-5, rtol=1e-6)
    want_ids = logp.argsort(dim=-1, descending=True)[:, :6]
    assert torch.equal(top_ids, want_ids)
    torch.testing.assert_close(top_vals.double(), logp.gather(1, want_ids), atol=1e-5, rtol=1e-6)
    assert (top_vals[:, :-1] >= top_vals[:, 1:]).all()
    assert (top_vals <= 0).all() and torch.allclose(logp.exp().sum(-1), torch.ones(5, dtype=torch.float64))
    chosen0, vals0, ids0 = logprobs_of(logits, tokens, 0)
    assert torch.equal(chosen0, chosen) and vals0.shape == (5, 0) and ids0.shape == (5, 0)
    assert ids0.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 15), (5, 16), (33, 49152 + 7), (2, 100)])
def test_greedy_is_the_first_maximum_of_each_row(rows, vocab, dtype):
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g).mul(4).round().to(dtype)  # coarse values: many ties
    logits[0, -1] = 1e4  # the maximum in the scalar tail
    if rows > 1:
        logits[1] = float("-inf")  # nothing but -inf: index 0
    if rows > 2:
        logits[2, vocab // 2:] = 50  # a tie across lanes and blocks: the first one wins
    want = logits.float().argmax(dim=-1)
    assert torch.equal(greedy(logits), want)
    assert torch.equal(greedy(logits[:, : max(1, vocab - 3)]), logits[:, : max(1, vocab - 3)].float().argmax(dim=-1))


@pytest.mark.parametrize("vocab", [1, 31, 32, 49, 1000, 49152])
def test_token_bitmask_native_matches_reference(vocab):
    from loragate.kernels.sampling import apply_token_bitmask, bitmask_to_bool

    g = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (5, words), dtype=torch.int32, generator=g)
    mask[1] = 0
    mask[2] = -1  # every bit set, including the sign bit
    logits = torch.randn(5, vocab, generator=g)
    got = logits.clone()
    apply_token_bitmask(got, mask)
    allowed = bitmask_to_bool(mask, vocab)
    assert torch.equal(got, logits.masked_fill(~allowed, float("-inf")))
    for r in range(5):  # the reference unpacks bit i of word i // 32, least significant first
        want = [bool((int(mask[r, i // 32]) >> (i % 32)) & 1) for i in range(min(vocab, 70))]
        assert allowed[r, :70].tolist() == want
    strided = torch.randn(3, vocab + 7, generator=g)[:, :vocab]  # rows apart by more than their width
    want = strided.masked_fill(~allowed[:3], float("-inf"))
    apply_token_bitmask(strided, mask[:3])
    assert torch.equal(strided, want)
