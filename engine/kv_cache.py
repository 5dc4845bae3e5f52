"""Paged KV cache bookkeeping: fixed-size blocks, per-request block tables, prefix caching.

Only block ids live here; the K/V tensors themselves belong to the model runner. A full
block is content-addressed by a chained hash of (cache salt, every token id up to the block
end), so a later request with the same prefix (and the same adapter) reuses it. Blocks whose
reference count drops to zero stay cached until the allocator needs them, oldest first.
Layers with a sliding window have block tables of their own (engine/kv_layout.py): a
request gives back their blocks that its next queries can no longer see (release_before), so
there its context costs about a window of blocks, however long it grows. Each group's block
of a given content is cached under its own key, and a prefix hit needs every block for the
full-attention groups but, for the windowed ones, only those the window still covers.

A freed request's last, partly filled block is remembered too (in every group: the last
block is always within a window): a later request that goes on from the same full blocks
with the same tokens copies those rows into a block of its own instead of computing them.
A beam search step (engine/beam_search.py) extends each beam by one token, so each of its
requests computes one token rather than up to a block; a conversation's next turn reuses
the previous answer's tail.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .kv_layout import KVLayout, kv_layout
from .request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 layout: KVLayout | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = layout or kv_layout((), 1, 1)
        self.windowed = [w is not None for w in self.layout.group_windows]
        # What a released block's table entry becomes: the runner's scratch block (one past the
        # blocks handed out), a valid address that attention never weighs in, beyond any window.
        self.released_block = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Blocks with no reference, in eviction order (least recently freed first).
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Keyed by block hash, and for groups past the first by hash + group number.
        self.cached_block_by_hash: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        # Prompt logprobs of a cached block's tokens (top-k count, one entry per token, None
        # for a sequence's first), kept while the block is: a prompt scored again reuses the
        # block only where these can stand in for the logits it no longer computes.
        self.prompt_logprobs_by_hash: dict[bytes, tuple[int, list]] = {}
        # Freed partial blocks: (parent block's hash, salt, the tokens it holds, group) -> block,
        # and back. copy_rows(src, dst, num_rows) copies K/V rows between blocks: the engine
        # sets it to its runner's; without it nothing is kept.
        self.partial_blocks: dict[tuple, int] = {}
        self.partial_key_of_block: dict[int, tuple] = {}
        self.copy_rows = None
        # Counters for metrics and tests.
        self.num_prefix_queries_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def window(self) -> int | None:
        return self.layout.window

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _tables(self, request: Request) -> list[list[int]]:
        if not request.block_tables:
            request.block_tables = [[] for _ in self.windowed]
        return request.block_tables

    @staticmethod
    def _key(h: bytes, group: int) -> bytes:
        return h if group == 0 else h + bytes((group,))

    def _first_seen_block(self, num_computed: int) -> int:
        """The first block the window of a query at position num_computed reaches."""
        return max(num_computed - self.window + 1, 0) // self.block_size if self.window is not None else 0

    # -- prefix caching -------------------------------------------------------------------

    @staticmethod
    def _block_hash(parent: bytes, tokens: list[int], salt: str) -> bytes:
        # A cryptographic hash, not Python's hash(): tenants choose their token ids, and a
        # crafted collision would hand them another tenant's K/V.
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(salt.encode())
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        """Compute hashes for every full block among the request's first `num_tokens` tokens."""
        bs = self.block_size
        if (len(request.block_hashes) + 1) * bs > num_tokens:
            return
        tokens = request.all_token_ids
        while (len(request.block_hashes) + 1) * bs <= num_tokens:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else b""
            request.block_hashes.append(self._block_hash(parent, tokens[i * bs:(i + 1) * bs], request.cache_salt))

    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks for the longest cached prefix; returns the number of tokens hit.

        At least one token is always left to compute: the last one produces the logits.
        Windowed groups need only the blocks the next query's window reaches (the others are
        attached as given back), unless the prompt is scored: scoring reuses every block.
        """
        assert not request.block_ids, "prefix matching is for requests holding no blocks"
        if not self.enable_prefix_caching or not request.takes_prefix_hits:
            return 0
        hashes = self._matchable_hashes(request)
        cached = self.cached_block_by_hash
        every_block = request.needs_prompt_logprobs or self.window is None
        n = len(hashes)
        for g, windowed in enumerate(self.windowed):
            if every_block or not windowed:
                n = next((i for i in range(n) if self._key(hashes[i], g) not in cached), n)
        if request.needs_prompt_logprobs:
            n = self._reuse_prompt_logprobs(request, n)
        n = self._windows_cached(hashes, n)
        first_seen = self._first_seen_block(n * self.block_size)
        for g, table in enumerate(self._tables(request)):
            for i in range(n):
                if self.windowed[g] and i < first_seen:
                    table.append(self.released_block)
                else:
                    table.append(cached[self._key(hashes[i], g)])
                    self._ref(table[-1])
        request.num_released_blocks = first_seen if any(self.windowed) else 0
        request.num_registered_blocks = n  # cached already
        copied = 0 if request.needs_prompt_logprobs else self._copy_partial(request, hashes[n - 1] if n else b"", n)
        num_hit = n * self.block_size + copied
        self.num_prefix_queries_tokens += request.num_tokens
        self.num_prefix_hit_tokens += num_hit
        return num_hit

    @property
    def keeps_partial_blocks(self) -> bool:
        return self.enable_prefix_caching and self.copy_rows is not None

    def _copy_partial(self, request: Request, parent: bytes, n: int) -> int:
        """After the request's n hit blocks: copy the rows of a kept partial block holding its
        next tokens (at most all but its last token) into a new block of its own; how many."""
        if not self.keeps_partial_blocks or not self.partial_blocks:
            return 0
        start = n * self.block_size
        tail = request.all_token_ids[start:min(start + self.block_size - 1, request.num_tokens - 1)]
        for rows in range(len(tail), 0, -1):
            key = (parent, request.cache_salt, tuple(tail[:rows]))
            kept = [self.partial_blocks.get(key + (g,)) for g in range(len(self.windowed))]
            if None in kept:
                continue
            if len(self.free_blocks) < 2 * len(kept):  # the kept blocks are free ones, and stay
                return 0
            for block in kept:
                self._ref(block)
            for table, block in zip(request.block_tables, kept):
                table.append(self._take_free_block())
                self.copy_rows(block, table[-1], rows)
            for block in kept:
                self._unref(block)
            return rows
        return 0

    def _keep_partial(self, request: Request) -> None:
        """Remember the request's last block if it is partly filled and about to be freed."""
        n, rows = divmod(request.num_computed_tokens, self.block_size)
        tables = request.block_tables
        if not self.keeps_partial_blocks or rows == 0 or not tables or len(tables[0]) <= n \
                or any(t[n] == self.released_block or self.ref_counts[t[n]] != 1 for t in tables):
            return
        self._extend_hashes(request, n * self.block_size)
        start = n * self.block_size
        key = (request.block_hashes[n - 1] if n else b"", request.cache_salt,
               tuple(request.all_token_ids[start:start + rows]))
        for g, table in enumerate(tables):
            self._forget_partial(self.partial_blocks.get(key + (g,)))  # an older copy of the same rows
            self.partial_blocks[key + (g,)] = table[n]
            self.partial_key_of_block[table[n]] = key + (g,)

    def _forget_partial(self, block: int | None) -> None:
        key = self.partial_key_of_block.pop(block, None)
        if key is not None:
            del self.partial_blocks[key]

    def _windows_cached(self, hashes: list[bytes], n: int) -> int:
        """The longest hit up to n blocks whose windowed groups hold every block its window
        reaches: back off while the last block some windowed group lacks is within it."""
        windowed = [g for g, w in enumerate(self.windowed) if w]
        if not windowed:
            return n
        missing, last_missing = [-1], -1  # missing[i]: the last block before i that some group lacks
        for i in range(n):
            if not all(self._key(hashes[i], g) in self.cached_block_by_hash for g in windowed):
                last_missing = i
            missing.append(last_missing)
        while n > 0 and missing[n] >= self._first_seen_block(n * self.block_size):
            n -= 1
        return n

    def next_uncached_block(self, request: Request) -> bytes | None:
        """The hash of the first block of the request's matchable prefix not in the cache
        (None: it is all cached, or too short to have a full block to match)."""
        return next((h for h in self._matchable_hashes(request) if h not in self.cached_block_by_hash), None)

    def _matchable_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the full blocks a cache hit may cover: at least one token is always left
        to compute, since the last one produces the logits."""
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks * self.block_size)
        return request.block_hashes[:max_blocks]

    def _reuse_prompt_logprobs(self, request: Request, num_hits: int) -> int:
        """How many hit blocks a request scoring its prompt may use: the logprob of each
        prompt token up to the first one it computes must be kept, and the first token of a
        block is predicted by the block before it. So with kept entries for blocks 0..n, it
        reuses blocks 0..n-1 and takes the entries of tokens 1..n*block_size from them."""
        k = request.sampling_params.prompt_logprobs
        kept = []
        for h in request.block_hashes[:num_hits]:
            entry = self.prompt_logprobs_by_hash.get(h)
            if entry is None or entry[0] < k:
                break
            kept.append(entry[1])
        use = max(0, len(kept) - 1)
        bs = self.block_size
        for t in range(len(request.prompt_logprobs) + 1, use * bs + 1):  # a recompute keeps its own
            logprob, alts, rank = kept[t // bs][t % bs]
            request.prompt_logprobs.append((logprob, dict(list(alts.items())[:k]), rank))
        return use

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks under their content hash (with the
        prompt logprobs of their tokens, when the request computed those)."""
        if not self.enable_prefix_caching:
            return
        self._extend_hashes(request, request.num_computed_tokens)
        num_full = request.num_computed_tokens // self.block_size
        # Each block once, when it fills (a decode step adds at most one): rescanning every full
        # block each step cost 37 us per request at 8k tokens, a tenth of a small model's GPU step.
        first = max(request.num_registered_blocks, request.num_released_blocks)
        for g, table in enumerate(request.block_tables):
            for i in range(first if self.windowed[g] else request.num_registered_blocks, num_full):
                block, key = table[i], self._key(request.block_hashes[i], g)
                if block not in self.hash_of_block and key not in self.cached_block_by_hash:
                    self.cached_block_by_hash[key] = block  # else an identical block is cached; ours stays private
                    self.hash_of_block[block] = key
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)
        if request.sampling_params.prompt_logprobs is not None:
            for i in range(request.num_released_blocks if self.windowed[0] else 0, num_full):
                self._keep_prompt_logprobs(request, i, request.block_hashes[i])

    def _keep_prompt_logprobs(self, request: Request, i: int, h: bytes) -> None:
        k, bs = request.sampling_params.prompt_logprobs, self.block_size
        end = (i + 1) * bs
        if end > request.num_prompt_tokens or len(request.prompt_logprobs) < end - 1 or h not in self.cached_block_by_hash:
            return
        kept = self.prompt_logprobs_by_hash.get(h)
        if kept is None or kept[0] < k:
            self.prompt_logprobs_by_hash[h] = (k, [request.prompt_logprobs[t - 1] if t else None
                                                   for t in range(i * bs, end)])

    # -- allocation -----------------------------------------------------------------------

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        self._forget_partial(block)
        h = self.hash_of_block.pop(block, None)
        if h is not None:
            del self.cached_block_by_hash[h]
            self.prompt_logprobs_by_hash.pop(h, None)
            self.num_evictions += 1
        self.ref_counts[block] = 1
        return block

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block tables to hold `num_new_tokens` more tokens; False if full."""
        tables = self._tables(request)
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(tables[0])
        if needed * len(tables) > self.num_free_blocks:
            return False
        for table in tables:
            table.extend(self._take_free_block() for _ in range(needed))
        return True

    def _unref(self, block: int) -> None:
        if block == self.released_block:
            return
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks go first in the eviction order: they are
        the least likely to be shared by a later request."""
        self._keep_partial(request)
        for table in request.block_tables:
            for block in reversed(table):
                self._unref(block)
        request.block_tables = []
        request.num_released_blocks = request.num_registered_blocks = 0

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Release blocks beyond the first `num_tokens` tokens (speculative rollback)."""
        keep = self.blocks_needed(num_tokens)
        for table in request.block_tables:
            for block in reversed(table[keep:]):
                self._unref(block)
            del table[keep:]
        del request.block_hashes[num_tokens // self.block_size:]
        request.num_released_blocks = min(request.num_released_blocks, keep)
        request.num_registered_blocks = min(request.num_registered_blocks, num_tokens // self.block_size)

    def release_out_of_window(self, request: Request) -> None:
        """Give back the windowed groups' blocks that the request's next queries (from its
        next position on) cannot see."""
        if self.window is not None:
            self.release_before(request, request.num_computed_tokens - self.window + 1)

    def release_before(self, request: Request, position: int) -> None:
        """Give back the windowed groups' blocks that hold only positions before `position`.
        A cached one stays in the prefix cache until the allocator needs it, like any freed
        block."""
        tables = request.block_tables
        end = min(max(position, 0) // self.block_size, len(tables[0]) if tables else 0)
        for g, table in enumerate(tables):
            if self.windowed[g]:
                for i in range(request.num_released_blocks, end):
                    self._unref(table[i])
                    table[i] = self.released_block
        request.num_released_blocks = max(request.num_released_blocks, end)
