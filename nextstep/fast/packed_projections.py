"""The decoder's q/k/v and gate/up projection weights packed into one tensor each.

Legend: H hidden size, N query heads, K key/value heads, E head dim, F MLP width.

A one-token decode step reads every weight of the decoder once. With the
projections packed, each layer runs two matrix products where it ran five (q,
k, v, gate, up): fewer kernels, and larger ones, which read memory closer to
its bandwidth. `pack_projections` moves each group's weights into one tensor
and makes the original parameters views of it: no memory is added, the
parameters stay the same objects with the same names (``q_proj.weight``, ...),
checkpoints stay as they were, and in-place updates of the parameters (loading
a state dict, an optimizer step) are seen through the packed tensor. Moving or casting the model gives
the parameters new memory; `pack_projections` notices and packs again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nextstep.backbones.qwen2 import Qwen2Backbone

__all__ = ["PackedProjections", "pack_projections"]


@dataclass(frozen=True)
class PackedProjections:
    """One layer's packed weights.

    Attributes:
        qkv_weight: ((N + 2K) * E, H): the q, k and v weights stacked.
        qkv_bias: ((N + 2K) * E,), or None when the projections have no bias.
        gate_up_weight: (2F, H): the gate and up weights stacked.
    """

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor


def _views_of(packed: torch.Tensor | None, parameters: list[torch.Tensor | None]) -> bool:
    """Whether ``parameters`` are consecutive row blocks of ``packed``, in order."""
    if packed is None:
        return all(parameter is None for parameter in parameters)
    offset = 0
    for parameter in parameters:
        if (parameter is None or parameter.device != packed.device or parameter.dtype != packed.dtype
                or parameter.data_ptr() != packed.data_ptr() + offset * packed.element_size()
                or not parameter.is_contiguous()):
            return False
        offset += parameter.numel()
    return offset == packed.numel()


def _pack(modules: list[nn.Module], name: str) -> torch.Tensor | None:
    """Stack ``module.<name>`` of ``modules`` into one tensor and re-point each parameter to its rows."""
    parameters = [getattr(module, name) for module in modules]
    if all(parameter is None for parameter in parameters):
        return None
    if any(parameter is None for parameter in parameters):
        present = [parameter is not None for parameter in parameters]
        raise ValueError(f"cannot pack {name}: some projections have one and some not ({present})")
    # Outside inference mode, so that the parameters stay trainable; the Parameter objects
    # are kept (an optimizer holding them still updates what the model uses).
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.cat([parameter.detach() for parameter in parameters])
        offset = 0
        for parameter in parameters:
            parameter.data = packed[offset:offset + parameter.shape[0]]
            offset += parameter.shape[0]
    return packed


def pack_projections(backbone: Qwen2Backbone) -> list[PackedProjections]:
    """Every layer's packed weights, packing (again) where the parameters are not views of them.

    The packs are kept on the backbone; a second call returns them while the
    parameters still view them.

    Args:
        backbone: the decoder.

    Returns:
        one `PackedProjections` per layer.
    """
    if not isinstance(backbone, Qwen2Backbone):
        raise TypeError(f"pack_projections needs a Qwen2Backbone, found {type(backbone).__name__}")
    packs = getattr(backbone, "_packed_projections", None)
    if packs is not None and len(packs) == len(backbone.layers) and all(
            _packed_current(layer, pack) for layer, pack in zip(backbone.layers, packs)):
        return packs
    packs = []
    for layer in backbone.layers:
        qkv, gate_up = _groups(layer)
        packs.append(PackedProjections(qkv_weight=_pack(qkv, "weight"), qkv_bias=_pack(qkv, "bias"),
                                       gate_up_weight=_pack(gate_up, "weight")))
    backbone._packed_projections = packs
    return packs


def _groups(layer: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """A layer's projections packed together: [q, k, v] and [gate, up]."""
    attention, mlp = layer.self_attn, layer.mlp
    return [attention.q_proj, attention.k_proj, attention.v_proj], [mlp.gate_proj, mlp.up_proj]


def _packed_current(layer: nn.Module, pack: PackedProjections) -> bool:
    qkv, gate_up = _groups(layer)
    return (_views_of(pack.qkv_weight, [module.weight for module in qkv])
            and _views_of(pack.qkv_bias, [module.bias for module in qkv])
            and _views_of(pack.gate_up_weight, [module.weight for module in gate_up]))
