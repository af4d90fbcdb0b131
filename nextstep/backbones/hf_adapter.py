"""Any ``transformers`` decoder behind the `Backbone` interface.

`HFBackbone` wraps the base model of a Hugging Face causal LM (``AutoModel``:
hidden states, no LM head), built from a config or loaded from a local
directory. It is the way to use transformers' own features (its attention
implementations, quantisation, architectures this library does not implement);
`Qwen2Backbone` is the faster native choice for Qwen2-shaped models.

Legend: B batch, L new positions, T cache capacity, H hidden size.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nextstep.backbones.base import Backbone, BackboneCache, check_token_ids
from nextstep.backbones.masks import documents_or_mask, visible_keys
from nextstep.config import Config, require
from nextstep.dtypes import DTYPES
from nextstep.io import what_is_at
from nextstep.registry import register_component


@dataclass
class HFBackboneConfig(Config):
    """Which transformers model to wrap.

    Give exactly one of ``path`` and ``model_config``.

    Args:
        path: a local directory with ``config.json`` and weights (a causal-LM
            checkpoint loads too: its LM head is dropped). Nothing is downloaded. Once
            built, the backbone records the checkpoint's architecture as ``model_config``
            instead, so that a saved model does not need the directory.
        model_config: the fields of a transformers config, including
            ``model_type`` (for example ``{"model_type": "qwen2", "hidden_size": 64, ...}``);
            the model is built with random weights.
        dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto`` (the checkpoint's).
        attn_implementation: transformers' attention implementation (``sdpa``, ``eager``, ...).
        gradient_checkpointing: enable transformers' gradient checkpointing.
    """

    path: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        require(bool(self.path) != bool(self.model_config), "path", self.path,
                "set when model_config is empty, and empty when model_config is set")
        if self.model_config:
            require(isinstance(self.model_config, dict) and "model_type" in self.model_config,
                    "model_config", self.model_config, "a mapping with a 'model_type' key")
        require(self.dtype in (*DTYPES, "auto"), "dtype", self.dtype, f"one of {[*DTYPES, 'auto']}")


class HFCache(BackboneCache):
    """A transformers cache plus the bookkeeping of the `BackboneCache` interface.

    Keys and values live in the transformers cache object (by default its
    ``DynamicCache``); this wrapper adds the fixed capacity, the (B, T) mask of
    real slots, cropping and row selection.

    Args:
        hf_cache: the transformers cache object.
        batch_size: rows B.
        max_length: capacity T.
        device: where the slot mask lives.
        empty: an empty transformers cache that a cache of other rows starts from when nothing
            is filled (`select_rows` after ``crop(0)``); by default a copy of ``hf_cache``,
            which must then be empty.
    """

    def __init__(self, hf_cache: Any, batch_size: int, max_length: int, device: torch.device | str | None = None,
                 *, empty: Any = None):
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, found {batch_size} and {max_length}")
        self.hf_cache = hf_cache
        self._empty = empty if empty is not None else copy.deepcopy(hf_cache)
        with torch.inference_mode(False):  # an ordinary tensor: crops and reuse work outside inference mode
            self.key_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    def reserve(self, attention_mask: torch.Tensor | None, length: int) -> tuple[int, int]:
        """Claim ``length`` slots; see `nextstep.backbones.base.KVCache.reserve`."""
        start, end = self._length, self._length + length
        if end > self.max_length:
            raise ValueError(
                f"sequence of {end} positions does not fit the cache of {self.max_length} "
                f"({start} already filled, {length} new); create the cache with a larger max_length"
            )
        if attention_mask is not None and attention_mask.shape[0] != self.batch_size:
            raise ValueError(
                f"batch of {attention_mask.shape[0]} rows does not match the cache's {self.batch_size} rows"
            )
        self.key_mask[:, start:end] = True if attention_mask is None else attention_mask
        return start, end

    def commit(self, end: int) -> None:
        """Mark slots up to ``end`` as filled."""
        self._length = end

    def forget_unfilled(self) -> None:
        """Drop what any layer of the transformers cache holds beyond the filled slots (after a failed call)."""
        layers = getattr(self.hf_cache, "layers", None)
        if layers is None:  # transformers 4.x: one call crops every layer to a length
            if self.hf_cache.get_seq_length() > self._length:
                self.hf_cache.crop(self._length)
            return
        for layer in layers:
            extra = layer.get_seq_length() - self._length
            if extra > 0:
                layer.crop(-extra)  # a negative argument removes that many tokens

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` slots."""
        length = self.check_crop_length(length)
        if length < self._length:
            # A negative argument removes that many tokens in every transformers version.
            self.hf_cache.crop(length - self._length)
        self.key_mask[:, length:] = False
        self._length = length

    def select_rows(self, rows: torch.Tensor | list[int]) -> "HFCache":
        """A new cache holding ``rows`` (copied; repeats allowed)."""
        rows = self.check_rows(rows, self.key_mask.device)
        if self._length > 0:
            hf_cache = copy.deepcopy(self.hf_cache)
            hf_cache.batch_select_indices(rows)
        else:  # the layers may still hold empty tensors of this cache's rows, which transformers does not select
            hf_cache = copy.deepcopy(self._empty)
        new = HFCache(hf_cache, rows.numel(), self.max_length, self.key_mask.device, empty=self._empty)
        with torch.inference_mode(False):
            new.key_mask = self.key_mask[rows].clone()
        new._length = self._length
        return new


def _check_model_directory(path: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a directory holding ``config.json``, naming what is there."""
    if (path / "config.json").is_file():
        return
    if path.is_dir():
        names = sorted(child.name for child in path.iterdir())
        found = (f"a folder without config.json (holding {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                 if names else "an empty folder")
    else:
        found = what_is_at(path)
    raise FileNotFoundError(f"expected a Hugging Face model directory (with config.json) at {str(path)!r}, "
                            f"found {found}")


def _dtype_argument() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@register_component("backbone", "huggingface")
class HFBackbone(Backbone):
    """A transformers base model (``AutoModel``) as a `Backbone`.

    Args:
        config: what to load or build.
        model: an already built transformers model to wrap instead (a causal
            LM is reduced to its base model); ``config`` then only records options.

    Raises:
        FileNotFoundError: ``config.path`` is not a directory holding ``config.json``.
    """

    config_class = HFBackboneConfig

    def __init__(self, config: HFBackboneConfig | None = None, *, model: nn.Module | None = None):
        super().__init__()
        if model is None:
            if config is None:
                raise ValueError("HFBackbone needs an HFBackboneConfig or a model")
            model = self._build(config)
            if config.path:  # the architecture is known now: a saved model needs the path no more
                config = config.replace(path="", model_config=model.config.to_dict())
        else:
            model = getattr(model, "base_model", model)
            if config is None:
                config = HFBackboneConfig(model_config=model.config.to_dict())
        self.config = config
        self.model = model
        if config.gradient_checkpointing:
            self._checkpoint_layers(True)
        parameters = inspect.signature(self.model.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache`` (5.x).
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @staticmethod
    def _build(config: HFBackboneConfig) -> nn.Module:
        """The transformers model ``config`` describes.

        Raises:
            FileNotFoundError: ``path`` is set but is not a directory holding ``config.json``.
        """
        from transformers import AutoConfig, AutoModel

        if config.path:
            _check_model_directory(Path(config.path))
        dtype = DTYPES.get(config.dtype, config.dtype)
        # Built on the meta device (a saved NextStep model being loaded, whose file holds these
        # weights): the checkpoint's architecture alone, as transformers loads no weights there.
        on_meta = torch.empty(()).device.type == "meta"
        if config.path and not on_meta:
            return AutoModel.from_pretrained(config.path, local_files_only=True,
                                             attn_implementation=config.attn_implementation,
                                             **{_dtype_argument(): dtype})
        if config.path:
            hf_config = AutoConfig.from_pretrained(config.path, local_files_only=True)
        else:
            fields = dict(config.model_config)
            hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        dtype_argument = {} if dtype == "auto" else {_dtype_argument(): dtype}  # rotary tables stay fp32
        return AutoModel.from_config(hf_config, attn_implementation=config.attn_implementation, **dtype_argument)

    @classmethod
    def from_model(cls, model: nn.Module) -> "HFBackbone":
        """Wrap an existing transformers model (a causal LM is reduced to its base model)."""
        return cls(model=model)

    def reset_buffers(self) -> None:
        """Rebuild buffers left on the meta device (rotary tables) after meta-device construction.

        ``NextStep.from_pretrained`` builds the model on the meta device and
        assigns the saved tensors; buffers that checkpoints do not hold stay
        empty. Each parameter-free transformers submodule holding such buffers is
        rebuilt from the model config on the embeddings' device.
        """
        self._rebuild_buffers(lambda name, buffer: buffer.is_meta)

    def _apply(self, fn, recurse=True):
        # ``.to(torch.bfloat16)`` and loading in a dtype cast every floating buffer; rotary
        # frequencies rounded to 8 bits would shift every angle, so they are rebuilt in fp32.
        super()._apply(fn, recurse)
        self._rebuild_buffers(lambda name, buffer: ("inv_freq" in name and not buffer.is_meta
                                                    and buffer.dtype != torch.float32), required=False)
        return self

    def _rebuild_buffers(self, stale, required: bool = True) -> None:
        """Rebuild, from the model config, each parameter-free submodule with a buffer ``stale(name, buffer)``;
        one that cannot be rebuilt is an error when ``required``, else left as it is."""
        device = self.model.get_input_embeddings().weight.device
        for name, module in self.model.named_modules():
            if not any(stale(buffer_name, buffer) for buffer_name, buffer in module.named_buffers(recurse=False)):
                continue
            if next(module.parameters(recurse=False), None) is not None:
                if not required:
                    continue
                raise ValueError(f"cannot rebuild the meta buffers of {name!r}: it also holds parameters")
            try:
                with torch.device(device):
                    fresh = type(module)(config=self.model.config)
            except TypeError as error:
                if not required:
                    continue
                raise ValueError(f"cannot rebuild the meta buffers of {name!r} ({type(module).__name__}) "
                                 f"from the model config: {error}") from error
            for buffer_name, buffer in fresh.named_buffers(recurse=False):
                persistent = buffer_name not in module._non_persistent_buffers_set
                module.register_buffer(buffer_name, buffer, persistent=persistent)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        """Replace the table; only for a model built from ``model_config`` (whose
        ``vocab_size`` then follows), since a ``path`` model reloads its own size."""
        if not self.config.model_config:
            raise ValueError(f"the embedding table of a backbone loaded from {self.config.path!r} keeps that "
                             "checkpoint's size; build the backbone from model_config to change its vocabulary")
        hidden = self.model.config.hidden_size
        if embeddings.embedding_dim != hidden:
            raise ValueError(f"embeddings must be {hidden} wide (hidden_size), found {embeddings.embedding_dim}")
        self.model.set_input_embeddings(embeddings)
        self.model.config.vocab_size = embeddings.num_embeddings
        self.config = self.config.replace(
            model_config={**self.config.model_config, "vocab_size": embeddings.num_embeddings})

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn transformers' gradient checkpointing on or off, and the config's field with it."""
        super().set_gradient_checkpointing(enabled)
        self._checkpoint_layers(enabled)

    def _checkpoint_layers(self, enabled: bool) -> None:
        # transformers 5.x names it activation checkpointing and warns on the older name.
        verb = "enable" if enabled else "disable"
        switch = getattr(self.model, f"activation_checkpointing_{verb}", None)
        (switch or getattr(self.model, f"gradient_checkpointing_{verb}"))()

    def decoder_layers(self) -> list[nn.Module]:
        """The transformers model's decoder layers (its ``layers``), or none where it names them otherwise."""
        layers = getattr(self.model, "layers", None)
        return list(layers) if isinstance(layers, nn.ModuleList) else []

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, H).

        Raises:
            ValueError: ids on the CPU outside the embedding table (`check_token_ids`).
        """
        table = self.model.get_input_embeddings()
        check_token_ids(input_ids, table.num_embeddings)
        return table(input_ids)

    def new_cache(self, batch_size: int, max_length: int, *, device=None, dtype=None) -> HFCache:
        """An `HFCache` around a transformers ``DynamicCache`` (``dtype`` follows the hidden states)."""
        from transformers import DynamicCache

        try:
            hf_cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers versions whose DynamicCache takes no config
            hf_cache = DynamicCache()
        reference = self.model.get_input_embeddings().weight
        return HFCache(hf_cache, batch_size, max_length, device if device is not None else reference.device)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HFCache | None = None,
    ) -> torch.Tensor:
        """embeds (B, L, H), positions (B, L), attention_mask (B, L) -> hidden states (B, L, H).

        ``attention_mask`` is bool (False at padding) or, without a cache, int64
        document ids of packed sequences (see `nextstep.backbones.base.Backbone.forward`).
        """
        if embeds.ndim != 3 or embeds.shape[-1] != self.hidden_size:
            raise ValueError(f"embeds must have shape (B, L, {self.hidden_size}), found {tuple(embeds.shape)}")
        batch, length = embeds.shape[:2]
        if positions.shape != (batch, length):
            raise ValueError(f"positions must have shape {(batch, length)}, found {tuple(positions.shape)}")
        if attention_mask is not None and attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask must have shape {(batch, length)}, found {tuple(attention_mask.shape)}"
            )
        attention_mask = documents_or_mask(attention_mask, cache is not None)
        if cache is None:
            mask = None if attention_mask is None else attention_mask.long()
            if mask is not None and mask.numel() and int(mask.max()) > 1:
                # Packed documents: transformers takes a full (B, 1, L, L) mask as given, and its eager
                # attention adds it to the scores, so it is additive (0 where visible), which SDPA reads alike.
                visible = visible_keys(mask, torch.arange(length, device=mask.device))[:, None]
                mask = torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device).masked_fill_(
                    ~visible, torch.finfo(embeds.dtype).min)
            output = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
            return output.last_hidden_state
        if not isinstance(cache, HFCache):
            raise TypeError(f"HFBackbone needs an HFCache from new_cache(), found {type(cache).__name__}")
        if cache.batch_size != batch:
            raise ValueError(f"batch of {batch} rows does not match the cache's {cache.batch_size} rows")
        if self.training and torch.is_grad_enabled() and any(
                getattr(module, "gradient_checkpointing", False) is True for module in self.model.modules()):
            raise ValueError("transformers drops the cache of layers that checkpoint their gradients: run cached "
                             "calls under torch.no_grad() or in eval mode, or turn gradient checkpointing off")
        start, end = cache.reserve(attention_mask, length)
        try:
            output = self.model(
                inputs_embeds=embeds,
                attention_mask=cache.key_mask[:, :end].long(),  # (B, T_filled + L): past and new slots
                position_ids=positions,
                use_cache=True,
                **{self._cache_argument: cache.hf_cache},
            )
        except BaseException:
            cache.forget_unfilled()  # the layers that ran before the failure appended their keys
            cache.crop(cache.length)  # the reserved slots hold nothing: the cache stays as it was
            raise
        cache.commit(end)
        return output.last_hidden_state
