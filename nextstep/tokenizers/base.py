"""Interfaces of the image tokenizer and the text tokenizer.

Conventions:
    images: (B, 3, H, W), float, values in [-1, 1].
    latents: (B, C, H / f, W / f) where f is `ImageTokenizer.downsample`.
    tokens: (B, N, D) in raster order over the token grid, with
        ``D = C * p * p`` features ordered (c, p, q) and ``p`` the patch size.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from nextstep.config import as_integer, described
from nextstep.dtypes import without_autocast
from nextstep.tokenizers.special_tokens import (
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    END_OF_TEXT,
    IMAGE_AREA,
    IMAGE_PLACEHOLDER,
    PAD,
)

logger = logging.getLogger(__name__)


def module_identity(module: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """A whole module's identity: its class and its config's JSON when it has one, and its state dict."""
    config = getattr(module, "config", None)
    description = type(module).__name__ + (config.to_json() if hasattr(config, "to_json") else "")
    return description, module.state_dict()


class ImageTokenizer(nn.Module, ABC):
    """Turns images into continuous latents and back.

    Implement `encode`, `decode` and the two size properties; the
    2x2 space-to-depth (`patchify`) and token-grid arithmetic come for free.

    Attributes:
        patch_size: side of the space-to-depth patch (2 in NextStep-1).
    """

    patch_size: int = 2

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """C, the number of latent channels."""

    @property
    @abstractmethod
    def downsample(self) -> int:
        """f, the spatial reduction factor from pixels to latents."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f)."""

    @property
    def samples_latents(self) -> bool:
        """Whether `encode` draws random numbers (a sampled posterior). The model then seeds those
        draws from its caller's generator (`nextstep.model.NextStep.encode_images`), so that training
        repeats exactly; False by default."""
        return False

    def encode_seeded(self, images: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
        """`encode`, its random draws (when it `samples_latents`) seeded by ``seed`` and kept apart from
        the global random state, which stays as it was.

        ``seed`` is one seed for the whole batch (each image's draw then depends on its place in the
        batch), or one seed per image (B seeds: each image's draw depends on its own seed alone, whatever
        batch it is encoded in). The default encodes such images one at a time; a tokenizer that can
        draw per row in one batch overrides this.
        """
        if not self.samples_latents:
            return self.encode(images)
        if not isinstance(seed, int):
            seeds = list(seed)
            if len(seeds) != images.shape[0]:
                raise ValueError(f"seed must be one int or one per image ({images.shape[0]}), found {len(seeds)}")
            return torch.cat([self.encode_seeded(images[row:row + 1], int(each)) for row, each in enumerate(seeds)])
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.manual_seed(seed)
            return self.encode(images)

    def encode_in_own_precision(self, images: torch.Tensor,
                                seed: int | Sequence[int] | None = None) -> torch.Tensor:
        """`encode` (`encode_seeded` with ``seed``) in the tokenizer's own dtype and precision, whatever
        autocast the caller runs under: the images cast to its parameters' dtype, autocast off. These are the
        tokens training learns, the same whether encoded on the fly or stored in a latent cache."""
        reference = next(self.parameters(), None)
        if reference is not None and images.is_floating_point():
            images = images.to(reference.dtype)
        with without_autocast(images.device.type):
            return self.encode(images) if seed is None else self.encode_seeded(images, seed)

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""

    @property
    def token_dim(self) -> int:
        """D = C * patch_size**2, the width of one image token."""
        return self.latent_channels * self.patch_size**2

    @property
    def pixels_per_token(self) -> int:
        """Side in pixels of the square one token covers (f * patch_size)."""
        return self.downsample * self.patch_size

    def encoding_identity(self) -> tuple[str, dict[str, torch.Tensor]]:
        """What `encode` depends on: a description (text) and the tensors it reads.

        Two tokenizers with the same identity make the same latents, so latents
        stored for one (a latent cache) serve the other. The default is the
        whole module: its class, its config's JSON when it has one, and its
        state dict. A tokenizer whose decoder can change on its own (a
        fine-tuned decoder) leaves the decoder out.
        """
        return module_identity(self)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of an image of ``height`` x ``width`` pixels.

        Raises:
            ValueError: if a side is not a positive multiple of `pixels_per_token`.
        """
        step = self.pixels_per_token
        sides = []
        for name, value in (("height", height), ("width", width)):
            side = as_integer(value)
            if side is None or side <= 0 or side % step:
                raise ValueError(
                    f"image {name} must be a positive multiple of {step} "
                    f"(VAE factor {self.downsample} x patch {self.patch_size}), found {described(value)}"
                )
            sides.append(side // step)
        return sides[0], sides[1]

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """Space-to-depth: (B, C, H, W) -> (B, H/p * W/p, C*p*p), features (c, p, q).

        Raises:
            ValueError: if ``latents`` are not 4-D, have other than `latent_channels` channels, or
                sides that are not multiples of `patch_size`.
        """
        if latents.ndim != 4:
            raise ValueError(f"latents must have shape (B, C, H, W), found {tuple(latents.shape)}")
        _, channels, height, width = latents.shape
        if channels != self.latent_channels:
            raise ValueError(f"latents must have {self.latent_channels} channels, found {channels}")
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"latent height and width must be multiples of the patch size {p}, "
                f"found {height}x{width}"
            )
        return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def unpatchify(self, tokens: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
        """Depth-to-space: (B, h*w, C*p*p) -> (B, C, h*p, w*p); the inverse of `patchify`.

        Raises:
            ValueError: if ``grid_height`` or ``grid_width`` is not a positive integer, or ``tokens``
                are not (B, h*w, `token_dim`).
        """
        sides = []
        for name, value in (("grid_height", grid_height), ("grid_width", grid_width)):
            side = as_integer(value)
            if side is None or side <= 0:
                raise ValueError(f"{name} must be a positive integer, found {described(value)}")
            sides.append(side)
        grid_height, grid_width = sides
        if tokens.ndim != 3 or tokens.shape[1:] != (grid_height * grid_width, self.token_dim):
            raise ValueError(
                f"tokens must have shape (B, {grid_height * grid_width}, {self.token_dim}) for a "
                f"{grid_height}x{grid_width} grid, found {tuple(tokens.shape)}"
            )
        p = self.patch_size
        return rearrange(
            tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=grid_height, w=grid_width, p=p, q=p
        )

    def check_images(self, images: torch.Tensor) -> None:
        """Check that ``images`` are (B, 3, H, W), floating, in [-1, 1], with H, W multiples of f.

        Images whose values all lie in [0, 1] (not all equal) pass with a warning, the first time
        this tokenizer sees such images: they are likely [0, 1] images not yet mapped to [-1, 1].

        Raises:
            ValueError: a wrong shape, a non-floating dtype, sides that are not positive multiples of
                `downsample`, or values that are not finite or lie outside [-1, 1].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), found {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point with values in [-1, 1], found {images.dtype} "
                             "(uint8 pixels p become p / 127.5 - 1)")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample or not height or not width:
            raise ValueError(
                f"image height and width must be positive multiples of {self.downsample}, "
                f"found {height}x{width}"
            )
        if images.numel() and images.device.type != "meta":
            low, high = torch.stack(torch.aminmax(images)).tolist()  # one pass; NaN or inf when any value is
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError("image values must be finite numbers in [-1, 1], found NaN or infinite values")
            if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
                raise ValueError(
                    f"image values must lie in [-1, 1], found range [{low:.3f}, {high:.3f}]"
                )
            if 0.0 <= low < high <= 1.0 and not getattr(self, "_warned_unit_range", False):
                self._warned_unit_range = True
                logger.warning("the images' values all lie in [%.2f, %.2f]; images are expected in [-1, 1] "
                               "(x * 2 - 1 converts images in [0, 1])", low, high)


def token_id_list(ids) -> list[int]:
    """``ids`` as a list of ints, or a ``TypeError`` naming what they are instead."""
    expected = "ids must be a list or 1-D sequence of ints"
    shape = getattr(ids, "shape", None)
    if shape is not None:
        if len(shape) != 1:
            kind = {"Tensor": "tensor", "ndarray": "array"}.get(type(ids).__name__, type(ids).__name__)
            raise TypeError(f"{expected}, found a {kind} of shape {tuple(shape)}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{expected}, found {type(ids).__name__} {ids!r}")
    values = []
    for token in ids:
        value = as_integer(token)
        if value is None:
            if isinstance(token, (list, tuple)) or getattr(token, "ndim", 0):
                raise TypeError(f"{expected}, found a {type(ids).__name__} holding a {type(token).__name__} "
                                f"({token!r})")
            raise TypeError(f"{expected}, found {described(token)} among them")
        values.append(value)
    return values


class TextTokenizer(ABC):
    """Text <-> integer ids, with NextStep's special tokens in the vocabulary.

    `encode` treats its input as plain text: a special token's string in
    user text never becomes a special id. Special ids come from
    `special_token_id`. Constructors take ``(config, base_dir=None)``;
    ``base_dir`` is the model directory that relative file paths refer to.
    """

    config_class: type

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Ids -> text; special ids are rendered as their strings."""

    @abstractmethod
    def special_token_id(self, token: str) -> int:
        """Id of a special token string such as ``"<|begin_of_image|>"``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids with a row in the embedding table and a logit of the LM head."""

    @property
    def input_vocab_size(self) -> int:
        """Number of ids `encode` can produce: `vocab_size`, plus ids a model reads only as
        input (through `nextstep.layers.word_vectors.WordVectorInput`)."""
        return self.vocab_size

    def save(self, directory: Path) -> Any:
        """Write whatever files the tokenizer needs into ``directory`` (default: none).

        Returns:
            the config a model saved there records for this tokenizer (paths relative to
            ``directory``), or None for the tokenizer's own; ``self.config`` stays as it is.
        """
        return None

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes an ordinary id stands for, where `decode` cannot say them (a byte-level BPE
        token holding part of a character); None to let its decoded text speak for it (the default)."""
        return None

    def byte_id(self, value: int) -> int | None:
        """The id that stands for the raw byte ``value`` (0-255), in tokenizers that spell
        text as bytes; None in those that do not (the default)."""
        return None

    def fit(self, texts: Iterable[str]) -> "TextTokenizer":
        """A tokenizer adapted to a training corpus (default: this one, unchanged).

        Tokenizers whose vocabulary is learned from captions (`WordTextTokenizer`)
        return a new, fitted tokenizer; a recipe that swaps a model's text tokenizer
        calls this with the run's captions before training starts.
        """
        return self

    @property
    def pad_id(self) -> int:
        return self.special_token_id(PAD)

    @property
    def eos_id(self) -> int:
        return self.special_token_id(END_OF_TEXT)

    @property
    def image_area_id(self) -> int:
        return self.special_token_id(IMAGE_AREA)

    @property
    def begin_of_image_id(self) -> int:
        return self.special_token_id(BEGIN_OF_IMAGE)

    @property
    def end_of_image_id(self) -> int:
        return self.special_token_id(END_OF_IMAGE)

    @property
    def image_placeholder_id(self) -> int:
        return self.special_token_id(IMAGE_PLACEHOLDER)
