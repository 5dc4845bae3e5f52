"""Device slots for LoRA adapters: preallocated, rank-padded stacks the kernels read.

For every decoder layer and every LoRA-targetable module the pool holds
A [num_slots, max_rank, in] and B [num_slots, out, max_rank] (scaling folded into B, zeros
beyond an adapter's rank or for modules it does not target); the vocabulary modules
(embed_tokens: A [slots, R, vocab]; lm_head), once per model, not per layer, made when the
first adapter adapting them is added; a MoE block's experts and router
(target_parameters) get an A/B pair per expert, made when the first adapter adapting them is
added (make_stacks). Loading an adapter is a copy_ into a free slot; the base weights are
never touched. Slots used by running requests are
pinned; when a slot is needed the least recently used unpinned one is evicted. DoRA and
lora_bias adapters also get their row terms (engine/models/slot_rows.py) in the slot. Evicted
adapters stay in a host-memory LRU tier (max_cpu_loras adapters, max_cpu_lora_bytes at most),
so reloading them needs no disk.
The pool never blocks: when every slot is pinned, acquire() returns None and the scheduler
keeps the request waiting.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import AdapterError
from .host_lru import DEFAULT_MAX_BYTES, HostLru
from .loader import module_shapes
from .module_names import VOCAB_LAYER, VOCAB_MODULES


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0  # slot loads: from the host cache, or the store (store_loads of them)
    store_loads: int = 0
    evictions: int = 0
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # the most recent loads'


class LoraSlotPool:
    def __init__(self, arch, num_slots: int, max_rank: int, dtype: torch.dtype, max_cpu_loras: int = 64,
                 row_terms=None, device: torch.device | str = "cpu", max_cpu_lora_bytes: int = DEFAULT_MAX_BYTES):
        if num_slots < 1 or max_rank < 1:
            raise ValueError("num_slots and max_rank must be >= 1")
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.num_layers = arch.num_layers
        self.a: dict[str, torch.Tensor] = {}  # module -> [layers (1: a vocabulary module), slots, max_rank, in]
        self.b: dict[str, torch.Tensor] = {}  # module -> [layers, slots, out, max_rank]
        # module -> (experts, in, out); experts None for a linear. A MoE block's parameters
        # (arch.lora_parameters) hold a pair per expert: a [layers, slots, experts, max_rank, in].
        self._shapes = {name: (None, *shape) for name, shape in module_shapes(arch).items()}
        self._shapes |= {name: (p.experts, p.fan_in, p.fan_out) for name, p in arch.lora_parameters.items()}
        self._device = device
        for name in arch.linear_modules:
            self._make_stacks(name)
        # Which slots hold an adapter with row terms (DoRA, lora_bias); `row_terms`
        # (engine/models/slot_rows.SlotRowTerms) computes and keeps each slot's.
        self.slot_row_terms = [False] * num_slots
        self._row_terms = row_terms
        self.slot_key: list[str | None] = [None] * num_slots
        self.slot_rank = [0] * num_slots
        self.slot_modules: list[frozenset[str]] = [frozenset()] * num_slots
        self.pins = [0] * num_slots
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # loaded keys, least recently used first
        self.host_cache = HostLru(max_cpu_loras, max_cpu_lora_bytes, keep_newest=False)
        self.stats = PoolStats()
        self._lock = threading.Lock()

    # -- slots ----------------------------------------------------------------------------

    def acquire(self, key: str, load: Callable[[], object]) -> int | None:
        """Pin the slot holding adapter `key`, loading it (via `load()` -> LoraWeights) into a
        free or least recently used unpinned slot first. None when every slot is pinned."""
        with self._lock:
            slot = self.slot_of.get(key)
            if slot is not None:
                self.stats.hits += 1
                self.slot_of.move_to_end(key)
                self.pins[slot] += 1
                return slot
            slot = self._free_slot()
            if slot is None:
                return None
            self.stats.misses += 1
            t0 = time.perf_counter()
            weights = self.host_cache.pop(key, None)
            if weights is None:
                self.stats.store_loads += 1
                weights = load()
            self._write(slot, weights)
            self.host_cache.put(key, weights, weights.num_bytes)
            self.stats.load_seconds.append(time.perf_counter() - t0)
            self.slot_key[slot], self.slot_rank[slot] = key, weights.rank
            self.slot_modules[slot] = frozenset(name for _, name in weights.modules)
            self.slot_of[key] = slot
            self.pins[slot] = 1
            return slot

    @property
    def row_tables_made(self) -> int:
        """How many row-term tables exist (engine/models/slot_rows.py); grows as adapters need them."""
        return 0 if self._row_terms is None else self._row_terms.tables_made

    def is_loaded(self, key: str) -> bool:
        return key in self.slot_of

    def release(self, slot: int) -> None:
        with self._lock:
            if self.pins[slot] <= 0:
                raise RuntimeError(f"slot {slot} released more often than acquired")
            self.pins[slot] -= 1

    def forget(self, key_prefix: str) -> None:
        """Drop unpinned copies of an adapter's versions (after deletion or replacement)."""
        with self._lock:
            for key in [k for k in self.host_cache.keys() if k.startswith(key_prefix)]:
                self.host_cache.pop(key)
            for key, slot in list(self.slot_of.items()):
                if key.startswith(key_prefix) and self.pins[slot] == 0:
                    del self.slot_of[key]
                    self.slot_key[slot] = None

    def _free_slot(self) -> int | None:
        for slot in range(self.num_slots):
            if self.slot_key[slot] is None:
                return slot
        for key, slot in self.slot_of.items():  # least recently used first
            if self.pins[slot] == 0:
                del self.slot_of[key]
                self.slot_key[slot] = None
                self.stats.evictions += 1
                return slot
        return None

    def make_stacks(self, weights) -> None:
        """Make the stacks an adapter needs before it loads into a slot (the engine calls this
        when the adapter is added, outside its step loop). A MoE block's experts and router get
        theirs when the first adapter targeting them comes: per slot they take an adapter of
        max_rank's size, for every expert, which models served without such adapters never pay."""
        with self._lock:
            for name in sorted({name for _, name in weights.modules} - self.a.keys()):
                experts, fan_in, fan_out = self._shapes[name]
                size = self._layers(name) * self.num_slots * (experts or 1) * self.max_rank * (fan_in + fan_out) * \
                    self.dtype.itemsize
                no_memory = (f"no memory for the slots of {name} ({size / 2**30:.1f} GiB: {self.num_slots} slots x "
                             f"rank {self.max_rank} x {self._layers(name)} layers)")
                # A host allocation succeeds lazily and the kernel kills the process when the
                # pages are first written: the slots must fit in what the host has now.
                available = _host_available() if torch.device(self._device).type == "cpu" else None
                if available is not None and size > available:
                    raise AdapterError("too_large", f"{no_memory}; the host has {available / 2**30:.1f} GiB "
                                       "available: lower --max-lora-rank or --max-loras, or --kv-cache-memory")
                try:
                    self._make_stacks(name)
                except (MemoryError, RuntimeError) as e:  # torch's out-of-memory errors are RuntimeErrors
                    raise AdapterError("too_large", f"{no_memory}; lower --max-lora-rank or --max-loras") from e

    def _make_stacks(self, name: str) -> None:
        if name not in self.a:
            experts, fan_in, fan_out = self._shapes[name]
            outer = (self._layers(name), self.num_slots) + ((experts,) if experts else ())
            self.a[name] = torch.zeros(*outer, self.max_rank, fan_in, dtype=self.dtype, device=self._device)
            self.b[name] = torch.zeros(*outer, fan_out, self.max_rank, dtype=self.dtype, device=self._device)

    def _layers(self, name: str) -> int:
        return 1 if name in VOCAB_MODULES else self.num_layers

    def _write(self, slot: int, weights) -> None:
        if weights.rank > self.max_rank:
            raise ValueError(f"adapter rank {weights.rank} exceeds the pool's max rank {self.max_rank}")
        r, old_r = weights.rank, self.slot_rank[slot]
        targeted = {name for _, name in weights.modules}
        # Clear only what the previous occupant left that the new adapter will not overwrite:
        # modules it targeted and the new one does not, and rank rows beyond the new rank. The
        # rank is a's second-to-last axis and b's last, with or without an experts axis.
        for name in self.slot_modules[slot]:
            if name not in targeted:
                self.a[name][:, slot, ..., :old_r, :].zero_()
                self.b[name][:, slot, ..., :old_r].zero_()
            elif old_r > r:
                self.a[name][:, slot, ..., r:old_r, :].zero_()
                self.b[name][:, slot, ..., r:old_r].zero_()
        for name in targeted:  # the engine made them in make_stacks; direct users of the pool may not have
            self._make_stacks(name)
        layers = {name: set() for name in targeted}
        for (layer, name), (a, b) in weights.modules.items():
            layer = 0 if layer == VOCAB_LAYER else layer  # a vocabulary module's stacks have one layer
            mr = a.shape[-2]  # this module's rank (rank_pattern), at most r: zeros pad it to r
            self.a[name][layer, slot, ..., :mr, :].copy_(a)
            self.b[name][layer, slot, ..., :mr].copy_(b)
            if mr < r:
                self.a[name][layer, slot, ..., mr:r, :].zero_()
                self.b[name][layer, slot, ..., mr:r].zero_()
            layers[name].add(layer)
        for name, done in layers.items():  # layers_to_transform: untouched layers stay zero
            for layer in set(range(self._layers(name))) - done:
                self.a[name][layer, slot].zero_()
                self.b[name][layer, slot].zero_()
        self.slot_row_terms[slot] = weights.has_row_terms
        if weights.has_row_terms:
            if self._row_terms is None:
                raise ValueError("this pool was made without a way to serve DoRA or lora_bias adapters")
            self._row_terms.write(slot, weights)

    @property
    def num_pinned(self) -> int:
        return sum(1 for p in self.pins if p > 0)

    def max_rank_of(self, slots) -> int:
        return max((self.slot_rank[s] for s in slots if s >= 0), default=0)

    def modules_of(self, slots) -> frozenset[str]:
        return frozenset().union(*(self.slot_modules[s] for s in slots if s >= 0))


def _host_available() -> int | None:
    """The host's MemAvailable in bytes; None where it cannot be read (no check then)."""
    from loragate.engine.config import free_memory
    from loragate.engine.errors import ModelConfigError

    try:
        return free_memory(torch.device("cpu"))
    except ModelConfigError:
        return None
