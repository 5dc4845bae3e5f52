"""The speculation controller's step-time model and budget choice, and n-gram lookup."""

from __future__ import annotations

import pytest

from loragate.engine.request import Request
from loragate.engine.sampling_params import SamplingParams
from loragate.engine.spec.controller import (EXPLORE_EVERY, MAX_BACKOFF, REPROBE_EVERY, Acceptance, SpecController,
                                             StepTimeModel)
from loragate.engine.spec.ngram import NgramProposer


def req(acceptance: float, later: float | None = None) -> Request:
    r = Request("r", [1, 2, 3], SamplingParams())
    later = acceptance if later is None else later
    r.spec_acceptance = Acceptance([acceptance * 100, 100.0], [later * 100, 100.0])
    return r


def trained(controller: SpecController, a: float, b: float, round_seconds: float) -> SpecController:
    for n in (1, 4, 8, 16, 32, 64):
        controller.record_step(n, a + b * n)
    controller.record_round(round_seconds)
    for batch_size in (1, 2, 8):  # the guard's measured plain steps
        for _ in range(3):
            controller.record_realized(batch_size, False, batch_size, a + b * batch_size)
    return controller


def test_step_time_model_fits_a_line_and_starts_from_a_prior():
    m = StepTimeModel(prior_slope_fraction=0.1)
    assert m.predict(3) is None
    m.add(4, 0.2)
    assert m.predict(4) == pytest.approx(0.2) and m.predict(14) == pytest.approx(0.2 + 10 * 0.02)
    for n in (1, 8, 20, 40):
        m.add(n, 0.1 + 0.005 * n)
    assert m.predict(60) == pytest.approx(0.1 + 0.005 * 60, rel=0.15)


def test_cheap_positions_and_likely_tokens_get_full_speculation():
    c = trained(SpecController(max_k=6, cost_per_token=0.3), a=0.15, b=0.0005, round_seconds=0.01)
    assert c.plan([req(0.95)], [100], batch_size=1) == [6]


def test_expensive_positions_turn_speculation_off_for_a_busy_batch():
    # Each position costs as much as a whole memory-bound step: verifying never pays.
    c = trained(SpecController(max_k=6, cost_per_token=0.3), a=0.05, b=0.05, round_seconds=0.05)
    plans = [c.plan([req(0.7) for _ in range(8)], [100] * 8, batch_size=8) for _ in range(EXPLORE_EVERY)]
    # All plain, but for one step that tries two proposals each, to keep the costs measured.
    assert plans[:-1] == [[0] * 8] * (EXPLORE_EVERY - 1) and plans[-1] == [2] * 8


def test_budget_goes_to_the_requests_most_likely_to_accept():
    c = trained(SpecController(max_k=6, cost_per_token=0.3), a=0.15, b=0.004, round_seconds=0.01)
    ks = c.plan([req(0.95), req(0.3)], [100, 100], batch_size=2)
    assert ks[0] > ks[1]
    # Limits (max_tokens, context) cap a request whatever its acceptance.
    assert c.plan([req(0.99)], [2], batch_size=1) == [2]


def test_guard_measures_plain_steps_first_then_follows_measured_throughput():
    c = SpecController(max_k=6, cost_per_token=0.3)
    for n in (1, 7):
        c.record_step(n, 0.15 + 0.0005 * n)
    c.record_round(0.01)
    assert c.plan([req(0.95)], [100], batch_size=1) == [0]  # no plain step of this size measured yet
    for _ in range(3):
        c.record_realized(1, False, 1, 0.15)
    assert c.plan([req(0.95)], [100], batch_size=1) == [6]
    for _ in range(3):  # speculative steps that measured slower than plain ones, whatever the model says
        c.record_realized(1, True, 2, 0.5)
    assert c.plan([req(0.95)], [100], batch_size=1) == [0]
    assert c.plan([req(0.95)], [100], batch_size=2) == [0]  # another batch size is judged on its own


def test_exploration_and_reprobing():
    assert SpecController(max_k=4, cost_per_token=0.3).plan([req(0.99)], [100], batch_size=1) == [0]  # measure first
    c = trained(SpecController(max_k=4, cost_per_token=0.3), a=0.15, b=0.0005, round_seconds=0.01)
    good, hopeless = req(0.95), req(0.01)
    plans = [c.plan([good, hopeless], [100, 100], batch_size=2) for _ in range(2 * EXPLORE_EVERY)]
    assert [p for p in plans if p[0] == 0] == [[0, 0], [0, 0]]  # one plain step per EXPLORE_EVERY
    probes = [p[1] for p in plans if p[0] > 0]
    assert max(probes) == 1 and probes.count(1) >= len(probes) // REPROBE_EVERY - 1
    # Alone, a hopeless request is not worth a proposer round, not even to re-probe it.
    assert all(c.plan([hopeless], [100], batch_size=1) == [0] for _ in range(2 * REPROBE_EVERY))


def test_acceptance_estimates_first_and_later_proposals_apart():
    a = Acceptance([1.0, 1.0], [1.0, 2.0])
    assert a.marginal(1) == 1.0 and a.marginal(3) == pytest.approx(0.25)
    a = Acceptance()
    a.update(proposed=4, accepted=4)  # first accepted; 3 later ones, all accepted
    assert a.first == pytest.approx([0.8 * 1.6 + 1, 0.8 * 2 + 1])
    assert a.later == pytest.approx([0.8 * 1.6 + 3, 0.8 * 2 + 3])
    b = Acceptance()
    b.update(proposed=4, accepted=2)  # first accepted; later: one accepted, one rejected
    assert b.later == pytest.approx([0.8 * 1.6 + 1, 0.8 * 2 + 2])
    c = Acceptance()
    c.update(proposed=4, accepted=0)  # the first rejected: no later position reached
    assert c.first == pytest.approx([0.8 * 1.6, 0.8 * 2 + 1]) and c.later == pytest.approx([1.6 * 0.8, 2 * 0.8])


def test_runs_of_acceptance_earn_longer_proposals():
    c = trained(SpecController(max_k=6, cost_per_token=0.3), a=0.15, b=0.001, round_seconds=0.04)
    assert c.plan([req(0.7, later=0.95)], [100], batch_size=1) == [6]
    assert c.plan([req(0.7, later=0.7)], [100], batch_size=1) == [2]
    # Draft rounds are shared by the batch: once a bursty request pays for six rounds, the
    # other's extra positions cost only their verification.
    assert c.plan([req(0.7, later=0.95), req(0.7, later=0.7)], [100, 100], batch_size=2) == [6, 6]


@pytest.mark.parametrize("tokens, k, expected", [
    ([1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),  # the 3-gram "1 2 3" occurred before, followed by 9 1
    ([5, 1, 2, 7, 7, 1, 2, 8, 1, 2], 3, [8, 1, 2]),  # the latest match wins
    ([4, 5, 6, 1, 5, 6, 2, 4, 5, 6], 1, [1]),  # the longest n-gram wins over a later shorter match
    ([1, 2, 3, 4, 5], 3, []),  # nothing repeats
    ([256, 1, 7, 1, 256], 2, []),  # byte-level matches that straddle tokens are not matches
    ([3, 3, 3, 3], 5, [3]),  # overlapping with the suffix itself: only what exists
])
def test_ngram_lookup(tokens, k, expected):
    assert NgramProposer(2, 4).lookup(tokens, k) == expected


def test_budget_grows_only_to_twice_the_largest_measured_step():
    c = SpecController(max_k=6, cost_per_token=0.3)
    for n in (1, 2):
        c.record_step(n, 0.15)
    c.record_round(0.001)
    for _ in range(3):
        c.record_realized(1, False, 1, 0.15)
    assert c.plan([req(0.99)], [100], batch_size=1) == [3]  # 1 + 3 positions = twice the 2 measured
    c.record_step(4, 0.15)
    assert c.plan([req(0.99)], [100], batch_size=1) == [6]


def test_while_speculation_measures_slower_its_tries_get_rarer():
    """Each exploration step that finds the guard still against speculation doubles the wait
    for the next one at that batch size (up to MAX_BACKOFF); measuring it faster resets it."""
    c = trained(SpecController(max_k=6, cost_per_token=0.3), a=0.15, b=0.0005, round_seconds=0.01)
    for _ in range(3):
        c.record_realized(2, True, 2, 0.5)  # speculative steps measured slower than plain ones
    steps = [i + 1 for i in range(40 * EXPLORE_EVERY) if c.plan([req(0.95)] * 2, [100] * 2, batch_size=2) != [0, 0]]
    assert steps == [EXPLORE_EVERY * k for k in (1, 2, 4, 8, 16, 32)] and MAX_BACKOFF == 16
    for _ in range(10):
        c.record_realized(2, True, 20, 0.5)
    assert c.plan([req(0.95)] * 2, [100] * 2, batch_size=2) != [0, 0] and not c.backoff
