"""Host copies of adapter weights in use order, bounded by count and by bytes.

Three places keep adapters' LoraWeights on the host: the registry's cache of what it read from
the store, the engine's adapters (as the gateway adds them) and the slot pool's host tier
(what left a slot). A count alone does not bound their memory: a sparse-expert model's expert
adapters are gigabytes each in fp32, where a dense model's are megabytes. Each keeps one of
these, all with the same byte budget (EngineConfig.max_cpu_lora_memory); they hold the same
objects, so together they hold about one budget's worth.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

DEFAULT_MAX_BYTES = 8 << 30  # EngineConfig.max_cpu_lora_memory's default


class HostLru:
    def __init__(self, max_items: int, max_bytes: int, keep_newest: bool):
        """keep_newest: the most recently used entry stays even past the bounds (its user
        needs it now); otherwise it goes too."""
        self.max_items, self.max_bytes, self.keep_newest = max_items, max_bytes, keep_newest
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()  # key -> (value, bytes)
        self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list:
        """Least recently used first."""
        return list(self._items)

    def put(self, key: Hashable, value: object, size: int) -> list[tuple[Hashable, object]]:
        """Add or refresh `key` as the most recently used; returns the (key, value) pairs pushed
        out to stay within the bounds, least recently used first."""
        self.pop(key)
        self._items[key] = (value, size)
        self.bytes += size
        evicted = []
        while len(self._items) > self.keep_newest and (len(self._items) > self.max_items or self.bytes > self.max_bytes):
            old, (old_value, old_size) = self._items.popitem(last=False)
            self.bytes -= old_size
            evicted.append((old, old_value))
        return evicted

    def pop(self, key: Hashable, default: object = None) -> object:
        item = self._items.pop(key, None)
        if item is None:
            return default
        self.bytes -= item[1]
        return item[0]
