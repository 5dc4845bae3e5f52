"""KVCacheManager bookkeeping: allocation, reference counts, prefix hits, LRU eviction."""

from __future__ import annotations

from loragate.engine.kv_cache import KVCacheManager
from loragate.engine.kv_layout import context_limit_of_cache, kv_layout
from loragate.engine.request import Request
from loragate.engine.sampling_params import SamplingParams


def req(tokens, salt="", rid="r"):
    return Request(rid, list(tokens), SamplingParams(), cache_salt=salt)


def finish(kv, r):
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    kv.free(r)


def test_allocate_grows_block_tables_and_refuses_when_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req(range(10))
    assert kv.allocate(a, 10) and len(a.block_ids) == 3
    b = req(range(100, 106), rid="b")
    assert not kv.allocate(b, 6)  # needs 2, 1 free
    assert b.block_ids == [] and kv.num_free_blocks == 1
    kv.free(a)
    assert kv.num_free_blocks == 4 and all(c == 0 for c in kv.ref_counts)


def test_prefix_hits_share_blocks_and_always_leave_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req(range(12))
    kv.allocate(a, 12)
    finish(kv, a)
    b = req(list(range(8)) + [99, 98])
    assert kv.match_prefix(b) == 8  # two whole blocks
    assert kv.ref_counts[b.block_ids[0]] == 1
    c = req(range(12), rid="c")  # identical prompt: the last block is recomputed
    assert kv.match_prefix(c) == 8
    assert b.block_ids[:2] == c.block_ids[:2] and kv.ref_counts[c.block_ids[0]] == 2


def test_salt_separates_adapters():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req(range(12), salt="adapter-1@v1")
    kv.allocate(a, 12)
    finish(kv, a)
    assert kv.match_prefix(req(range(12), salt="adapter-1@v2")) == 0
    assert kv.match_prefix(req(range(12), salt="")) == 0
    assert kv.match_prefix(req(range(12), salt="adapter-1@v1", rid="again")) == 8


def test_eviction_takes_the_least_recently_freed_block_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old, new = req([1, 2, 3]), req([7, 8, 9], rid="n")
    kv.allocate(old, 3)
    finish(kv, old)  # blocks of `old` freed first: evicted first
    kv.allocate(new, 3)
    finish(kv, new)
    filler = req([50, 51, 52, 53], rid="f")
    kv.allocate(filler, 4)  # takes two free blocks: both of `old`'s
    assert kv.num_evictions == 1  # only `old`'s full block was cached
    assert kv.match_prefix(req([1, 2, 3], rid="o2")) == 0
    assert kv.match_prefix(req([7, 8, 9], rid="n2")) == 2


def test_truncate_releases_the_tail():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req(range(14))
    kv.allocate(a, 14)
    kv.truncate(a, 5)
    assert len(a.block_ids) == 2 and kv.num_free_blocks == 6


def test_release_before_gives_back_leading_blocks_that_stay_cached():
    """A request on a model whose every layer has a sliding window gives back the blocks its
    next queries cannot see: their entries become the released marker, their references go,
    and a full one stays in the prefix cache like any freed block."""
    kv = KVCacheManager(num_blocks=8, block_size=4, layout=kv_layout((8, 8), 2, 100))
    a = req(range(14))
    kv.allocate(a, 14)
    a.num_computed_tokens = 14
    kv.cache_full_blocks(a)
    first, second = a.block_ids[:2]
    kv.release_before(a, 9)  # positions 0-7 unseen: blocks 0 and 1
    assert a.block_ids[:2] == [kv.released_block] * 2 and a.num_released_blocks == 2
    assert kv.ref_counts[first] == kv.ref_counts[second] == 0 and kv.num_free_blocks == 6
    kv.release_before(a, 9)  # idempotent
    assert kv.num_free_blocks == 6
    kv.cache_full_blocks(a)  # a released entry is never registered as the marker
    assert kv.released_block not in kv.hash_of_block
    b = req(list(range(8)) + [99], rid="b")
    assert kv.match_prefix(b) == 8 and b.block_ids == [first, second]  # still cached
    kv.truncate(a, 10)
    assert a.num_released_blocks == 2 and len(a.block_ids) == 3
    kv.free(a)
    kv.free(b)
    assert a.num_released_blocks == 0 and kv.num_free_blocks == 8 and all(c == 0 for c in kv.ref_counts)


def test_the_cache_limits_the_context_unless_every_layer_has_a_window_that_fits():
    plain, windowed = kv_layout((), 2, 2048), kv_layout((20, 20), 2, 2048)
    assert context_limit_of_cache(10, 16, plain, 64) == 160
    assert context_limit_of_cache(10, 16, windowed, 64) is None  # a window and a step: at most 7 blocks
    assert context_limit_of_cache(5, 16, windowed, 64) == 80
    # One full-attention and one windowed group: the full one holds the context, the windowed
    # one at most 7 blocks; short of 2 x 7, both hold everything.
    hybrid = kv_layout((None, 20), 2, 2048)
    assert context_limit_of_cache(20, 16, hybrid, 64) == 13 * 16
    assert context_limit_of_cache(12, 16, hybrid, 64) == 6 * 16


def test_layers_are_grouped_so_each_group_is_all_windowed_or_all_full():
    gemma3 = tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))  # Gemma 3 270M: 15 local, 3 global
    layout = kv_layout(gemma3, 18, 32768)
    assert layout.layers_per_page == 3 and layout.group_windows == (None, 512, 512, 512, 512, 512)
    assert [layout.layer_places[i] for i in (5, 11, 17)] == [(0, 0), (0, 1), (0, 2)]
    assert layout.layer_places[:6] == ((1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (0, 0))
    assert len(set(layout.layer_places)) == 18  # no two layers share a group's slot
    # A window as long as the context gives nothing back: one group, as without windows.
    assert kv_layout(gemma3, 18, 512) == kv_layout((), 18, 512)
    assert kv_layout((None, 4, None, 4, 4), 5, 100).group_windows == (None, 4, 4)  # 2 per page: 3 windowed in 2
    assert kv_layout((20, 30), 2, 100).group_windows == (30,)  # every layer windowed: one group, the largest


def test_windowed_groups_give_back_and_prefix_hits_need_only_their_window():
    """One full-attention and one windowed group (window 6, blocks of 4): allocation takes a
    block per group; release and hits treat the windowed group's early blocks as gone."""
    kv = KVCacheManager(num_blocks=12, block_size=4, layout=kv_layout((None, 6), 2, 100))
    a = req(range(17))
    assert kv.allocate(a, 16) and [len(t) for t in a.block_tables] == [4, 4] and kv.num_free_blocks == 4
    a.num_computed_tokens = 16
    kv.cache_full_blocks(a)
    kv.release_out_of_window(a)  # the next query (position 16) sees 11..16: blocks 0-1 of the windowed group go
    full, local = a.block_tables
    assert a.num_released_blocks == 2 and local[:2] == [kv.released_block] * 2 and kv.released_block not in full
    assert kv.num_free_blocks == 6
    assert not kv.allocate(req(range(100), rid="big"), 28)  # 7 blocks x 2 groups > 6 free
    # The windowed group's released blocks are evicted first (oldest freed); a hit still works.
    filler = req(range(500, 512), rid="filler")
    assert kv.allocate(filler, 12)  # takes all 6 free, the windowed group's blocks 0 and 1 last
    assert kv.num_evictions == 2
    b = req(range(17), rid="b")
    assert kv.match_prefix(b) == 16  # blocks 0-3 for the full group; 2-3 (positions 11..15) windowed
    assert b.block_tables[0] == full and b.block_tables[1] == [kv.released_block] * 2 + local[2:]
    assert b.num_released_blocks == 2
    # A scored prompt reuses every block's K/V, so it needs the windowed group's early ones too.
    scored = Request("s", list(range(17)), SamplingParams(prompt_logprobs=0))
    assert kv.match_prefix(scored) == 0
    for r in (a, b, filler, scored):
        kv.free(r)
    assert kv.num_free_blocks == 12 and all(c == 0 for c in kv.ref_counts)


def keeping_partials(num_blocks=8, block_size=4):
    """A manager that keeps freed partial blocks, recording the row copies it asks for."""
    kv = KVCacheManager(num_blocks=num_blocks, block_size=block_size)
    kv.copies = []
    kv.copy_rows = lambda src, dst, rows: kv.copies.append((src, dst, rows))
    return kv


def test_a_freed_partial_block_is_copied_for_a_request_that_goes_on_from_it():
    kv = keeping_partials()
    a = req(range(10))  # two full blocks and two tokens
    kv.allocate(a, 10)
    kept = a.block_ids[2]
    finish(kv, a)
    b = req(list(range(10)) + [50, 51], rid="b")  # a's tokens, then its own
    assert kv.match_prefix(b) == 10
    assert kv.copies == [(kept, b.block_ids[2], 2)] and b.block_ids[2] != kept
    assert kv.ref_counts[kept] == 0 and kv.ref_counts[b.block_ids[2]] == 1  # the kept block stays free, and kept
    assert kv.match_prefix(req(list(range(10)) + [60], rid="c")) == 10
    # only rows it holds whole, from the same blocks before it, with the same salt
    assert kv.match_prefix(req(list(range(9)) + [77, 78], rid="d")) == 8
    assert kv.match_prefix(req(range(11), salt="other", rid="e")) == 0
    assert kv.match_prefix(req(range(10), rid="f")) == 8  # the last token is always computed
    assert len(kv.copies) == 2


def test_only_computed_rows_are_kept_and_a_reused_block_is_forgotten():
    kv = keeping_partials(num_blocks=4)
    a = req(range(10))
    kv.allocate(a, 10)
    a.num_computed_tokens = 6  # preempted with 6 rows computed
    kv.cache_full_blocks(a)
    kv.free(a)
    assert kv.match_prefix(req(range(10), rid="b")) == 6
    kv = keeping_partials(num_blocks=3)
    a = req(range(6))
    kv.allocate(a, 6)
    finish(kv, a)
    big = req(range(100, 112), rid="big")
    assert kv.allocate(big, 12)  # takes every block, the kept one too
    kv.free(big)
    assert kv.match_prefix(req(range(8), rid="d")) == 0 and kv.copies == []


def test_no_copy_without_a_free_block_besides_the_kept_one():
    kv = keeping_partials(num_blocks=3)
    a = req(range(6))
    kv.allocate(a, 6)
    finish(kv, a)
    hold = req(range(200, 204), rid="hold")
    assert kv.allocate(hold, 4)  # one block left free: the kept one
    b = req(range(8), rid="b")
    assert kv.match_prefix(b) == 4 and kv.copies == []
