"""The backbone's one-token decode step over the static KV cache, in a form a CUDA graph can record.

Legend: N backbone rows, H hidden size, T cache capacity.

`nextstep.backbones.qwen2.Qwen2Backbone` appends to its `KVCache` through Python
bookkeeping (the fill level is a Python integer), which a graph cannot replay.
A `DecodeStep` keeps the step's position and slot in device tensors instead
and advances them inside the step: it marks the slot as real in the cache's
key mask, runs the decoder stack over the first ``visible`` slots (later ones
masked, so shapes stay fixed while the slot moves), writes the hidden state to
a static buffer and increments the position and slot. Only the cache's Python
fill level is updated outside (`advance`). ``visible`` is the fill level
rounded up to a multiple of `VISIBLE_BUCKET`: one graph per bucket reads
little more of the cache than the real context.

Backbones other than `Qwen2Backbone` (or caches other than its `KVCache`) run
through their ordinary ``forward``, eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nextstep.backbones.base import Backbone, BackboneCache, KVCache
from nextstep.backbones.qwen2 import Qwen2Attention, Qwen2Backbone, Qwen2DecoderLayer, Qwen2MLP
from nextstep.layers.rms_norm import RMSNorm
from nextstep.layers.rotary import RotaryEmbedding

__all__ = ["VISIBLE_BUCKET", "DecodeStep", "decode_step_reason"]

#: Decode graphs attend over the filled slots rounded up to a multiple of this many.
VISIBLE_BUCKET = 256


def decode_step_reason(backbone: Backbone, cache: BackboneCache) -> str | None:
    """None when `DecodeStep` can record ``backbone``'s step on ``cache`` as a graph, else why not.

    The graph-ready step runs `Qwen2Backbone`'s own decoder stack (``_run``, or the fused stack that
    reads its layers' weights): a subclass that overrides ``forward`` or ``_run``, or whose modules
    are not the ones `Qwen2Backbone` builds (a replaced attention or linear layer), steps through its
    own ``forward`` instead.
    """
    if not isinstance(backbone, Qwen2Backbone):
        return f"{type(backbone).__name__} has no graph-ready decode step (Qwen2Backbone has)"
    for name in ("forward", "_run"):
        if getattr(type(backbone), name) is not getattr(Qwen2Backbone, name):
            return f"{type(backbone).__name__} overrides the {name} of Qwen2Backbone"
    for path, module in backbone.named_modules():
        if path and type(module) not in QWEN2_MODULE_TYPES:
            return (f"{type(backbone).__name__}'s {path} is a {type(module).__name__}, not one of the modules "
                    "Qwen2Backbone builds")
    if type(cache) is not KVCache:
        return f"the cache is a {type(cache).__name__}, not a KVCache"
    return None


#: The classes of the modules inside a `Qwen2Backbone` as it builds them.
QWEN2_MODULE_TYPES = frozenset({Qwen2DecoderLayer, Qwen2Attention, Qwen2MLP, RMSNorm, RotaryEmbedding, nn.ModuleList,
                                nn.Linear, nn.Embedding})


class DecodeStep:
    """One decode step of every row: ``embeds`` (N, 1, H) -> ``hidden`` (N, H).

    Args:
        backbone: the backbone.
        cache: its cache, holding the prompt.
        embeds: (N, 1, H) static input buffer.
        hidden: (N, H) static output buffer.
        compile_stack: another form of the decoder stack (the signature of
            ``Qwen2Backbone._run``): a compiled one, or
            `nextstep.fast.fused_decode.FusedDecodeStack`; None for the backbone's own.
    """

    def __init__(self, backbone: Backbone, cache: BackboneCache, embeds: torch.Tensor, hidden: torch.Tensor,
                 compile_stack: Callable | None = None):
        self.backbone, self.cache = backbone, cache
        self.embeds, self.hidden = embeds, hidden
        self.graph_ready = decode_step_reason(backbone, cache) is None
        rows = embeds.shape[0]
        with torch.inference_mode(False):
            self.positions = torch.zeros(rows, 1, dtype=torch.long, device=embeds.device)
            self.slot = torch.zeros(1, dtype=torch.long, device=embeds.device)
            self.step_mask = torch.ones(rows, 1, dtype=torch.bool, device=embeds.device)
        self.stack = compile_stack if compile_stack is not None else (
            backbone._run if self.graph_ready else None)

    def start(self, next_positions: torch.Tensor) -> None:
        """Set the next token's positions (N, 1); its slot is the cache's fill level."""
        self.positions.copy_(next_positions)
        self.slot.fill_(self.cache.length)

    def visible(self) -> int:
        """Slots the next step attends over: the fill level + 1, rounded up to `VISIBLE_BUCKET`, at most T."""
        return min(self.cache.max_length, -(-(self.cache.length + 1) // VISIBLE_BUCKET) * VISIBLE_BUCKET)

    def compute(self, visible: int | None = None) -> None:
        """The step over static buffers (graph-ready backbones only).

        Args:
            visible: slots to attend over (default: all T); more than the slot of
                this step, the slots past the fill level masked.
        """
        cache = self.cache
        cache.key_mask.index_fill_(1, self.slot, True)
        visible = cache.max_length if visible is None else visible
        hidden = self.stack(self.embeds, self.positions, cache.key_mask, self.slot, cache.layers,
                            visible)  # (N, 1, H)
        self.hidden.copy_(hidden[:, 0])
        self.positions.add_(1)
        self.slot.add_(1)

    def snapshot(self) -> Callable[[], None]:
        """Save what `compute` changes besides the slot's keys and values; return the restoring function."""
        positions, slot, key_mask = self.positions.clone(), self.slot.clone(), self.cache.key_mask.clone()

        def restore() -> None:
            self.positions.copy_(positions)
            self.slot.copy_(slot)
            self.cache.key_mask.copy_(key_mask)

        return restore

    def check_room(self) -> None:
        """Raise when the cache has no free slot for the next token."""
        if self.cache.length >= self.cache.max_length:
            raise ValueError(
                f"the cache is full ({self.cache.max_length} slots); create it with room for every image token"
            )

    def advance(self) -> None:
        """Account for one computed step in the cache's Python fill level."""
        self.cache.commit(self.cache.length + 1)

    def eager(self) -> None:
        """The step through the backbone's ordinary ``forward`` (any backbone and cache)."""
        hidden = self.backbone(self.embeds, self.positions, self.step_mask, self.cache)
        self.hidden.copy_(hidden[:, 0])
        self.positions.add_(1)
