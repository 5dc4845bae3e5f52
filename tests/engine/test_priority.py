"""Request priorities in the scheduler (vLLM's convention: a lower value runs first): admission
in priority order, and a more urgent request that finds the KV cache full preempts a less
urgent one rather than waiting behind it, with every output still the tokens it has alone."""

from __future__ import annotations

import pytest

from loragate.engine import InvalidRequestError, SamplingParams

from .test_scheduling import assert_all_blocks_free, drain, make_engine, prompts_of


def finish_order(engine, requests) -> list[str]:
    for rid, prompt, params in requests:
        engine.add_request(prompt, params, request_id=rid)
    order = []
    while engine.has_unfinished:
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_waiting_requests_are_admitted_most_urgent_first(tiny_llama):
    prompts = prompts_of([12, 9, 15, 11])
    params = lambda p: SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, priority=p)  # noqa: E731
    requests = [("a", prompts[0], params(1)), ("b", prompts[1], params(1)), ("c", prompts[2], params(0)),
                ("d", prompts[3], params(-1))]
    assert finish_order(make_engine(tiny_llama, max_num_seqs=1), requests) == ["d", "c", "a", "b"]
    same = [(rid, p, params(0)) for rid, p, _ in requests]
    assert finish_order(make_engine(tiny_llama, max_num_seqs=1), same) == ["a", "b", "c", "d"]  # FCFS


def run_arrivals(engine, arrivals) -> tuple[list, dict[str, int]]:
    """The final RequestOutputs in the order requests finish, and the step each finished at;
    arrivals[step] as in drain."""
    finished, steps, step = [], {}, 0
    while engine.has_unfinished or any(s >= step for s in arrivals):
        for prompt, params, rid in arrivals.get(step, []):
            engine.add_request(prompt, params, request_id=rid)
        for out in engine.step():
            if out.finished:
                finished.append(out)
                steps[out.request_id] = step
        step += 1
    return finished, steps


@pytest.mark.parametrize("urgent_priority", [0, 1])
def test_an_urgent_request_preempts_a_less_urgent_one_when_the_cache_is_full(tiny_llama, urgent_priority):
    prompts = prompts_of([100, 110, 60])
    slow = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, priority=1)
    urgent = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, priority=urgent_priority)
    arrivals = {0: [(prompts[0], slow, "low0"), (prompts[1], slow, "low1")], 2: [(prompts[2], urgent, "high")]}
    expected = drain(make_engine(tiny_llama), arrivals)
    # 16 blocks x 16 = 256 tokens of KV: the slow requests' 14 prompt blocks leave no room for it.
    tight = make_engine(tiny_llama, kv_cache_memory=16 * 16 * 2 * 2 * 2 * 16 * 4)
    assert tight.kv.num_blocks == 16
    finished, steps = run_arrivals(tight, arrivals)
    if urgent_priority == 0:  # it took a slow one's room at once instead of waiting behind them
        assert finished[0].request_id == "high" and steps["high"] == 2 + 8 - 1
    else:  # the control: as urgent as the others, it waits for one of them to finish
        assert finished[0].request_id != "high"
    assert tight.scheduler.num_preemptions > 0
    assert {o.request_id: o.token_ids for o in finished} == expected
    assert_all_blocks_free(tight)


def test_a_running_urgent_request_that_needs_a_block_preempts_a_less_urgent_one(tiny_llama):
    """It was admitted while there was room; growing, it finds none, and the slow request
    scheduled before it in the step gives its room back rather than the urgent one."""
    prompts = prompts_of([100, 60])
    slow = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True, priority=1)
    urgent = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, priority=0)
    arrivals = {0: [(prompts[0], slow, "low")], 1: [(prompts[1], urgent, "high")]}
    expected = drain(make_engine(tiny_llama), arrivals)
    tight = make_engine(tiny_llama, kv_cache_memory=13 * 16 * 2 * 2 * 2 * 16 * 4)
    finished, _ = run_arrivals(tight, arrivals)
    assert [o.request_id for o in finished] == ["high", "low"]
    assert [o.num_preemptions for o in finished] == [0, 1]  # the urgent one ran straight through
    assert {o.request_id: o.token_ids for o in finished} == expected
    assert_all_blocks_free(tight)


def test_a_priority_must_be_an_integer():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(priority=0.5)
    assert e.value.param == "priority"
