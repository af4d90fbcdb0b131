"""Ways to normalise VAE latents before the transformer sees them.

* ``layer_norm``: NextStep-1's choice. Over each ``psz x psz`` block of positions
  (``psz=1``: each position) the channel vector is standardised to mean 0 and
  variance 1 (LayerNorm without affine, eps 1e-6), then ``(z - shift) * scale``
  as NextStep-1's pipeline applies it (scale 1 and shift 0 in the release). The
  standardisation is not invertible: the decoder is trained to decode
  standardised latents, so ``denormalize`` undoes only the scale and shift.
* ``scale_shift``: ``(z - shift) * scale`` (FLUX.1 uses 0.3611 / 0.1159), inverted exactly.
* ``none``: latents pass unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

NORMALIZATIONS = ("layer_norm", "scale_shift", "none")


def standardize_channels(latents: torch.Tensor, patch_size: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Standardise channel vectors per ``patch_size`` block.

    Args:
        latents: (B, C, H, W) with H, W multiples of ``patch_size``.

    Returns:
        (B, C, H, W); each block's ``C * patch_size**2`` values have mean 0, variance ~1.
    """
    p = patch_size
    height, width = latents.shape[-2:]
    if height % p or width % p:
        raise ValueError(
            f"latent size must be a multiple of the normalisation patch {p}, found {height}x{width}"
        )
    blocks = rearrange(latents, "b c (h p) (w q) -> b h w (c p q)", p=p, q=p)
    blocks = F.layer_norm(blocks.float(), blocks.shape[-1:], eps=eps).to(latents.dtype)
    return rearrange(blocks, "b h w (c p q) -> b c (h p) (w q)", p=p, q=p)


def normalize_latents(
    latents: torch.Tensor, method: str, *, patch_size: int = 1, scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    """Apply one of `NORMALIZATIONS` to latents (B, C, H, W)."""
    if method == "layer_norm":
        return (standardize_channels(latents, patch_size) - shift) * scale
    if method == "scale_shift":
        return (latents - shift) * scale
    if method == "none":
        return latents
    raise ValueError(f"unknown latent normalisation {method!r}; known: {list(NORMALIZATIONS)}")


def denormalize_latents(
    latents: torch.Tensor, method: str, *, scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    """Undo `normalize_latents` where it can be undone: the scale and shift (the standardisation of
    ``layer_norm`` stays)."""
    if method in ("scale_shift", "layer_norm"):
        return latents / scale + shift
    if method == "none":
        return latents
    raise ValueError(f"unknown latent normalisation {method!r}; known: {list(NORMALIZATIONS)}")


def perturb_latents(
    latents: torch.Tensor, gamma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise regularisation for tokenizer training: ``z + a * eps``.

    ``a ~ U(0, gamma)`` is drawn once per sample, ``eps ~ N(0, I)`` per element.

    Args:
        latents: (B, C, H, W).
        gamma: the largest noise scale (0.2 in NextStep-1); 0 returns ``latents``.
    """
    if not gamma >= 0:  # NaN too
        raise ValueError(f"gamma must be a number >= 0, found {gamma}")
    if gamma == 0:
        return latents
    batch = latents.shape[0]
    strength = torch.rand(batch, 1, 1, 1, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + gamma * strength * noise
