"""A Qwen2 / Qwen2.5 decoder, weight-compatible with Hugging Face Qwen2 checkpoints.

Parameter names match ``transformers.Qwen2Model`` without the ``model.`` prefix
(``embed_tokens``, ``layers.{i}.self_attn.q_proj`` ..., ``norm``), so a Hugging
Face checkpoint loads with `Qwen2Backbone.from_pretrained`.

Legend: B batch, L query positions, S visible key positions, T cache capacity,
M = B * L tokens, H hidden size, N query heads, K key/value heads, E head dim,
F MLP width.

Inside the stack hidden states are flattened to (M, H): linear layers on 2-D
inputs skip a reshape per call, which is a large share of a one-token decode
step for small models.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nextstep.backbones.ahead_of_time import AheadOfTimeDecodeStep, ahead_of_time_available
from nextstep.backbones.attention import ATTENTION_BACKENDS, attention_backend
from nextstep.backbones.base import AttentionBackend, Backbone, KVCache, check_token_ids
from nextstep.backbones.masks import attention_mask_for, decode_visible_keys, documents_or_mask, visible_keys
from nextstep.config import Config, require
from nextstep.dtypes import check_input_dtype, is_integer_dtype
from nextstep.layers.rms_norm import RMSNorm
from nextstep.layers.rotary import RotaryEmbedding, rotate
from nextstep.registry import register_component

__all__ = [
    "Qwen2Attention",
    "Qwen2Backbone",
    "Qwen2BackboneConfig",
    "Qwen2DecoderLayer",
    "Qwen2MLP",
    "attention_mask_for",
]

LayerCache = tuple[torch.Tensor, torch.Tensor]
#: What torch.compile(fullgraph=True) raises when a function exceeds its recompile limit.
_RECOMPILE_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


@dataclass
class Qwen2BackboneConfig(Config):
    """Shape of a Qwen2-architecture decoder.

    Args:
        vocab_size: rows of the embedding table.
        hidden_size: H.
        intermediate_size: SwiGLU width F.
        num_layers: decoder layers.
        num_heads: query heads N.
        num_kv_heads: key/value heads K (grouped-query attention); must divide N.
        head_dim: E; ``None`` means ``hidden_size // num_heads``.
        rope_theta: rotary base.
        rms_norm_eps: RMSNorm epsilon.
        attention_bias: bias on q/k/v projections (True in Qwen2).
        output_attention_bias: bias on the output projection (False in Qwen2).
        attention_backend: ``sdpa`` (PyTorch fused attention), ``eager``
            (reference) or ``xformers`` (needs the ``gpu`` extra).
        gradient_checkpointing: recompute layer activations in the backward pass.
    """

    vocab_size: int = 152064
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_layers: int = 48
    num_heads: int = 40
    num_kv_heads: int = 8
    head_dim: int | None = None
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    output_attention_bias: bool = False
    attention_backend: str = "sdpa"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, value, "a positive integer")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                f"a divisor of num_heads={self.num_heads}")
        if self.head_dim is None:
            require(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
                    f"a multiple of num_heads={self.num_heads} when head_dim is not set")
            require(self.hidden_size // self.num_heads % 2 == 0, "hidden_size", self.hidden_size,
                    f"such that hidden_size / num_heads is even (rotary embedding), with num_heads={self.num_heads}")
        else:
            require(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0,
                    "head_dim", self.head_dim, "a positive even integer")
        require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
                self.attention_backend, f"one of {sorted(ATTENTION_BACKENDS)}")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "positive")
        require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "positive")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any], **overrides: Any) -> "Qwen2BackboneConfig":
        """Read a Hugging Face ``config.json`` (``model_type`` ``qwen2``, or ``nextstep``).

        Args:
            hf_config: the parsed JSON.
            **overrides: fields of this config to set as well (for example
                ``attention_backend``).

        Raises:
            ValueError: for a feature this decoder does not implement (another
                activation, rope scaling, sliding-window attention), naming it.
        """
        from nextstep.backbones.qwen2_checkpoint import qwen2_config_from_hf

        return qwen2_config_from_hf(hf_config, **overrides)

    def to_hf_config(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``Qwen2Config`` fields (``model_type`` ``qwen2``)."""
        from nextstep.backbones.qwen2_checkpoint import hf_config_from_qwen2

        return hf_config_from_qwen2(self)


class Qwen2Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, writing into a static cache.

    Args:
        config: the decoder shape.
        backend: the attention kernel.
    """

    def __init__(self, config: Qwen2BackboneConfig, backend: AttentionBackend):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.resolved_head_dim
        self.backend = backend
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden,
                                bias=config.output_attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        batch: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Any,
        layer_cache: LayerCache | None,
        slots: torch.Tensor | None,
        visible: int,
    ) -> torch.Tensor:
        """Attend over the cached keys plus this call's tokens.

        Args:
            x: normalised hidden states, shape (M, H).
            batch: B (M = B * L).
            cos: rotary table, shape (B, L, 1, E).
            sin: signed rotary table, shape (B, L, 1, E).
            mask: the backend's prepared mask.
            layer_cache: this layer's (keys, values), each (B, K, T, E), or None.
            slots: cache slots of this call's tokens, shape (L,) int64.
            visible: S, the number of leading cache slots to attend over.

        Returns:
            attention output, shape (M, H).
        """
        length = x.shape[0] // batch
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        # Queries and keys rotated in one pass: fewer kernel calls per decode step.
        rotated = rotate(torch.cat((q, k), dim=2), cos, sin)  # (B, L, N + K, E)
        q = rotated[:, :, :self.num_heads].transpose(1, 2)  # (B, N, L, E)
        k = rotated[:, :, self.num_heads:].transpose(1, 2)  # (B, K, L, E)
        v = v.transpose(1, 2)  # (B, K, L, E)
        if layer_cache is not None:
            keys, values = layer_cache
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            k, v = keys.narrow(2, 0, visible), values.narrow(2, 0, visible)  # (B, K, S, E)
        out = self.backend(q, k, v, mask)  # (B, N, L, E)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``.

    Args:
        config: the decoder shape.
    """

    def __init__(self, config: Qwen2BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, H) -> (M, H)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Args:
        config: the decoder shape.
        backend: the attention kernel.
    """

    def __init__(self, config: Qwen2BackboneConfig, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, x, batch, cos, sin, mask, layer_cache, slots, visible):
        """x: (M, H) -> (M, H); the other arguments are those of `Qwen2Attention.forward`."""
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin, mask, layer_cache, slots, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


@register_component("backbone", "qwen2")
class Qwen2Backbone(Backbone):
    """Qwen2 / Qwen2.5 decoder stack with explicit positions and a static cache.

    A one-token step with a cache (the decode loop of generation) takes a lean
    path: masks and rotary tables are built once per call, cache writes are
    ``index_copy_`` into preallocated memory, and with gradients disabled the
    step runs under ``torch.inference_mode``. `compile_decode` additionally
    compiles that step with ``torch.compile``.

    Args:
        config: the decoder shape and options.
    """

    config_class = Qwen2BackboneConfig

    def __init__(self, config: Qwen2BackboneConfig | None = None):
        super().__init__()
        self.config = config or Qwen2BackboneConfig()
        c = self.config
        # One backend object per user (no sharing): torch.compile guards on shared
        # objects with slower Python checks.
        self.attention = attention_backend(c.attention_backend)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(c, attention_backend(c.attention_backend)) for _ in range(c.num_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = RotaryEmbedding(c.resolved_head_dim, c.rope_theta)
        self._compiled_decode = None

    # ------------------------------------------------------------------ interface
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        if embeddings.embedding_dim != self.config.hidden_size:
            raise ValueError(f"embeddings must be {self.config.hidden_size} wide (hidden_size), "
                             f"found {embeddings.embedding_dim}")
        self.embed_tokens = embeddings
        self.config = self.config.replace(vocab_size=embeddings.num_embeddings)
        self._compiled_decode = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, H).

        Raises:
            ValueError: ids on the CPU outside the embedding table (`check_token_ids`).
        """
        check_token_ids(input_ids, self.embed_tokens.num_embeddings)
        return self.embed_tokens(input_ids)

    def new_cache(self, batch_size: int, max_length: int, *, device=None, dtype=None) -> KVCache:
        """A `KVCache` of ``batch_size`` rows x ``max_length`` slots (embedding's device and dtype by default)."""
        reference = self.embed_tokens.weight
        return KVCache(
            self.config.num_layers,
            batch_size,
            max_length,
            self.config.num_kv_heads,
            self.config.resolved_head_dim,
            device=device if device is not None else reference.device,
            dtype=dtype if dtype is not None else reference.dtype,
        )

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the decoder.

        Args:
            embeds: input embeddings, shape (B, L, H).
            positions: rotary positions, shape (B, L) int64.
            attention_mask: shape (B, L) bool, False at padding; None means all real.
                Without a cache also (B, L) int64 document ids, 0 at padding
                (packed sequences: attention stays within each document).
            cache: a `KVCache` from `new_cache`; this call's keys and values are
                appended to it and attention covers everything cached before.

        Returns:
            hidden states after the final norm, shape (B, L, H).
        """
        batch, length = self._check_inputs(embeds, positions, attention_mask, cache)
        attention_mask = documents_or_mask(attention_mask, cache is not None)
        step = self._run
        if cache is None:
            slots = None if attention_mask is None else torch.arange(length, device=embeds.device)
            key_mask, layer_caches, visible = attention_mask, None, length
        else:
            start, end = cache.reserve(attention_mask, length)
            if torch.is_grad_enabled() and (embeds.requires_grad or any(p.requires_grad for p in self.parameters())):
                cache.crop(cache.length)
                raise ValueError("a KVCache keeps no autograd history: run cached calls under torch.no_grad() or "
                                 "torch.inference_mode(), and train without a cache")
            slots = torch.arange(start, end, device=embeds.device)
            key_mask, layer_caches, visible = cache.key_mask, cache.layers, end
            compiled = self._compiled_decode if length == 1 else None
            if isinstance(compiled, AheadOfTimeDecodeStep) and compiled.accepts(embeds, positions, cache.max_length):
                try:
                    hidden = compiled(embeds, positions, key_mask, slots, layer_caches)
                except BaseException:
                    cache.crop(cache.length)  # the reserved slots hold nothing: the cache stays as it was
                    raise
                cache.commit(end)
                return hidden
            if compiled is not None and not isinstance(compiled, AheadOfTimeDecodeStep):
                # Fixed shapes (all T slots, future ones masked) so one graph serves every step.
                step, visible = compiled, cache.max_length
        fast = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        with torch.inference_mode() if fast else contextlib.nullcontext():
            try:
                hidden = step(embeds, positions, key_mask, slots, layer_caches, visible)
            except _RECOMPILE_LIMIT_HIT:
                # torch.compile refuses to trace yet another shape; nothing ran, so
                # the eager step can take over.
                warnings.warn("compiled decode hit torch.compile's recompile limit (too many cache shapes); "
                              "decoding eagerly from now on", RuntimeWarning, stacklevel=2)
                self._compiled_decode = None
                hidden = self._run(embeds, positions, key_mask, slots, layer_caches, end)
            except BaseException:
                if cache is not None:
                    cache.crop(cache.length)  # the reserved slots hold nothing: the cache stays as it was
                raise
        if cache is not None:
            cache.commit(end)
        # Hand back an ordinary tensor: inference tensors refuse later in-place updates.
        return hidden.clone() if fast else hidden

    # -------------------------------------------------------------- the stack
    def _run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None,
        slots: torch.Tensor | None,
        layer_caches: tuple[LayerCache, ...] | None,
        visible: int,
    ) -> torch.Tensor:
        """The decoder proper, a function of tensors only (what `compile_decode` compiles).

        Args:
            embeds: shape (B, L, H).
            positions: shape (B, L).
            key_mask: shape (B, >= S) bool, real key slots, or int64 document ids
                (no cache); None with no cache and no padding (plain causal attention).
            slots: slots of the L queries, shape (L,) int64 (None when ``key_mask`` is).
            layer_caches: per-layer (keys, values), each (B, K, T, E), or None.
            visible: S, the key slots attended over.

        Returns:
            shape (B, L, H).
        """
        batch, length, hidden_size = embeds.shape
        dtype = embeds.dtype
        if key_mask is None:
            allowed = None
        elif length == 1 and layer_caches is not None:
            allowed = decode_visible_keys(key_mask[:, :visible], slots)
        else:
            allowed = visible_keys(key_mask[:, :visible], slots)
        mask = self.attention.prepare_mask(allowed, dtype)
        cos, sin = self.rotary.signed_tables(positions, dtype)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, L, 1, E): broadcast over heads
        x = embeds.reshape(batch * length, hidden_size)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            layer_cache = None if layer_caches is None else layer_caches[index]
            if recompute:
                x = checkpoint(layer, x, batch, cos, sin, mask, layer_cache, slots, visible,
                               use_reentrant=False)
            else:
                x = layer(x, batch, cos, sin, mask, layer_cache, slots, visible)
        return self.norm(x).view(batch, length, hidden_size)

    def _check_inputs(self, embeds, positions, attention_mask, cache) -> tuple[int, int]:
        if embeds.ndim != 3 or embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"embeds must have shape (B, L, {self.config.hidden_size}), found {tuple(embeds.shape)}"
            )
        batch, length = embeds.shape[0], embeds.shape[1]
        if positions.shape != (batch, length):
            raise ValueError(
                f"positions must have shape {(batch, length)}, found {tuple(positions.shape)}"
            )
        if not is_integer_dtype(positions.dtype):
            raise ValueError(f"positions must be integers (int64 token positions), found {positions.dtype}")
        check_input_dtype(embeds, self.input_embeddings().weight.dtype, "embeds", "the backbone's")
        if attention_mask is not None and attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask must have shape {(batch, length)}, found {tuple(attention_mask.shape)}"
            )
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(
                    f"Qwen2Backbone needs a KVCache from new_cache(), found {type(cache).__name__}"
                )
            if cache.batch_size != batch:
                raise ValueError(f"batch of {batch} rows does not match the cache's {cache.batch_size} rows")
            if cache.dtype != embeds.dtype:
                raise ValueError(
                    f"cache dtype {cache.dtype} differs from the embeddings' {embeds.dtype}; "
                    "create the cache with new_cache(..., dtype=embeds.dtype)"
                )
            needed = (self.config.num_layers, self.config.num_kv_heads, self.config.resolved_head_dim)
            found = (cache.num_layers, cache.keys.shape[2], cache.keys.shape[4])
            if found != needed:
                raise ValueError("cache holds {} layers x {} heads x {} dims, this backbone needs {} x {} x {}"
                                 .format(*found, *needed))
            if cache.keys.device != embeds.device:
                raise ValueError(f"cache is on {cache.keys.device}, the embeddings on {embeds.device}; "
                                 "create the cache with new_cache(..., device=embeds.device)")
        return batch, length

    # ------------------------------------------------------------------ options
    def set_attention_backend(self, name: str) -> None:
        """Switch every layer to another attention kernel (same weights).

        Args:
            name: one of ``sdpa``, ``eager``, ``xformers``.
        """
        self.attention = attention_backend(name)
        self.config = self.config.replace(attention_backend=name)
        for layer in self.layers:
            layer.self_attn.backend = attention_backend(name)
        self._compiled_decode = None

    def compile_decode(self, ahead_of_time: bool = False, **compile_options: Any) -> None:
        """Compile the one-token cached step.

        Later one-token calls with a cache attend over all ``T`` cache slots
        (future ones masked), so shapes stay fixed and one compiled step serves
        the whole decode loop; prefill and uncached calls stay eager.

        With ``ahead_of_time=False`` the step goes through
        ``torch.compile(fullgraph=True)``; the first call compiles (seconds to
        minutes) and a cache of another size compiles again. Unless ``mode``,
        ``options`` or another ``backend`` is given, a model on the CPU compiles
        with inductor's C++ wrapper (less Python per step) and one on a GPU with
        ``mode="reduce-overhead"`` (CUDA graphs; the cache's tensors are marked
        as static addresses for that). On the CPU the compiled step also skips
        torch.compile's guards on module attributes, which otherwise cost about
        a fifth of a small model's step: parameters stay inputs of the graph, so
        weights updated in place are seen, but a submodule or attribute replaced
        after compiling is not (call `compile_decode` again after such a change;
        `set_attention_backend` does).

        With ``ahead_of_time=True`` the step is exported and compiled now with
        AOTInductor (`nextstep.backbones.ahead_of_time`; tens of seconds), for
        every batch size and cache length at once, and then runs with no Python
        between the call and the kernels: the fastest decode on the CPU for
        small models. It reads the parameters in place (updates in place are
        seen); it serves calls without gradients and otherwise decodes eagerly (a cached call that
        needs gradients is refused).
        Moving or casting the backbone drops either compiled step. When export
        or compilation fails, a warning says why and decoding stays eager.

        Args:
            ahead_of_time: compile with AOTInductor now instead of
                ``torch.compile`` at the first call.
            **compile_options: passed to ``torch.compile`` (for example
                ``dynamic=False``, or ``backend="eager"`` to check tracing only);
                none are accepted with ``ahead_of_time``.
        """
        if ahead_of_time:
            if compile_options:
                raise ValueError(f"ahead_of_time takes no torch.compile options, found {sorted(compile_options)}")
            self._compiled_decode = None
            if not ahead_of_time_available():
                warnings.warn("this PyTorch lacks torch.export / AOTInductor packaging; decoding stays eager",
                              RuntimeWarning, stacklevel=2)
                return
            reference = self.embed_tokens.weight
            cache = self.new_cache(2, 4)
            cache.key_mask[:, :3] = True
            example = (torch.zeros(2, 1, self.hidden_size, dtype=reference.dtype, device=reference.device),
                       torch.full((2, 1), 3, dtype=torch.long, device=reference.device),
                       cache.key_mask, torch.tensor([3], device=reference.device), cache.layers)
            try:
                self._compiled_decode = AheadOfTimeDecodeStep(self, self._run, example)
            except Exception as error:  # noqa: BLE001 - any failure means: stay eager
                warnings.warn(f"ahead-of-time compilation of the decode step failed ({type(error).__name__}: "
                              f"{error}); decoding stays eager", RuntimeWarning, stacklevel=2)
            return
        options = dict(compile_options)
        if not {"mode", "options", "backend"} & set(options):
            on_gpu = self.embed_tokens.weight.device.type == "cuda"
            if on_gpu:
                options["mode"] = "reduce-overhead"
            else:
                cpu_options: dict[str, Any] = {"cpp_wrapper": True}
                skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
                if skip_module_guards is not None:
                    cpu_options["guard_filter_fn"] = skip_module_guards
                options["options"] = cpu_options
        self._compiled_decode = torch.compile(self._run, fullgraph=True, **options)

    def _apply(self, fn, recurse=True):
        # Moving or casting replaces the parameter tensors a compiled step was built around.
        self._compiled_decode = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("assign_to_params_buffers", False):
            self._compiled_decode = None  # load_state_dict(assign=True) replaces the parameters
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def disable_compiled_decode(self) -> None:
        """Go back to the eager decode step."""
        self._compiled_decode = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        **config_overrides: Any,
    ) -> "Qwen2Backbone":
        """Load a Hugging Face Qwen2 / Qwen2.5 checkpoint directory (see `load_qwen2_backbone`).

        Args:
            path: directory with ``config.json`` and safetensors weights
                (one file, or shards with ``model.safetensors.index.json``).
            dtype: parameter dtype; None keeps float32.
            device: where the parameters are allocated.
            **config_overrides: fields of `Qwen2BackboneConfig` to override
                (for example ``attention_backend="eager"``).
        """
        from nextstep.backbones.qwen2_checkpoint import load_qwen2_backbone

        return load_qwen2_backbone(path, dtype=dtype, device=device, **config_overrides)
