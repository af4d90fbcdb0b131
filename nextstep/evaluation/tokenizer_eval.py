"""Reconstruction quality of an image tokenizer, next to trivial baselines.

Reports PSNR and SSIM of ``decode(encode(x))`` on held-out photo crops, the same
metrics for bicubic down/up-sampling and JPEG, the decoder's robustness to latent
perturbation (the PSNR lost when Gaussian noise of a given sigma is added to the
latents) and statistics of how dispersed the latents are.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from nextstep.evaluation.image_metrics import mean_psnr, ssim
from nextstep.images import from_pil, to_pil
from nextstep.tokenizers.base import ImageTokenizer


@dataclass
class ReconstructionReport:
    """Numbers of one tokenizer evaluation (means over images)."""

    num_images: int
    image_size: int
    psnr: float
    ssim: float
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    robustness: dict[str, float] = field(default_factory=dict)
    dispersion: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = ["| method | PSNR (dB) | SSIM |", "|---|---|---|",
                 f"| tokenizer | {self.psnr:.2f} | {self.ssim:.4f} |"]
        for name, values in self.baselines.items():
            lines.append(f"| {name} | {values['psnr']:.2f} | {values['ssim']:.4f} |")
        lines += ["", "| latent noise sigma | PSNR (dB) | drop (dB) |", "|---|---|---|"]
        for sigma, value in self.robustness.items():
            lines.append(f"| {sigma} | {value:.2f} | {self.psnr - value:.2f} |")
        lines += ["", "| latent statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in self.dispersion.items()]
        return "\n".join(lines)


@torch.no_grad()
def reconstruct(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 16,
                latent_noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions, latents) of images (B, 3, H, W), optionally with noise added to latents, on the
    images' device in float32. The tokenizer runs on its own device and in its own dtype; a tokenizer
    that samples its latents encodes image ``i`` from seed ``seed + i``, and the noise is drawn image by
    image, so that no image's result depends on ``batch_size``."""
    generator = torch.Generator().manual_seed(seed)
    parameter = next(tokenizer.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else images.dtype
    outputs, latents = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device, dtype)
        if tokenizer.samples_latents:
            z = torch.cat([tokenizer.encode_seeded(batch[j:j + 1], seed + start + j) for j in range(len(batch))])
        else:
            z = tokenizer.encode(batch)
        if latent_noise:
            noise = torch.stack([torch.randn(z.shape[1:], generator=generator) for _ in range(len(z))])
            z = z + latent_noise * noise.to(z)
        latents.append(z.float().to(images.device))
        outputs.append(tokenizer.decode(z).float().clamp(-1, 1).to(images.device))
    return torch.cat(outputs), torch.cat(latents)


def bicubic_baseline(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample by ``factor`` and upsample back, bicubic."""
    small = F.interpolate(images, scale_factor=1 / factor, mode="bicubic", align_corners=False,
                          antialias=True)
    return F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def jpeg_baseline(images: torch.Tensor, quality: int) -> tuple[torch.Tensor, float]:
    """JPEG round trip of images (B, 3, H, W) at ``quality``, on the images' device and in their dtype; also
    returns the mean coded bits per pixel (`jpeg_coded_bytes`: the scans, not the file's headers and tables,
    which at 64x64 alone weigh about 1.35 bits per pixel)."""
    decoded, bits = [], 0
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        bits += 8 * jpeg_coded_bytes(buffer.getvalue())
        buffer.seek(0)
        decoded.append(Image.open(buffer).convert("RGB"))
    pixels = images.shape[0] * images.shape[-1] * images.shape[-2]
    return from_pil(decoded).to(images.device, images.dtype), bits / pixels


def jpeg_coded_bytes(data: bytes) -> int:
    """Bytes of a JPEG file's entropy-coded scan data: the file without its markers, headers and tables.

    Raises:
        ValueError: ``data`` is not a JPEG file.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError(f"expected a JPEG file (starting with FF D8), found {data[:2].hex(' ') or 'nothing'}")
    position, coded = 2, 0
    while position + 1 < len(data):
        if data[position] != 0xFF:
            raise ValueError(f"expected a JPEG marker at byte {position}, found {data[position]:02x}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:  # end of image
            break
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xDA:  # start of scan: its coded data runs to the next marker but restarts and stuffed FFs
            start = position
            while (position := data.index(b"\xff", position)) + 1 < len(data) and \
                    (data[position + 1] == 0x00 or 0xD0 <= data[position + 1] <= 0xD7):
                position += 2
            coded += position - start
    return coded


def mean_pairwise_distance(vectors: torch.Tensor) -> float:
    """Mean Euclidean distance between two different rows of ``vectors`` (N, D): the sum over ordered
    pairs ``i != j`` divided by ``N * (N - 1)`` (a row's zero distance to itself is left out).

    Raises:
        ValueError: fewer than 2 rows, or not (N, D).
    """
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"vectors must be (N, D) with N >= 2, found shape {tuple(vectors.shape)}")
    count = vectors.shape[0]
    return float(torch.cdist(vectors, vectors).sum() / (count * (count - 1)))


#: Latent positions `latent_dispersion` measures pairwise distances between (the first ones).
PAIRWISE_POSITIONS = 2048


def latent_dispersion(latents: torch.Tensor) -> dict[str, float]:
    """How spread out latents (B, C, h, w) are: per-channel moments, the effective rank of the channel
    covariance and the `mean_pairwise_distance` of the first `PAIRWISE_POSITIONS` latent vectors (C,)."""
    channels = latents.transpose(0, 1).flatten(1).double()  # (C, B*h*w)
    if channels.shape[1] < 2:
        raise ValueError(f"dispersion statistics need at least 2 latent positions (images x latent height x width), "
                         f"found {channels.shape[1]}: use more or larger images")
    covariance = torch.atleast_2d(torch.cov(channels))  # (C, C), C = 1 too
    eigenvalues = torch.linalg.eigvalsh(covariance).clamp(min=0)
    p = eigenvalues / eigenvalues.sum()
    effective_rank = float(torch.exp(-(p * torch.log(p + 1e-12)).sum()))
    return {
        "mean_abs_channel_mean": float(channels.mean(1).abs().mean()),
        "mean_channel_std": float(channels.std(1).mean()),
        "effective_rank": effective_rank,
        "channels": float(channels.shape[0]),
        "mean_pairwise_distance": mean_pairwise_distance(channels.T[:PAIRWISE_POSITIONS].float()),
    }


def evaluate_tokenizer(tokenizer: ImageTokenizer, images: torch.Tensor,
                       sigmas: tuple[float, ...] = (0.1, 0.2, 0.5)) -> ReconstructionReport:
    """Evaluate reconstruction, baselines, robustness and dispersion on images (B, 3, H, W) in [-1, 1].

    Raises:
        ValueError: images of another shape, or none (B = 0).
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"images must be (B, 3, H, W) with B >= 1, found shape {tuple(images.shape)}")
    reconstructions, latents = reconstruct(tokenizer, images)
    report = ReconstructionReport(
        num_images=images.shape[0], image_size=images.shape[-1],
        psnr=mean_psnr(reconstructions, images), ssim=float(ssim(reconstructions, images).mean()),
    )
    for factor in (2, 4):
        baseline = bicubic_baseline(images, factor)
        report.baselines[f"bicubic x{factor}"] = {
            "psnr": mean_psnr(baseline, images), "ssim": float(ssim(baseline, images).mean())}
    for quality in (25, 75):
        baseline, bpp = jpeg_baseline(images, quality)
        report.baselines[f"JPEG q{quality} ({bpp:.2f} coded bpp)"] = {
            "psnr": mean_psnr(baseline, images), "ssim": float(ssim(baseline, images).mean())}
    for sigma in sigmas:
        noisy, _ = reconstruct(tokenizer, images, latent_noise=sigma)
        report.robustness[str(sigma)] = mean_psnr(noisy, images)
    report.dispersion = latent_dispersion(latents)
    return report


