"""HostLru: adapters' host copies bounded by count and by bytes."""

from __future__ import annotations

import torch

from loragate.adapters.host_lru import HostLru


def test_bounded_by_count_and_bytes_least_recently_used_first():
    lru = HostLru(max_items=3, max_bytes=100, keep_newest=True)
    assert lru.put("a", 1, 40) == [] and lru.put("b", 2, 40) == []
    assert lru.put("a", 1, 40) == []  # refreshed: b is now the oldest
    assert lru.put("c", 3, 40) == [("b", 2)] and lru.bytes == 80  # 120 bytes > 100
    assert lru.put("d", 4, 10) == [] and lru.put("e", 5, 10) == [("a", 1)]  # 4 items > 3
    assert lru.keys() == ["c", "d", "e"] and lru.pop("d") == 4 and lru.bytes == 50 and lru.pop("d", "gone") == "gone"
    assert lru.put("big", 6, 1000) == [("c", 3), ("e", 5)] and lru.keys() == ["big"]  # the newest stays: in use
    drop = HostLru(max_items=3, max_bytes=100, keep_newest=False)
    assert drop.put("big", 6, 1000) == [("big", 6)] and len(drop) == 0 and drop.bytes == 0


def test_the_pools_host_tier_keeps_what_fits(tiny_llama, save_lora, tmp_path):
    """Adapters leaving their slot stay on the host while their bytes fit the budget."""
    from loragate.adapters.loader import load_adapter
    from loragate.adapters.pool import LoraSlotPool
    from loragate.engine.models.arch import ModelArchConfig
    from loragate.engine.models.loader import load_hf_config

    arch = ModelArchConfig.from_hf(load_hf_config(tiny_llama))
    weights = [load_adapter(save_lora(tiny_llama, tmp_path / str(i), 0.1, seed=i, r=4, target_modules=["q_proj"]),
                            arch, 8) for i in range(3)]
    size = weights[0].num_bytes
    pool = LoraSlotPool(arch, 1, 8, torch.float32, max_cpu_loras=10, max_cpu_lora_bytes=2 * size)
    for i, w in enumerate(weights):
        slot = pool.acquire(str(i), lambda w=w: w)
        pool.release(slot)
    assert pool.host_cache.keys() == ["1", "2"] and pool.host_cache.bytes == 2 * size
