"""The FLUX.1 autoencoder (f8) with NextStep's latent normalisation.

Module names follow the BFL ``ae.safetensors`` layout (``encoder.down.{i}.block.{j}``,
``encoder.mid.attn_1.q`` ...), so those weights load without renaming.

Legend: B batch, C latent channels, H/W pixel sides, h/w latent sides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nextstep.config import OMITTED_WHEN_DEFAULT, Config, require
from nextstep.dtypes import check_input_dtype
from nextstep.registry import register_component
from nextstep.tokenizers.base import ImageTokenizer
from nextstep.tokenizers.latent_normalization import (
    NORMALIZATIONS,
    denormalize_latents,
    normalize_latents,
    perturb_latents,
    standardize_channels,
)

#: `FluxVAEConfig` fields that shape the decoder alone (never the latents).
DECODER_FIELDS = ("decoder_ch", "decoder_norm_groups")


@dataclass
class FluxVAEConfig(Config):
    """Shape and latent handling of `FluxVAE`.

    Args:
        in_channels: image channels of the encoder input.
        out_channels: image channels of the decoder output.
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers; ``len(ch_mult) - 1`` downsamplings (f = 2**that).
        num_res_blocks: residual blocks per encoder level (decoder uses one more).
        decoder_ch: base width of the decoder (0: ``ch``); a wider decoder reads
            the same latents (see `nextstep.tokenizers.decoder_widening`).
        decoder_norm_groups: GroupNorm groups of the decoder (0: ``norm_groups``).
        z_channels: latent channels C.
        norm_groups: GroupNorm groups (32 in FLUX.1); every width must divide by it.
        normalization: one of ``layer_norm`` (NextStep), ``scale_shift`` (FLUX), ``none``.
        normalization_patch_size: block side of the ``layer_norm`` standardisation (``psz``).
        scaling_factor: the scale of ``scale_shift``, and of ``layer_norm`` after its
            standardisation (1 in NextStep-1's release).
        shift_factor: the shift of ``scale_shift``, and of ``layer_norm`` after its
            standardisation (0 in NextStep-1's release).
        deterministic: encode to the posterior mean (True) or sample it.
        patch_size: space-to-depth side for tokens.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    decoder_ch: int = field(default=0, metadata=OMITTED_WHEN_DEFAULT)
    decoder_norm_groups: int = field(default=0, metadata=OMITTED_WHEN_DEFAULT)
    z_channels: int = 16
    norm_groups: int = 32
    normalization: str = "layer_norm"
    normalization_patch_size: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    deterministic: bool = True
    patch_size: int = 2

    def validate(self) -> None:
        for name in ("in_channels", "out_channels"):
            require(getattr(self, name) == 3, name, getattr(self, name), "3 (images are RGB throughout the library)")
        require(self.ch > 0, "ch", self.ch, "positive")
        require(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), "ch_mult",
                self.ch_mult, "a non-empty sequence of positive integers")
        require(self.num_res_blocks >= 1, "num_res_blocks", self.num_res_blocks, ">= 1")
        require(self.z_channels > 0, "z_channels", self.z_channels, "positive")
        widths = {self.ch * m for m in self.ch_mult}
        require(all(w % self.norm_groups == 0 for w in widths), "norm_groups", self.norm_groups,
                f"a divisor of every level width {sorted(widths)}")
        require(self.decoder_ch >= 0, "decoder_ch", self.decoder_ch, ">= 0 (0: the encoder's ch)")
        require(self.decoder_norm_groups >= 0, "decoder_norm_groups", self.decoder_norm_groups,
                ">= 0 (0: norm_groups)")
        decoder_widths = {self.decoder_width * m for m in self.ch_mult}
        require(all(w % self.decoder_groups == 0 for w in decoder_widths), "decoder_norm_groups",
                self.decoder_groups, f"a divisor of every decoder level width {sorted(decoder_widths)}")
        require(self.normalization in NORMALIZATIONS, "normalization", self.normalization,
                f"one of {list(NORMALIZATIONS)}")
        require(self.normalization_patch_size >= 1, "normalization_patch_size",
                self.normalization_patch_size, ">= 1")
        require(self.scaling_factor != 0, "scaling_factor", self.scaling_factor, "non-zero")
        require(self.patch_size >= 1, "patch_size", self.patch_size, ">= 1")

    @property
    def decoder_width(self) -> int:
        """The decoder's base width (``decoder_ch``, or ``ch`` when that is 0)."""
        return self.decoder_ch or self.ch

    @property
    def decoder_groups(self) -> int:
        """The decoder's GroupNorm groups (``decoder_norm_groups``, or ``norm_groups`` when that is 0)."""
        return self.decoder_norm_groups or self.norm_groups

    @property
    def symmetric(self) -> bool:
        """Whether encoder and decoder share widths and groups (what FLUX.1 files describe)."""
        return self.decoder_width == self.ch and self.decoder_groups == self.norm_groups


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-Conv3x3 stages with a (1x1 conv when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with (0, 1, 0, 1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> posterior moments (B, 2C, H/f, W/f) as [mean | logvar]."""

    def __init__(self, config: FluxVAEConfig):
        super().__init__()
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = config.ch
        for level, mult in enumerate(config.ch_mult):
            stage = nn.Module()
            out_width = config.ch * mult
            stage.block = nn.ModuleList(
                ResnetBlock(width if j == 0 else out_width, out_width, groups)
                for j in range(config.num_res_blocks)
            )
            width = out_width
            if level != len(config.ch_mult) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = _MidBlock(width, groups)
        self.norm_out = _group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, C, h, w) -> images (B, 3, h*f, w*f); widths from ``decoder_width``."""

    def __init__(self, config: FluxVAEConfig):
        super().__init__()
        groups = config.decoder_groups
        width = config.decoder_width * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = _MidBlock(width, groups)
        stages = []
        for level in reversed(range(len(config.ch_mult))):
            stage = nn.Module()
            out_width = config.decoder_width * config.ch_mult[level]
            stage.block = nn.ModuleList(
                ResnetBlock(width if j == 0 else out_width, out_width, groups)
                for j in range(config.num_res_blocks + 1)
            )
            width = out_width
            if level != 0:
                stage.upsample = Upsample(width)
            stages.insert(0, stage)
        # Indexed by level, so up.0 is the full-resolution stage (the BFL layout).
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@register_component("image_tokenizer", "flux_vae")
class FluxVAE(ImageTokenizer):
    """FLUX.1-shaped VAE whose encoder output is normalised for the transformer.

    ``encode`` returns normalised latents (per-position standardised in NextStep's
    default); ``decode`` accepts them. Use `encode_moments` for the raw
    posterior (mean, logvar).
    """

    config_class = FluxVAEConfig

    def __init__(self, config: FluxVAEConfig | None = None):
        super().__init__()
        self.config = config or FluxVAEConfig()
        self.patch_size = self.config.patch_size
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encoding_identity(self) -> tuple[str, dict[str, torch.Tensor]]:
        """The config without the decoder's own width (`DECODER_FIELDS`) and the encoder's
        weights: a replaced or widened decoder keeps the identity (see `ImageTokenizer`)."""
        fields = {k: v for k, v in self.config.to_dict().items() if k not in DECODER_FIELDS}
        description = type(self).__name__ + json.dumps(fields, sort_keys=True)
        return description, {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> posterior mean and log-variance, each (B, C, H/f, W/f)."""
        self.check_images(images)
        check_input_dtype(images, self.encoder.conv_in.weight.dtype, "images", "the encoder's")
        moments = self.encoder(images)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @property
    def samples_latents(self) -> bool:
        return not self.config.deterministic

    def encode(self, images: torch.Tensor,
               generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f).

        With ``deterministic`` off, the posterior is sampled as NextStep-1's VAE samples
        it: with ``layer_norm`` the mean is standardised first and the sample keeps the
        posterior's own spread around it; the scale and shift apply to the sample.
        ``generator`` draws the sample: one for the batch, or one per image (B).
        """
        config = self.config
        mean, logvar = self.encode_moments(images)
        method = config.normalization
        if method == "layer_norm":
            mean = standardize_channels(mean, config.normalization_patch_size)
            method = "scale_shift"  # what is left to apply after the standardisation
        latents = mean
        if not config.deterministic:
            if generator is None or isinstance(generator, torch.Generator):
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            else:
                generators = list(generator)
                if len(generators) != mean.shape[0]:
                    raise ValueError(f"generator must be one generator or one per image ({mean.shape[0]}), "
                                     f"found {len(generators)}")
                noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=each, device=mean.device,
                                               dtype=mean.dtype) for each in generators])
            latents = mean + torch.exp(0.5 * logvar) * noise
        return normalize_latents(latents, method, scale=config.scaling_factor, shift=config.shift_factor)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """`ImageTokenizer.grid_size`; with ``layer_norm`` standardisation over blocks of
        ``normalization_patch_size`` latents that the token patch does not tile, the sides must also give
        whole blocks (multiples of ``downsample`` x their least common multiple)."""
        grid = super().grid_size(height, width)
        config = self.config
        block = math.lcm(config.patch_size, config.normalization_patch_size)
        if config.normalization == "layer_norm" and block != config.patch_size:
            step = self.downsample * block
            for name, value in (("height", height), ("width", width)):
                if int(value) % step:
                    raise ValueError(f"image {name} must be a positive multiple of {step} (VAE factor "
                                     f"{self.downsample} x {block}, the least common multiple of the token patch "
                                     f"{config.patch_size} and the standardisation block "
                                     f"{config.normalization_patch_size}), found {value}")
        return grid

    def encode_seeded(self, images: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
        """`ImageTokenizer.encode_seeded`, with one seed per image drawn in one batch (a generator seeded
        by each image's seed, on the images' device)."""
        if not self.samples_latents or isinstance(seed, int):
            return super().encode_seeded(images, seed)
        seeds = list(seed)
        if len(seeds) != images.shape[0]:
            raise ValueError(f"seed must be one int or one per image ({images.shape[0]}), found {len(seeds)}")
        return self.encode(images, [torch.Generator(images.device).manual_seed(int(each)) for each in seeds])

    def forward(self, images: torch.Tensor, noise_gamma: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct images (B, 3, H, W): ``decode(perturb(encode(images), noise_gamma))``.

        With ``noise_gamma > 0`` the latents get NextStep-1's training noise
        (`perturb_latents`) at the scale of the standardised latents, before
        ``scaling_factor`` and ``shift_factor`` (as the release's VAE adds it to its
        posterior sample): the normalised latents get it times ``|scaling_factor|`` (unscaled with
        ``normalization="none"``, which applies no scale).
        0 gives the plain reconstruction. ``generator`` is the source of every draw
        (a sampled posterior's too).
        """
        scaled = self.config.normalization in ("layer_norm", "scale_shift")  # "none" leaves the latents unscaled
        scale = abs(self.config.scaling_factor) if scaled else 1.0
        latents = perturb_latents(self.encode(images, generator), noise_gamma * scale, generator)
        return self.decode(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f).

        Raises:
            ValueError: latents of another shape, not floating point, or (outside autocast) in
                another dtype than the decoder's weights.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels or not latents.shape[2] \
                or not latents.shape[3]:
            raise ValueError(
                f"latents must have shape (B, {self.latent_channels}, h, w) with h, w >= 1, "
                f"found {tuple(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, found {latents.dtype}")
        check_input_dtype(latents, self.decoder.conv_in.weight.dtype, "latents", "the decoder's")
        latents = denormalize_latents(
            latents, self.config.normalization,
            scale=self.config.scaling_factor, shift=self.config.shift_factor,
        )
        return self.decoder(latents)
