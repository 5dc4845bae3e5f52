"""paged_attention: the native short-query kernel and the torch reference against each other
and against a naive float64 attention written here, over scattered block tables, GQA,
head dims, block sizes, dtypes, decode and speculative (multi-token) queries, and prefill
spans with and without a cached prefix."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loragate.kernels import native
from loragate.kernels.attention import AttentionMetadata, PrefillSpan, decode_metadata, paged_attention, write_slots

BATCH_SIZES = (1, 2, 3, 7, 16, 33)
MAX_CTX = 700
# Tolerances for comparing two bf16 results, or a bf16 result with the float64 truth: the output
# is rounded to bf16 (relative error up to 2^-8) and values are O(1).
BF16_ATOL, BF16_RTOL = 4e-3, 8e-3
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5


def test_native_library_is_available():
    # Every native-vs-reference comparison below is void unless the C kernels actually built.
    assert native.library() is not None


# ---------------------------------------------------------------------------------------------
# Case construction


class Case:
    """A packed batch: requests (context_len, query_len) with their K/V written to a paged
    cache at scattered block ids, plus the logical (unpaged) K/V for the naive check."""

    def __init__(self, requests, *, kv_heads, group, head_dim, block_size, dtype, seed, strided_q=False,
                 garbage=5.0, num_spare_blocks=3):
        g = torch.Generator().manual_seed(seed)
        self.requests = requests  # list of (context_len, query_len, kind) kind in {"short", "prefill"}
        self.kv_heads, self.group, self.d, self.block_size, self.dtype = kv_heads, group, head_dim, block_size, dtype
        self.heads = kv_heads * group
        blocks_needed = [-(-ctx // block_size) for ctx, _, _ in requests]
        num_blocks = sum(blocks_needed) + num_spare_blocks
        # Unowned slots (spare blocks, the tail of each last block) hold finite garbage of a
        # different mean: reading one by mistake moves the result far outside tolerance.
        self.k_cache = (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) * 3 + garbage).to(dtype)
        self.v_cache = (torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g) * 3 + garbage).to(dtype)
        perm = torch.randperm(num_blocks, generator=g)
        self.block_ids, self.k_ctx, self.v_ctx, slot_parts = [], [], [], []
        self.query_start, pos = [], 0
        used = 0
        for (ctx, n, _), nb in zip(requests, blocks_needed):
            ids = perm[used:used + nb]
            used += nb
            self.block_ids.append(ids)
            slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:ctx]
            k = torch.randn(ctx, kv_heads, head_dim, generator=g).to(dtype)
            v = torch.randn(ctx, kv_heads, head_dim, generator=g).to(dtype)
            write_slots(self.k_cache, slots, k)
            write_slots(self.v_cache, slots, v)
            self.k_ctx.append(k)
            self.v_ctx.append(v)
            slot_parts.append(slots[ctx - n:])
            self.query_start.append(pos)
            pos += n
        self.num_tokens = pos
        self.slot_mapping = torch.cat(slot_parts)
        q = torch.randn(pos, self.heads + (2 * kv_heads if strided_q else 0), head_dim, generator=g).to(dtype)
        # strided_q: q is a view of a wider qkv-like tensor, as the model's rope step returns it.
        self.q = q[:, :self.heads] if strided_q else q
        self.k_new = torch.cat([k[ctx - n:] for k, (ctx, n, _) in zip(self.k_ctx, requests)])
        self.v_new = torch.cat([v[ctx - n:] for v, (ctx, n, _) in zip(self.v_ctx, requests)])
        self.scale = 1.0 / math.sqrt(head_dim)

    def meta(self, use_native: bool) -> AttentionMetadata:
        bs = self.block_size
        short = [i for i, r in enumerate(self.requests) if r[2] == "short"]
        meta = AttentionMetadata(slot_mapping=self.slot_mapping.clone(), block_size=bs, use_native=use_native)
        if short:
            max_blocks = max(len(self.block_ids[i]) for i in short)
            table = torch.zeros(len(short), max_blocks, dtype=torch.int64)
            for row, i in enumerate(short):
                table[row, :len(self.block_ids[i])] = self.block_ids[i]
            meta.query_start = torch.tensor([self.query_start[i] for i in short], dtype=torch.int64)
            meta.query_len = torch.tensor([self.requests[i][1] for i in short], dtype=torch.int64)
            meta.context_len = torch.tensor([self.requests[i][0] for i in short], dtype=torch.int64)
            meta.block_table = table
        for i, (ctx, n, kind) in enumerate(self.requests):
            if kind != "prefill":
                continue
            start = self.query_start[i]
            slots = None
            if ctx != n:
                slots = (self.block_ids[i][:, None] * bs + torch.arange(bs)).reshape(-1)[:ctx]
            meta.prefill_spans.append(PrefillSpan(start, start + n, slots))
        return meta

    def run(self, use_native: bool, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        return paged_attention(self.q, self.k_new, self.v_new, self.k_cache, self.v_cache, self.meta(use_native),
                               self.scale, window, softcap)

    def naive(self, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Per request, per head: softmax(q K^T * scale, causal limit) V in float64; with a
        window, query j also sees nothing at or below limit[j] - window; with a softcap, the
        scores are softcap * tanh(scores / softcap) first."""
        out = torch.zeros(self.num_tokens, self.heads, self.d, dtype=torch.float64)
        for i, (ctx, n, _) in enumerate(self.requests):
            s = self.query_start[i]
            for h in range(self.heads):
                kvh = h // self.group
                q = self.q[s:s + n, h].double()  # [n, d]
                k = self.k_ctx[i][:, kvh].double()  # [ctx, d]
                v = self.v_ctx[i][:, kvh].double()
                scores = q @ k.T * self.scale  # [n, ctx]
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                limit = ctx - n + torch.arange(n)  # query j sees positions 0 .. limit[j]
                pos = torch.arange(ctx)[None, :]
                hidden = pos > limit[:, None]
                if window is not None:
                    hidden |= pos <= limit[:, None] - window
                scores = scores.masked_fill(hidden, float("-inf"))
                out[s:s + n, h] = scores.softmax(dim=-1) @ v
        return out


def assert_close_to(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = (BF16_ATOL, BF16_RTOL) if dtype == torch.bfloat16 else (FP32_ATOL, FP32_RTOL)
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - want).abs() - rtol * want.abs()
    worst = int(err.argmax())
    assert float(err.max()) <= atol, (
        f"{what}: max |got - want| - rtol*|want| = {float(err.max()):.3g} > {atol} "
        f"at flat index {worst}: got {got.view(-1)[worst]:.6g}, want {want.view(-1)[worst]:.6g}")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 steps between two bf16 tensors (+0 and -0 coincide)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int16).int() & 0xFFFF
        return torch.where(bits & 0x8000 != 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def assert_native_bf16_nearly_correctly_rounded(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # The native kernel accumulates in fp32 from exact bf16 products, so its output is the
    # float64 truth rounded to bf16, or one bf16 step away (absolute slack only near zero).
    ulps = bf16_ulps(got, want.to(torch.bfloat16))
    bad = (ulps > 1) & ((got.double() - want).abs() > 1e-4)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements more than 1 bf16 ulp from the truth (max {int(ulps.max())})"


def random_context(g: torch.Generator, n: int, block_size: int, pick: int) -> int:
    """A context length >= n: alternately an edge case around block boundaries or uniform."""
    edges = [n, block_size - 1, block_size, block_size + 1, 2 * block_size, 3 * block_size - 1,
             MAX_CTX // block_size * block_size, MAX_CTX]
    if pick % 2 == 0:
        return max(n, edges[(pick // 2) % len(edges)])
    return int(torch.randint(n, MAX_CTX + 1, (1,), generator=g))


def short_requests(seed: int, batch: int, mixed: bool, block_size: int):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for b in range(batch):
        n = int(torch.randint(1, 17, (1,), generator=g)) if mixed else 1
        if mixed and b == 0:
            n = 16  # the longest short query
        reqs.append((random_context(g, n, block_size, seed + b), n, "short"))
    if batch >= 3:
        reqs[-1] = (1 if not mixed else reqs[-1][1], reqs[-1][1], "short")  # context == query length
    return reqs


# ---------------------------------------------------------------------------------------------
# Short-query batches: native kernel vs torch reference vs naive

DTYPES = (torch.float32, torch.bfloat16)
GRID = list(itertools.product(DTYPES, (64, 96, 128), (16, 32), (1, 3, 4), (False, True)))


@pytest.mark.parametrize("index", range(len(GRID)))
def test_short_queries_native_reference_naive(index):
    # Full product of dtype x head_dim x block_size x group x (decode | mixed 1..16); the batch
    # size cycles through BATCH_SIZES so each appears with every dtype and query mode.
    dtype, d, block_size, group, mixed = GRID[index]
    batch = BATCH_SIZES[index % len(BATCH_SIZES)]
    kv_heads = 1 + index % 2
    reqs = short_requests(1000 + index, batch, mixed, block_size)
    case = Case(reqs, kv_heads=kv_heads, group=group, head_dim=d, block_size=block_size, dtype=dtype,
                seed=index, strided_q=index % 3 == 0)
    label = f"{dtype} d={d} bs={block_size} group={group} kv_heads={kv_heads} batch={batch} mixed={mixed}"
    assert native.supports(case.q, case.block_size)  # else use_native=True would silently test the reference twice
    got_native = case.run(use_native=True)
    got_ref = case.run(use_native=False)
    want = case.naive()
    assert got_native.dtype == dtype and got_native.shape == (case.num_tokens, case.heads, d)
    assert_close_to(got_native, want, dtype, f"native vs naive [{label}]")
    assert_close_to(got_ref, want, dtype, f"reference vs naive [{label}]")
    assert_close_to(got_native, got_ref.double(), dtype, f"native vs reference [{label}]")
    if dtype == torch.bfloat16:
        assert_native_bf16_nearly_correctly_rounded(got_native, want, f"native [{label}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", (16, 32))
def test_every_context_length_around_block_boundaries(dtype, block_size):
    # One request per context length 1 .. 3 blocks + 1, decode and 4-token queries: any
    # off-by-one in the causal limit or the last partial block shows up at small contexts.
    reqs = [(ctx, min(ctx, 1 + ctx % 4), "short") for ctx in range(1, 3 * block_size + 2)]
    case = Case(reqs, kv_heads=2, group=2, head_dim=64, block_size=block_size, dtype=dtype, seed=7)
    case.scale *= 3  # peaked softmax: one extra or missing position changes the output visibly
    want = case.naive()
    got = case.run(use_native=True)
    assert_close_to(got, want, dtype, "native")
    assert_close_to(case.run(use_native=False), want, dtype, "reference")
    if dtype == torch.bfloat16:
        assert_native_bf16_nearly_correctly_rounded(got, want, "native")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", (64, 96, 256))
def test_native_reads_only_the_context(dtype, head_dim):
    # NaN in every slot a request does not own (spare blocks, the tail of its last block):
    # the native kernel must never touch them (a probability-0 NaN still poisons a sum).
    reqs = [(ctx, n, "short") for ctx, n in ((1, 1), (17, 1), (31, 5), (40, 16), (65, 2), (100, 1))]
    case = Case(reqs, kv_heads=2, group=3, head_dim=head_dim, block_size=16, dtype=dtype, seed=3,
                garbage=float("nan"))
    assert_close_to(case.run(use_native=True), case.naive(), dtype, "native with NaN outside the context")


@pytest.mark.parametrize("dtype", DTYPES)
def test_peaked_attention_selects_the_right_positions(dtype):
    # Each query matches exactly one key strongly (score 40, the others far below): the output must be that
    # key's V row, so reading a K/V row from the wrong slot, head or block cannot go unnoticed.
    d, bs, kv_heads, group = 64, 16, 2, 2
    reqs = [(ctx, n, "short") for ctx, n in ((5, 1), (50, 3), (129, 16), (700, 1))]
    case = Case(reqs, kv_heads=kv_heads, group=group, head_dim=d, block_size=bs, dtype=dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    q = case.q.clone()
    for i, (ctx, n, _) in enumerate(reqs):
        for j in range(n):
            for h in range(case.heads):
                target = int(torch.randint(0, ctx - n + j + 1, (1,), generator=g))
                key = case.k_ctx[i][target, h // group].float()
                q[case.query_start[i] + j, h] = (key / key.norm() * 40 / case.scale / key.norm()).to(dtype)
    case.q = q
    want = case.naive()
    assert_close_to(case.run(use_native=True), want, dtype, "native")
    assert_close_to(case.run(use_native=False), want, dtype, "reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", (32, 80, 160, 256))
def test_other_head_dims(dtype, head_dim):
    # Head dims off the 64/128 fast path still go through the native kernel (d <= 256).
    reqs = [(ctx, n, "short") for ctx, n in ((1, 1), (33, 4), (200, 1), (64, 16))]
    case = Case(reqs, kv_heads=1, group=3, head_dim=head_dim, block_size=16, dtype=dtype, seed=head_dim)
    want = case.naive()
    got = case.run(use_native=True)
    assert_close_to(got, want, dtype, f"native d={head_dim}")
    if dtype == torch.bfloat16:
        assert_native_bf16_nearly_correctly_rounded(got, want, f"native d={head_dim}")
    assert_close_to(case.run(use_native=False), want, dtype, f"reference d={head_dim}")


def test_bf16_head_dim_96():
    reqs = [(ctx, n, "short") for ctx, n in ((1, 1), (20, 1), (200, 3), (64, 16))]
    case = Case(reqs, kv_heads=1, group=2, head_dim=96, block_size=16, dtype=torch.bfloat16, seed=96)
    assert_close_to(case.run(use_native=True), case.naive(), torch.bfloat16, "native bf16 d=96")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", (8, 48, 64))
def test_other_block_sizes(dtype, block_size):
    reqs = [(ctx, n, "short") for ctx, n in ((1, 1), (block_size + 1, 2), (300, 16), (5 * block_size, 1))]
    case = Case(reqs, kv_heads=2, group=4, head_dim=64, block_size=block_size, dtype=dtype, seed=block_size)
    want = case.naive()
    got = case.run(use_native=True)
    assert_close_to(got, want, dtype, f"native block_size={block_size}")
    if dtype == torch.bfloat16:
        assert_native_bf16_nearly_correctly_rounded(got, want, f"native block_size={block_size}")
    assert_close_to(case.run(use_native=False), want, dtype, f"reference block_size={block_size}")


def test_block_size_128_falls_back_or_works():
    reqs = [(ctx, n, "short") for ctx, n in ((1, 1), (130, 2), (300, 1))]
    case = Case(reqs, kv_heads=1, group=2, head_dim=64, block_size=128, dtype=torch.float32, seed=128)
    assert_close_to(case.run(use_native=True), case.naive(), torch.float32, "native block_size=128")


# ---------------------------------------------------------------------------------------------
# Prefill spans (reference path, SDPA) alone and mixed with short queries in one batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", (1, 3, 4))
def test_prefill_spans(dtype, group):
    # Whole-prompt chunks (context_slots None: K/V straight from the projection) and chunks
    # after a cached prefix (context_slots given, bottom-right aligned causal mask).
    reqs = [(17, 17, "prefill"), (100, 100, "prefill"),  # no cached prefix
            (40, 17, "prefill"), (300, 64, "prefill"), (129, 33, "prefill")]  # cached prefix 23, 236, 96
    case = Case(reqs, kv_heads=2, group=group, head_dim=64, block_size=16, dtype=dtype, seed=group)
    meta = case.meta(use_native=True)
    assert meta.query_start is None and [s.context_slots is None for s in meta.prefill_spans] == [
        True, True, False, False, False]
    want = case.naive()
    for use_native in (True, False):  # spans never use the native kernel; both must agree
        assert_close_to(case.run(use_native), want, dtype, f"prefill spans (use_native={use_native})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_native", (True, False))
def test_mixed_batch_short_and_prefill(dtype, use_native):
    # As build_batch packs them: requests in batch order, some decoding, some verifying
    # speculative tokens, some prefilling (with and without a prefix) between them.
    reqs = [(300, 1, "short"), (50, 50, "prefill"), (17, 5, "short"), (200, 40, "prefill"),
            (1, 1, "short"), (64, 16, "short"), (90, 18, "prefill"), (700, 1, "short")]
    case = Case(reqs, kv_heads=2, group=3, head_dim=128, block_size=32, dtype=dtype, seed=5, strided_q=True)
    assert_close_to(case.run(use_native), case.naive(), dtype, f"mixed batch (use_native={use_native})")


def test_fp32_native_matches_reference_tightly_on_long_batch():
    # The largest batch with long contexts and mixed queries, directly native vs reference.
    g = torch.Generator().manual_seed(42)
    reqs = []
    for _ in range(33):
        n = int(torch.randint(1, 17, (1,), generator=g))
        reqs.append((int(torch.randint(n, MAX_CTX + 1, (1,), generator=g)), n, "short"))
    case = Case(reqs, kv_heads=2, group=4, head_dim=128, block_size=16, dtype=torch.float32, seed=42)
    torch.testing.assert_close(case.run(True), case.run(False), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_result_does_not_depend_on_thread_count(dtype):
    # Work is split per (request, kv head), so the result must be bitwise the same with one
    # thread as with all of them, and from one call to the next.
    reqs = [(ctx, n, "short") for ctx, n in ((700, 1), (33, 16), (1, 1), (250, 7), (64, 2))]
    case = Case(reqs, kv_heads=2, group=4, head_dim=128, block_size=16, dtype=dtype, seed=21)
    many = case.run(use_native=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.run(use_native=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert torch.equal(case.run(use_native=True), many)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", (3, 6))
def test_verified_query_rows_equal_decoding_them_one_at_a_time(dtype, group):
    # Speculative verification runs 1 + k query tokens of a request in one call; decoding runs
    # them one per call with a context one longer each time. Greedy output stays the same only
    # if each row is bitwise what the single-token call gives, whatever the number of rows per
    # (request, kv head) (group * n: 30 here with group 6, above one 16-row AMX tile pass).
    ctx, n = 200, 5
    case = Case([(ctx, n, "short")], kv_heads=2, group=group, head_dim=128, block_size=16, dtype=dtype, seed=5)
    together = case.run(use_native=True)
    for i in range(n):
        meta = case.meta(use_native=True)
        meta.query_start = torch.tensor([i], dtype=torch.int64)
        meta.query_len = torch.tensor([1], dtype=torch.int64)
        meta.context_len = torch.tensor([ctx - n + i + 1], dtype=torch.int64)
        alone = paged_attention(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache, meta, case.scale)
        assert torch.equal(alone[i], together[i]), f"query row {i} differs when decoded alone"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
def test_decode_metadata_with_a_padded_block_table_matches_naive(dtype, group):
    """The sync-free decode form a CUDA graph captures (engine/cuda_graphs.py): a block table
    wider than any context, padded with a block of garbage, gives the float64 truth."""
    reqs = short_requests(77 + group, 7, mixed=False, block_size=16)
    case = Case(reqs, kv_heads=2, group=group, head_dim=64, block_size=16, dtype=dtype, seed=group)
    regular = case.meta(use_native=False)
    table = torch.full((len(reqs), regular.block_table.shape[1] + 5), int(case.block_ids[0][0]), dtype=torch.int64)
    for row, ids in enumerate(case.block_ids):
        table[row, :len(ids)] = ids
    meta = decode_metadata(regular.slot_mapping, regular.context_len, table, case.block_size)
    for window in (None, 5, 40):  # Gemma 3's local layers share the step's metadata with global ones
        got = paged_attention(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache, meta, case.scale, window)
        assert_close_to(got, case.naive(window), dtype, f"decode_metadata group={group} window={window}")


@pytest.mark.parametrize("window", [1, 5, 16, 37, 300])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_sliding_window_matches_naive(window, use_native):
    """Gemma 3's local layers: each query sees its last `window` positions. Decode, speculative
    and prefill queries (with and without a cached prefix), contexts shorter and longer than
    the window, windows below, at and above the block size, head dims of the bf16 fast path
    and of the generic one (Gemma's 256)."""
    requests = [(1, 1, "short"), (40, 1, "short"), (300, 4, "short"), (16, 1, "short"), (90, 90, "prefill"),
                (200, 30, "prefill"), (17, 17, "prefill")]
    for dtype, group, d in [(torch.float32, 2, 64), (torch.bfloat16, 4, 64), (torch.bfloat16, 4, 256),
                            (torch.bfloat16, 1, 32)]:
        case = Case(requests, kv_heads=2, group=group, head_dim=d, block_size=16, dtype=dtype, seed=window)
        assert_close_to(case.run(use_native, window), case.naive(window), dtype, f"window {window} {dtype} d={d}")


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_softcapped_scores_match_naive(window, use_native):
    """Gemma 2: scores become softcap * tanh(scores / softcap) before the softmax, on its
    global layers and its windowed local ones. The cap here (2.0, scores of about N(0, 1))
    changes every output noticeably, so a kernel that skipped it would fail."""
    requests = [(1, 1, "short"), (40, 1, "short"), (300, 4, "short"), (90, 90, "prefill"), (200, 30, "prefill")]
    for dtype, group, d in [(torch.float32, 2, 64), (torch.bfloat16, 4, 128), (torch.bfloat16, 2, 256),
                            (torch.float32, 1, 80)]:
        case = Case(requests, kv_heads=2, group=group, head_dim=d, block_size=16, dtype=dtype, seed=d)
        want = case.naive(window, softcap=2.0)
        assert (want - case.naive(window)).abs().max() > 0.1
        assert_close_to(case.run(use_native, window, softcap=2.0), want, dtype, f"softcap {dtype} d={d} window={window}")
