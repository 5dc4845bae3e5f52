"""The acceptance rule: emitted tokens follow the target's distribution whatever the
proposals' distribution (a chi-square test over fixed seeds, so it is deterministic), and
greedy acceptance is exact-match."""

from __future__ import annotations

import torch

from loragate.kernels.spec_sampling import accept_greedy, accept_sampled, sampling_probs

# chi-square critical values at p = 0.001
CHI2_CRIT = {5: 20.52, 7: 24.32, 24: 51.18}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_greedy_accepts_the_matching_prefix_then_the_targets_token():
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert accept_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]
    assert accept_greedy([4], []) == [4]


def _emitted_first_tokens(p, q_probs, deterministic_draft, n=6000):
    counts = torch.zeros(p.shape[1])
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        if deterministic_draft is not None:
            draft, q = [deterministic_draft], None
        else:
            draft = [int(torch.multinomial(q_probs[0], 1, generator=g))]
            q = q_probs
        counts[accept_sampled(p, draft, q, g)[0]] += 1
    return counts


def test_first_emitted_token_follows_the_target_with_a_bad_draft():
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0], [1 / 6] * 6])
    bad_q = torch.tensor([[0.02, 0.03, 0.05, 0.1, 0.3, 0.5]])  # mostly proposes what p never picks
    counts = _emitted_first_tokens(p, bad_q, None)
    assert chi_square(counts, p[0]) < CHI2_CRIT[5]
    # The test can fail: the proposals themselves are far from p.
    assert chi_square(_emitted_first_tokens(bad_q.expand(2, -1), bad_q, None), p[0]) > CHI2_CRIT[5] * 10


def test_first_emitted_token_follows_the_target_with_deterministic_proposals():
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25] * 4])
    for proposal in (0, 1, 3):  # a likely, an unlikely and an impossible proposal
        counts = _emitted_first_tokens(p, None, proposal)
        assert chi_square(counts, p[0]) < CHI2_CRIT[5]
        assert counts[3] == 0


def test_second_token_follows_the_target_after_an_accepted_first():
    p = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3], [1 / 3] * 3])
    q = torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.2, 0.2]])
    g = torch.Generator().manual_seed(1)
    joint = torch.zeros(3, 3)
    n = 0
    while n < 8000:
        d0 = int(torch.multinomial(q[0], 1, generator=g))
        d1 = int(torch.multinomial(q[1], 1, generator=g))
        out = accept_sampled(p, [d0, d1], q, g)
        if out[0] == 0 and len(out) >= 2:  # position 1 is only drawn from p[1] when position 0 was accepted
            joint[0, out[1]] += 1
            n += 1
    assert chi_square(joint[0], p[1]) < CHI2_CRIT[5]


def test_sampling_probs_applies_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = sampling_probs(logits, 0.5, 2, 1.0)[0]
    assert probs[2] == 0 and probs[3] == 0
    assert torch.allclose(probs[:2], torch.softmax(torch.tensor([4.0, 2.0]), 0))
    probs = sampling_probs(logits, 1.0, 0, 0.5)[0]
    assert probs[0] == 1.0
