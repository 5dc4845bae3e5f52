"""How the layers' K/V share the cache's pages, so that layers with a sliding window keep
only their window while the others keep every position.

The cache is one pool of equal pages (blocks): a page holds `layers_per_page` layers' K and V
for block_size positions. The layers are split into groups of at most that many, each group
all full-attention or all windowed, and a request has one block table per group. So a
request whose context is far past the window holds pages for all of it only in the
full-attention groups; a windowed group gives back each page once no query can see it
(KVCacheManager.release_before), and the freed page can serve any group of any request.

- No windows (Llama, Qwen2): one group of every layer, the cache as it always was.
- A window on every layer (Mistral 7B v0.1, Phi-3-mini-4k): one windowed group.
- Hybrid (Gemma 2 and 3, OLMo 3, Qwen3 with max_window_layers): pages of as many layers as
  the smaller kind has (Gemma 3 270M: 3 full-attention and 15 windowed layers, so one full
  group and five windowed ones of 3 layers each). A last group with fewer layers leaves its
  pages' spare layer slots unused. This is vLLM's hybrid allocator's arrangement.
A window as long as the context never gives anything back, so such a layer counts as full.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    layers_per_page: int
    group_windows: tuple[int | None, ...]  # per group: its layers' (largest) window, None for full attention
    layer_places: tuple[tuple[int, int], ...]  # per layer: (its group, its slot in a page)

    @property
    def num_groups(self) -> int:
        return len(self.group_windows)

    @property
    def window(self) -> int | None:
        """The windowed groups' window (None: no group has one)."""
        return max((w for w in self.group_windows if w is not None), default=None)

    @property
    def num_full_groups(self) -> int:
        return sum(w is None for w in self.group_windows)


def kv_layout(layer_windows: tuple[int | None, ...], num_layers: int, max_model_len: int) -> KVLayout:
    windows = [w if w is not None and w < max_model_len else None for w in (layer_windows or (None,) * num_layers)]
    full = [i for i, w in enumerate(windows) if w is None]
    local = [i for i, w in enumerate(windows) if w is not None]
    if not full or not local:  # one group
        return KVLayout(num_layers, (max(windows) if not full else None,), tuple((0, i) for i in range(num_layers)))
    per_page = min(len(full), len(local))
    groups: list[int | None] = []
    places: list[tuple[int, int]] = [(0, 0)] * num_layers
    for layers, window in ((full, None), (local, max(windows[i] for i in local))):
        for start in range(0, len(layers), per_page):
            for slot, layer in enumerate(layers[start:start + per_page]):
                places[layer] = (len(groups), slot)
            groups.append(window)
    return KVLayout(per_page, tuple(groups), tuple(places))


def window_blocks(layout: KVLayout, block_size: int, step_tokens: int) -> int:
    """The most pages a windowed group's table holds at once: a window and a step's tokens,
    one more for a window that starts mid-page."""
    return -(-(layout.window + step_tokens) // block_size) + 1


def context_limit_of_cache(num_blocks: int, block_size: int, layout: KVLayout, step_tokens: int) -> int | None:
    """The longest context one request can reach with the cache to itself, so that it is never
    preempted forever; None: no limit (every group has a window, and a window's pages fit)."""
    groups = layout.num_groups
    if layout.window is None:
        return num_blocks // groups * block_size
    held = window_blocks(layout, block_size, step_tokens)
    if num_blocks < groups * held:  # short of a window's pages: every group keeps all it has
        return num_blocks // groups * block_size
    full = layout.num_full_groups
    return None if full == 0 else (num_blocks - (groups - full) * held) // full * block_size


def window_note(layout: KVLayout) -> str:
    """The load message's word on windows: what the cache gives back."""
    if layout.window is None:
        return ""
    if layout.num_full_groups == 0:
        return f"; blocks behind every layer's {layout.window}-token window are given back"
    windowed = sum(1 for group, _ in layout.layer_places if layout.group_windows[group] is not None)
    return (f"; the {windowed} windowed layers of {len(layout.layer_places)} give back blocks behind their "
            f"{layout.window}-token window")
