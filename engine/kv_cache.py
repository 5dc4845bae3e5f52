"""Paged KV cache bookkeeping: fixed-size blocks, per-request block tables, prefix caching.

Only block ids live here; the K/V tensors themselves belong to the model runner. A full
block is content-addressed by a chained hash of (cache salt, every token id up to the block
end), so a later request with the same prefix (and the same adapter) reuses it. Blocks whose
reference count drops to zero stay cached until the allocator needs them, oldest first.
Where every layer attends over a sliding window, a request gives back the blocks its next
queries can no longer see (release_before): its context then costs about a window of blocks,
however long it grows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # What a released block's table entry becomes: the runner's scratch block (one past the
        # blocks handed out), a valid address that attention never weighs in, beyond any window.
        self.released_block = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Blocks with no reference, in eviction order (least recently freed first).
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached_block_by_hash: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        # Prompt logprobs of a cached block's tokens (top-k count, one entry per token, None
        # for a sequence's first), kept while the block is: a prompt scored again reuses the
        # block only where these can stand in for the logits it no longer computes.
        self.prompt_logprobs_by_hash: dict[bytes, tuple[int, list]] = {}
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

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

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
        """
        assert not request.block_ids, "prefix matching is for requests holding no blocks"
        if not self.enable_prefix_caching:
            return 0
        hits: list[int] = []
        for h in self._matchable_hashes(request):
            block = self.cached_block_by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        if request.needs_prompt_logprobs:
            hits = hits[:self._reuse_prompt_logprobs(request, len(hits))]
        for block in hits:
            self._ref(block)
        request.block_ids = hits
        num_hit = len(hits) * self.block_size
        self.num_prefix_queries_tokens += request.num_tokens
        self.num_prefix_hit_tokens += num_hit
        return num_hit

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
            logprob, alts = kept[t // bs][t % bs]
            request.prompt_logprobs.append((logprob, dict(list(alts.items())[:k])))
        return use

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks under their content hash (with the
        prompt logprobs of their tokens, when the request computed those)."""
        if not self.enable_prefix_caching:
            return
        self._extend_hashes(request, request.num_computed_tokens)
        num_full = request.num_computed_tokens // self.block_size
        scored = request.sampling_params.prompt_logprobs is not None
        for i in range(request.num_released_blocks, num_full):  # released ones were registered before
            block = request.block_ids[i]
            h = request.block_hashes[i]
            if block not in self.hash_of_block and h not in self.cached_block_by_hash:
                self.cached_block_by_hash[h] = block  # else an identical block is cached; ours stays private
                self.hash_of_block[block] = h
            if scored:
                self._keep_prompt_logprobs(request, i, h)

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
        h = self.hash_of_block.pop(block, None)
        if h is not None:
            del self.cached_block_by_hash[h]
            self.prompt_logprobs_by_hash.pop(h, None)
            self.num_evictions += 1
        self.ref_counts[block] = 1
        return block

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold `num_new_tokens` more tokens; False if full."""
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            request.block_ids.append(self._take_free_block())
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
        for block in reversed(request.block_ids):
            self._unref(block)
        request.block_ids = []
        request.num_released_blocks = 0

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Release blocks beyond the first `num_tokens` tokens (speculative rollback)."""
        keep = self.blocks_needed(num_tokens)
        for block in reversed(request.block_ids[keep:]):
            self._unref(block)
        del request.block_ids[keep:]
        del request.block_hashes[num_tokens // self.block_size:]
        request.num_released_blocks = min(request.num_released_blocks, keep)

    def release_before(self, request: Request, position: int) -> None:
        """Give back the request's blocks that hold only positions before `position`: with a
        sliding window on every layer, those its next queries cannot see. A cached one stays
        in the prefix cache until the allocator needs it, like any freed block."""
        end = min(max(position, 0) // self.block_size, len(request.block_ids))
        for i in range(request.num_released_blocks, end):
            self._unref(request.block_ids[i])
            request.block_ids[i] = self.released_block
        request.num_released_blocks = max(request.num_released_blocks, end)


def context_limit_of_cache(num_blocks: int, block_size: int, window: int | None, step_tokens: int) -> int | None:
    """The longest context one request can reach with the cache to itself, so that it is never
    preempted forever. With a window on every layer it holds at most a window and a step's
    tokens (up to step_tokens) of blocks at a time: no limit (None) once those fit."""
    if window is not None and num_blocks >= -(-(window + step_tokens) // block_size) + 1:
        return None
    return num_blocks * block_size
