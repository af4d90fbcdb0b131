"""The Qwen2 decoder stack of a one-token decode step, in fewer and larger kernels.

Legend: B rows, H hidden size, N query heads, K key/value heads, E head dim,
F MLP width, T cache slots, S visible slots.

Same arithmetic as `nextstep.backbones.qwen2.Qwen2Backbone._run` for one token
per row over a `KVCache`, with the layer's work regrouped for a GPU, where a
batch-1 decode step costs about as much per kernel as per byte read:

- the q/k/v and the gate/up projections as one matrix product each
  (`nextstep.fast.packed_projections`);
- the rotary embedding and the cache write as one kernel
  (`nextstep.kernels.rotary_cache`);
- each residual add fused with the norm that follows it
  (`nextstep.kernels.add_rms_norm`), the last one with the final norm;
- the SwiGLU activation as one kernel (`nextstep.kernels.swiglu`);
- with ``skinny=True``, the four matrix products as the few-rows kernel
  `nextstep.kernels.skinny_linear.skinny_linear` instead of the library's;
  with ``int8_weights=True``, through int8 copies of their weights;
- with ``dependent_launches=True``, those kernels as programmatic dependent
  launches, each starting (and asking L2 for its first weights) while the
  kernel ahead finishes.

A layer runs 8 kernels plus attention instead of about 20. Each fused
operation runs its Triton kernel where `nextstep.kernels.triton_enabled`
allows it and its eager reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextstep.backbones.masks import decode_visible_keys
from nextstep.backbones.qwen2 import Qwen2Backbone
from nextstep.fast.packed_projections import PackedProjections, pack_projections
from nextstep.fast.weight_quantization import quantize_int8
from nextstep.kernels import add_rms_norm, rotate_into_cache, skinny_linear, swiglu
from nextstep.kernels.skinny_linear import skinny_kernel_takes, skinny_linear_reference, skinny_linear_triton
from nextstep.kernels.triton_support import dependent_launches, kernel_choice, kernel_function

__all__ = ["FusedDecodeStack"]


class FusedDecodeStack:
    """``stack(embeds, positions, key_mask, slots, layer_caches, visible) -> hidden`` for one token per row.

    The signature of `Qwen2Backbone._run`, restricted to what a decode step
    passes (`nextstep.fast.decode_step.DecodeStep` calls it in its place).
    Packs the backbone's projections (`pack_projections`) when built and again
    whenever they stopped being packed.

    Args:
        backbone: the decoder.
        skinny: run the matrix products as `nextstep.kernels.skinny_linear.skinny_linear`
            (rows up to its ``MAX_ROWS``; more rows use the reference).
        int8_weights: multiply by int8 copies of the four product weights of
            each layer (`nextstep.fast.weight_quantization`; half the bytes of
            bf16, half again the memory of the weights they copy), through
            `skinny_linear`. The copies are made when the stack is built (and
            when `refresh` packs again): build a new stack after changing the weights.
        dependent_launches: launch the fused kernels as programmatic dependent
            launches (`nextstep.kernels.triton_support.dependent_launches`),
            each starting while the one ahead finishes; no effect where Triton
            cannot.
        use_kernels: None: each fused operation runs its Triton kernel where it
            can run; True: always (the few-rows product only for the rows it
            takes); False: never (the eager references). ``NEXTSTEP_DISABLE_TRITON=1``
            makes it False.
    """

    def __init__(self, backbone: Qwen2Backbone, skinny: bool = False, int8_weights: bool = False,
                 dependent_launches: bool = False, use_kernels: bool | None = None):
        if not isinstance(backbone, Qwen2Backbone):
            raise TypeError(f"FusedDecodeStack needs a Qwen2Backbone, found {type(backbone).__name__}")
        self.backbone = backbone
        self.int8_weights = bool(int8_weights)
        self.skinny = bool(skinny) or self.int8_weights
        self.dependent_launches = bool(dependent_launches)
        self.use_kernels = kernel_choice(use_kernels)
        self.add_rms_norm = kernel_function(add_rms_norm, use_kernels)
        self.rotate_into_cache = kernel_function(rotate_into_cache, use_kernels)
        self.swiglu = kernel_function(swiglu, use_kernels)
        self.packs: list[PackedProjections] = pack_projections(backbone)
        self.products = self._products()

    def _products(self) -> list[dict[str, tuple]]:
        """Per layer: (weight, bias, scale) of the qkv, o, gate_up and down products."""
        products = []
        for layer, pack in zip(self.backbone.layers, self.packs):
            output, down = layer.self_attn.o_proj, layer.mlp.down_proj
            weights = {"qkv": (pack.qkv_weight, pack.qkv_bias), "o": (output.weight, output.bias),
                       "gate_up": (pack.gate_up_weight, None), "down": (down.weight, down.bias)}
            layer_products = {}
            for name, (weight, bias) in weights.items():
                scale = None
                if self.int8_weights:
                    quantized = quantize_int8(weight)
                    weight, scale = quantized.values, quantized.scale
                layer_products[name] = (weight, bias, scale)
            products.append(layer_products)
        return products

    def refresh(self) -> bool:
        """Pack the projections again if moving or casting the model broke the packing; whether it did."""
        packs = pack_projections(self.backbone)
        repacked = packs is not self.packs
        self.packs = packs
        if repacked:
            self.products = self._products()
        return repacked

    def _product(self, x: torch.Tensor, product: tuple) -> torch.Tensor:
        weight, bias, scale = product
        if not self.skinny:
            return F.linear(x, weight, bias)
        if self.use_kernels is None:
            return skinny_linear(x, weight, bias, scale)
        if self.use_kernels and skinny_kernel_takes(x, weight):
            return skinny_linear_triton(x, weight, bias, scale)
        return skinny_linear_reference(x, weight, bias, scale)

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, slots: torch.Tensor,
                 layer_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...], visible: int) -> torch.Tensor:
        """One decode step.

        Args:
            embeds: shape (B, 1, H).
            positions: shape (B, 1).
            key_mask: shape (B, T) bool, real key slots (this step's slot included).
            slots: this step's slot, shape (1,) int64.
            layer_caches: per-layer (keys, values), each (B, K, T, E).
            visible: S, the key slots attended over.

        Returns:
            the final-normed hidden states, shape (B, 1, H).
        """
        length = embeds.shape[1]
        if length != 1:
            raise ValueError(f"the fused decode step takes one token per row, found {length}")
        with dependent_launches(self.dependent_launches):
            return self._layers(embeds, positions, key_mask, slots, layer_caches, visible)

    def _layers(self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, slots: torch.Tensor,
                layer_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...], visible: int) -> torch.Tensor:
        """`__call__` after its checks."""
        backbone = self.backbone
        batch, _, hidden_size = embeds.shape
        dtype = embeds.dtype
        mask = backbone.attention.prepare_mask(decode_visible_keys(key_mask[:, :visible], slots), dtype)
        cos, signed_sin = backbone.rotary.signed_tables(positions, dtype)  # (B, 1, E) each
        cos, signed_sin = cos[:, 0], signed_sin[:, 0]
        residual, delta = embeds.reshape(batch, hidden_size), None
        for layer, products, (keys, values) in zip(backbone.layers, self.products, layer_caches):
            attention = layer.self_attn
            residual, normed = self.add_rms_norm(residual, delta, layer.input_layernorm.weight,
                                            layer.input_layernorm.eps)
            qkv = self._product(normed, products["qkv"])  # (B, (N + 2K) E)
            query = self.rotate_into_cache(qkv, cos, signed_sin, keys, values, slots, attention.num_heads,
                                      attention.num_kv_heads)  # (B, N, E)
            out = attention.backend(query[:, :, None], keys.narrow(2, 0, visible), values.narrow(2, 0, visible),
                                    mask)  # (B, N, 1, E)
            delta = self._product(out.reshape(batch, attention.num_heads * attention.head_dim), products["o"])
            residual, normed = self.add_rms_norm(residual, delta, layer.post_attention_layernorm.weight,
                                            layer.post_attention_layernorm.eps)
            gate_up = self._product(normed, products["gate_up"])  # (B, 2F)
            width = gate_up.shape[-1] // 2
            delta = self._product(self.swiglu(gate_up[:, :width], gate_up[:, width:]), products["down"])
        _, hidden = self.add_rms_norm(residual, delta, backbone.norm.weight, backbone.norm.eps)
        return hidden.view(batch, 1, hidden_size)
