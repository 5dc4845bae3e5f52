"""Continuous-batching scheduler: owns every request state change (admit, preempt, finish,
free). Each step it gives running requests their next tokens first (decode before new
prefill, FCFS), then admits waiting requests into what is left of the token budget, with
long prompts split into chunks. Tenants take turns at admission (the one with the fewest
requests running goes next; FCFS within a tenant), so one tenant's burst does not queue
ahead of everyone else's requests. Priorities (SamplingParams.priority, lower first) come
before all of that: a more urgent waiting request is admitted first, and one that finds the
KV cache full preempts the least urgent running request instead of waiting. When KV blocks
run out, the least urgent, most recently admitted running request (of the tenant with the
most running) is preempted: its blocks are freed and it is
recomputed later (prefix caching usually makes the recompute cheap). A waiting request whose next prompt block a running
prefill is computing waits for it rather than computing the shared prefix again.

With LoRA, a request holds (pins) its adapter's pool slot from admission until it finishes
or is preempted, so the adapters of one step never outnumber the slots. A waiting request
whose adapter cannot get a slot (all pinned) is skipped for now, not blocking the ones
behind it. Waiting requests whose adapter is already in a slot are admitted before those
that would load one (evicting an adapter others may be about to use), unless a request has
been passed over MAX_PASSED_OVER steps: then it goes in its FCFS place again. If such a
request still finds every slot pinned, the slot with the fewest running requests is drained:
no new request is admitted onto it until the starving one has a slot. Without that, a steady
stream of requests for the resident adapters keeps their slots pinned indefinitely, and the
requests for the others wait without bound."""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque

from .kv_cache import KVCacheManager
from .model_runner import StepOutput
from .request import Request, RequestStatus

MAX_PASSED_OVER = 8


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, lora_pool=None):
        self.kv = kv
        self.lora_pool = lora_pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.draining: str | None = None  # adapter key admitted no more until a starving request loads
        self._drain_for: Request | None = None  # that starving request
        self.share_prefills = True  # wait for a shared prefix a running prefill computes (False: bench baseline)
        self.fair_tenants = True  # tenants take turns at admission (False: FCFS, the bench baseline)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> list[tuple[Request, int]]:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            base = req.num_tokens - req.num_computed_tokens
            num_new = min(base + len(req.spec_token_ids), budget)
            _trim_spec(req, num_new - base)
            while not self.kv.allocate(req, num_new):
                if req.spec_token_ids:  # speculate less before taking anyone's blocks
                    _trim_spec(req, 0)
                    num_new = min(base, budget)
                    continue
                victim = self._victim(i)
                if self.running.index(victim) < i:  # scheduled already this step: it gives its tokens back
                    i -= 1
                    budget += self._unschedule(victim, scheduled)
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
        # After a preemption the cache is short: admitting new work would only thrash.
        admitted: list[Request] = []
        in_flight = self._prefill_blocks_in_flight()
        for req in self._admission_order() if not preempted else []:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if req.lora_key is not None and req.lora_key == self.draining:
                continue
            if self._waits_for_shared_prefix(req, in_flight):
                continue
            if not self._pin_adapter(req):
                continue
            if not req.block_ids:
                req.num_computed_tokens = self.kv.match_prefix(req)
                if req.first_scheduled_time is None:  # a re-admission's hits are its own earlier work
                    req.num_cached_tokens = req.num_computed_tokens
                self.kv.release_out_of_window(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new) and (victim := self._less_urgent(req)) is not None:
                budget += self._unschedule(victim, scheduled)  # a less urgent request makes room
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                self.running.remove(victim)
                self._preempt(victim)
            if not self.kv.allocate(req, num_new):
                self.kv.free(req)  # give back the prefix hits until it can run
                req.num_computed_tokens = 0
                self._unpin_adapter(req)
                break
            admitted.append(req)
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            scheduled.append((req, num_new))
            budget -= num_new
            self._add_prefill_blocks(req, in_flight)
        for req in admitted:
            self.waiting.remove(req)
        if admitted:
            for req in self.waiting:
                req.num_passed_over += 1
        self._choose_drain()
        return scheduled

    def _victim(self, i: int) -> Request:
        """Whom to preempt for running[i]: the least urgent (highest priority value) running
        request, and among those, of it and those after it (not yet scheduled this step), the
        most recently admitted request of the tenant with the most running. Plain LIFO would
        pick the request tenant turns admitted last, often a light tenant's, and preempt it
        again each time it is readmitted."""
        counts = Counter(r.tenant for r in self.running)
        victim = max(reversed(self.running[i:]), key=lambda r: (_priority(r), counts[r.tenant]))
        earlier = max(reversed(self.running[:i]), key=_priority, default=None)
        return earlier if earlier is not None and _priority(earlier) > _priority(victim) else victim

    def _less_urgent(self, req: Request) -> Request | None:
        """The running request a waiting `req` may preempt for room: the least urgent, the
        latest admitted of those, if it is less urgent than `req`."""
        victim = max(reversed(self.running), key=_priority, default=None)
        return victim if victim is not None and _priority(victim) > _priority(req) else None

    @staticmethod
    def _unschedule(req: Request, scheduled: list[tuple[Request, int]]) -> int:
        """Take `req` out of this step's schedule; returns the tokens it had."""
        for k, (r, num_new) in enumerate(scheduled):
            if r is req:
                del scheduled[k]
                return num_new
        return 0

    # -- shared prefixes ------------------------------------------------------------------
    # Requests that arrive together with one long shared prefix (a system prompt, an eval's
    # context) would each compute it. A waiting request whose next uncached prompt block is
    # being computed by a running request's prefill waits for it instead, then takes it from
    # the prefix cache. It cannot wait for good: that prefill completes the block, or its
    # request leaves the running set (finished or preempted), and either way the block stops
    # being in flight.

    def _prefill_blocks_in_flight(self) -> dict[bytes, Request]:
        in_flight: dict[bytes, Request] = {}
        if self.kv.enable_prefix_caching:
            for req in self.running:
                self._add_prefill_blocks(req, in_flight)
        return in_flight

    def _add_prefill_blocks(self, req: Request, in_flight: dict[bytes, Request]) -> None:
        """The full prompt blocks `req` has yet to compute (hashed when it was admitted)."""
        if self.kv.enable_prefix_caching and req.num_computed_tokens < req.num_prompt_tokens:
            first = req.num_computed_tokens // self.kv.block_size
            for h in req.block_hashes[first:req.num_prompt_tokens // self.kv.block_size]:
                in_flight.setdefault(h, req)

    def _waits_for_shared_prefix(self, req: Request, in_flight: dict[bytes, Request]) -> bool:
        if not in_flight or req.block_ids or not self.share_prefills or not req.takes_prefix_hits:
            return False
        h = self.kv.next_uncached_block(req)
        owner = in_flight.get(h) if h is not None else None
        if owner is None or owner is req:
            return False
        if req.needs_prompt_logprobs:  # its prefix is reused only with logprobs kept for it
            kept = owner.sampling_params.prompt_logprobs
            return kept is not None and kept >= req.sampling_params.prompt_logprobs
        return True

    def _choose_drain(self) -> None:
        """A drain serves one starving request (passed over too often, adapter not loaded)
        that faces all-pinned slots: the running adapter with the fewest requests is admitted
        no more, so its slot frees up, and the drain stays on until the starving request's
        adapter is loaded (the victim's own queued requests must not re-pin the slot first).
        It ends then, or when the victim left its slot anyway, or the request is gone: a drain
        that outlived its request shut the victim's requests out for as long as anyone else
        starved, for good once they starved themselves."""
        pool = self.lora_pool
        if pool is None:
            return
        if self.draining is not None:
            req = self._drain_for
            if (pool.is_loaded(req.lora_key) or not pool.is_loaded(self.draining)
                    or req.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED)):
                self.draining = self._drain_for = None
        if self.draining is not None or pool.num_pinned < pool.num_slots:
            return
        starving = next((r for r in self.waiting if r.lora_key is not None and r.num_passed_over >= MAX_PASSED_OVER
                         and not pool.is_loaded(r.lora_key)), None)
        running = Counter(r.lora_key for r in self.running if r.lora_key is not None)
        if starving is not None and running:
            self.draining = min(running, key=running.__getitem__)
            self._drain_for = starving

    def _admission_order(self):
        """Waiting requests, most urgent first; within a priority, those that need no adapter
        load first, each group in tenant turns. A generator: admission usually stops after a
        few, so a long queue is not sorted."""
        waiting = list(self.waiting)  # as it was: requests preempted for room meanwhile wait for the next step
        levels = sorted({_priority(r) for r in waiting})
        for level in levels:
            yield from self._adapters_first([r for r in waiting if _priority(r) == level] if len(levels) > 1 else waiting)

    def _adapters_first(self, waiting: list[Request]):
        if self.lora_pool is None:
            yield from self._tenant_turns(waiting)
            return
        now, later = [], []
        for req in waiting:
            needs_load = req.lora_key is not None and not self.lora_pool.is_loaded(req.lora_key)
            (later if needs_load and req.num_passed_over < MAX_PASSED_OVER else now).append(req)
        yield from self._tenant_turns(now)
        yield from self._tenant_turns(later)

    def _tenant_turns(self, reqs: list[Request]):
        """`reqs` with tenants taking turns: next comes the oldest request of the tenant with
        the fewest running (counting the ones handed out before it), so a tenant that queued
        a hundred requests delays another's next one by one admission, not a hundred. One
        tenant (or fair_tenants off): FCFS, which is also the order among ties."""
        queues: dict[str | None, deque] = {}
        for pos, req in enumerate(reqs):
            queues.setdefault(req.tenant, deque()).append((pos, req))
        if len(queues) < 2 or not self.fair_tenants:
            yield from reqs
            return
        running = Counter(r.tenant for r in self.running)
        turns = [(running[t], q[0][0], t) for t, q in queues.items()]
        heapq.heapify(turns)
        while turns:
            load, _, tenant = heapq.heappop(turns)
            queue = queues[tenant]
            yield queue.popleft()[1]
            if queue:
                heapq.heappush(turns, (load + 1, queue[0][0], tenant))

    def _pin_adapter(self, req: Request) -> bool:
        if req.lora_key is None:
            return True
        slot = self.lora_pool.acquire(req.lora_key, lambda: req.lora_weights)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _unpin_adapter(self, req: Request) -> None:
        if req.lora_slot >= 0:
            self.lora_pool.release(req.lora_slot)
            req.lora_slot = -1

    def _preempt(self, req: Request) -> None:
        _trim_spec(req, 0)
        self.kv.free(req)
        self._unpin_adapter(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, scheduled: list[tuple[Request, int]], output: StepOutput) -> None:
        """Record what the step computed and the tokens it emitted. Speculative tokens that
        were rejected are rolled back: their K/V positions no longer count, and blocks that
        only held them go back to the free list."""
        for req, num_new in scheduled:
            req.num_computed_tokens += num_new
        for req, tokens, accepted, logprobs in zip(output.requests, output.token_ids, output.num_accepted,
                                                   output.logprobs):
            rejected = len(req.spec_token_ids) - accepted
            if req.spec_token_ids:
                req.num_computed_tokens -= rejected
                _trim_spec(req, 0)
                self.kv.truncate(req, req.num_computed_tokens)
            req.output_token_ids.extend(tokens)
            if logprobs is not None:
                req.logprobs.extend(logprobs)
        for req, _ in scheduled:
            self.kv.cache_full_blocks(req)
            self.kv.release_out_of_window(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted) and free its blocks. Idempotent."""
        if req.is_finished:
            return
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self._unpin_adapter(req)
        self.requests.pop(req.request_id, None)


def _priority(req: Request) -> int:
    return req.sampling_params.priority


def _trim_spec(req: Request, keep: int) -> None:
    """Keep at most `keep` of the request's speculative tokens for this step."""
    if len(req.spec_token_ids) > keep:
        del req.spec_token_ids[max(keep, 0):]
        if req.spec_draft_probs is not None:
            req.spec_draft_probs = req.spec_draft_probs[:keep] if keep > 0 else None
