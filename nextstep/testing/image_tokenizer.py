"""The contract of `nextstep.tokenizers.base.ImageTokenizer`."""

from __future__ import annotations

import torch

from nextstep.testing.assertions import assert_close, assert_finite, refuses
from nextstep.testing.parameters import (
    assert_every_parameter_gets_a_gradient,
    randomize,
    restored,
    unchanged_random_state,
)
from nextstep.tokenizers.base import ImageTokenizer


def check_image_tokenizer(tokenizer: ImageTokenizer, *, seed: int = 0, atol: float = 1e-4) -> None:
    """Check an image tokenizer's contract; raise ``AssertionError`` naming the property that fails.

    - `encode`: (B, 3, H, W) in [-1, 1] -> finite (B, C, H/f, W/f) in the images'
      dtype; `decode` gives back finite images of the input's shape;
    - `patchify` gives (B, h*w, D) with D = C * patch_size**2 in the layout the
      format fixes (tokens in raster order, features ``(c, p, q)``, as
      `ImageTokenizer.patchify`) and `unpatchify` inverts it exactly;
    - each image's latents are the same as when encoded alone, and so is each
      decoded image; a tokenizer that `samples_latents` repeats its latents for
      the same seed, draws others for another, and keeps an image's latents when
      only another image of the batch changes (its draws for a batch need not be
      those of each image alone);
    - ``ValueError`` for sizes that are not multiples of f, values outside
      [-1, 1], images that are not (B, 3, H, W), and a `grid_size` that is not a
      multiple of `pixels_per_token`;
    - gradients reach every trainable parameter through ``decode(encode(x))``.

    Not checked: the scale of the latents and of decoded images (the head learns
    what the tokenizer gives; `docs/tutorials/tokenizer_properties.md` tests the
    normalised statistics). The weights, gradients, training mode and global
    random state are left as they were.
    """
    with unchanged_random_state():
        _check_image_tokenizer(tokenizer, seed, atol)


def _check_image_tokenizer(tokenizer: ImageTokenizer, seed: int, atol: float) -> None:
    name = type(tokenizer).__name__
    parameter = next(tokenizer.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    f, side = tokenizer.downsample, tokenizer.pixels_per_token
    rows, cols = max(side // f, 1) * 2, max(side // f, 1) * 3  # latent sizes that tokenize
    images = (torch.rand(2, 3, rows * f, cols * f, generator=generator) * 2 - 1).to(device)

    def encode(batch):
        return tokenizer.encode_seeded(batch, seed) if tokenizer.samples_latents else tokenizer.encode(batch)

    with restored(tokenizer), torch.no_grad():
        tokenizer.eval()
        latents = encode(images)
        expected = (2, tokenizer.latent_channels, rows, cols)
        assert latents.shape == expected, f"{name}: encode must give (B, C, H/f, W/f) = {expected}, found " \
                                          f"{tuple(latents.shape)}"
        assert latents.dtype == images.dtype, f"{name}: latents must be in the images' dtype {images.dtype}, " \
                                              f"found {latents.dtype}"
        assert_finite(latents, f"{name}: the latents of encode")
        decoded = tokenizer.decode(latents)
        assert decoded.shape == images.shape, (
            f"{name}: decode must give images of shape {tuple(images.shape)}, found {tuple(decoded.shape)}")
        assert_finite(decoded, f"{name}: the images of decode")
        alone = torch.cat([tokenizer.decode(latents[i:i + 1]) for i in range(2)])
        assert_close(alone, decoded, atol, f"{name}: a decoded image depends on the other latents of the batch")
        grid_h, grid_w = tokenizer.grid_size(rows * f, cols * f)
        tokens = tokenizer.patchify(latents)
        assert tokenizer.token_dim == tokenizer.latent_channels * tokenizer.patch_size**2, (
            f"{name}: token_dim must be latent_channels * patch_size**2")
        assert tokens.shape == (2, grid_h * grid_w, tokenizer.token_dim), (
            f"{name}: patchify must give (B, h*w, D) = {(2, grid_h * grid_w, tokenizer.token_dim)}, found "
            f"{tuple(tokens.shape)}")
        assert torch.equal(tokenizer.unpatchify(tokens, grid_h, grid_w), latents), (
            f"{name}: unpatchify(patchify(latents)) is not latents")
        numbered = torch.arange(latents.numel(), dtype=torch.float32).view(latents.shape).to(device)
        assert torch.equal(tokenizer.patchify(numbered), ImageTokenizer.patchify(tokenizer, numbered)), (
            f"{name}: patchify must lay tokens out in raster order with features (c, p, q), as "
            "ImageTokenizer.patchify does (released weights depend on it)")
        if tokenizer.samples_latents:
            assert_close(encode(images), latents, atol, f"{name}: encode_seeded gives other latents for the same "
                                                        "seed")
            assert not torch.equal(tokenizer.encode_seeded(images, seed + 1), latents), (
                f"{name}: samples its latents, but another seed gives the same ones")
            other = images.clone()
            other[1] = -other[1]
            assert_close(encode(other)[0], latents[0], atol, f"{name}: an image's latents change when only another "
                                                             "image of the batch changes (same seed)")
        else:
            alone = torch.cat([encode(images[i:i + 1]) for i in range(2)])
            assert_close(alone, latents, atol, f"{name}: an image's latents depend on the other images of the batch")
    small = torch.zeros(1, 3, f, f, device=device)
    if f > 1:
        refuses(lambda: tokenizer.encode(torch.zeros(1, 3, f + 1, f, device=device)),
                "encode of a height that is not a multiple of f", name)
    refuses(lambda: tokenizer.encode(small + 3.0), "encode of values outside [-1, 1]", name)
    refuses(lambda: tokenizer.encode(small[0]), "encode of images that are not (B, 3, H, W)", name)
    if side > 1:
        refuses(lambda: tokenizer.grid_size(side * 4 + side // 2, side * 4), "grid_size of a height that is not a "
                "multiple of pixels_per_token", name)
    if any(p.requires_grad for p in tokenizer.parameters()):
        with restored(tokenizer):
            tokenizer.train()
            randomize(tokenizer, generator=generator)
            tokenizer.zero_grad(set_to_none=True)
            tokenizer.decode(encode(images)).square().mean().backward()
            assert_every_parameter_gets_a_gradient(tokenizer)
