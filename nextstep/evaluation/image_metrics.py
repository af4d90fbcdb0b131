"""Full-reference image metrics on (B, 3, H, W) tensors in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2).

    Args:
        reconstruction: (B, 3, H, W).
        reference: (B, 3, H, W).

    Returns:
        (B,) float32; identical images give +inf.
    """
    _check_pair(reconstruction, reference)
    error = (reconstruction.float().clamp(-1, 1) - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / error)


#: The PSNR an identical image counts as in a mean (`mean_psnr`): above any 8-bit image that differs at all
#: (one level in one value of a 64x64 image is 89 dB).
PSNR_CEILING = 100.0


def mean_psnr(reconstruction: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean over images of `psnr`, each capped at `PSNR_CEILING` dB, so that one image reproduced exactly
    does not make the mean infinite."""
    return float(psnr(reconstruction, reference).clamp(max=PSNR_CEILING).mean())


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :])[None, None]  # (1, 1, size, size)


def ssim(reconstruction: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Gaussian 11x11 window, sigma 1.5, on [0, 1] values).

    Computed per channel and averaged; images smaller than the window use a
    window the size of the image.

    Returns:
        (B,) float32 in [-1, 1]; 1 for identical images.
    """
    _check_pair(reconstruction, reference)
    x = (reconstruction.float().clamp(-1, 1) + 1) / 2
    y = (reference.float() + 1) / 2
    size = min(window, x.shape[-1], x.shape[-2])
    kernel = _gaussian_window(size, sigma, x.device).expand(x.shape[1], 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel, groups=x.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two image batches of one shape (B, C, H, W), found {tuple(a.shape)} and {tuple(b.shape)}"
        )
