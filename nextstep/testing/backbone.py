"""The contract of `nextstep.backbones.base.Backbone`."""

from __future__ import annotations

import torch

from nextstep.backbones.base import Backbone, positions_from_mask
from nextstep.testing.assertions import assert_close, assert_finite, refuses
from nextstep.testing.parameters import (
    assert_every_parameter_gets_a_gradient,
    default_tolerance,
    randomize,
    restored,
    unchanged_random_state,
)


def check_backbone(backbone: Backbone, *, seed: int = 0, atol: float | None = None) -> None:
    """Check a backbone's contract; raise ``AssertionError`` naming the property that fails.

    - `embed`: (B, L) ids -> (B, L, H); `forward`: (B, L, H) finite hidden states;
    - a prefill and one-token decode steps through `new_cache` (called as
      generation calls it, with ``device=`` and ``dtype=``) equal the full
      forward, as does a prefill followed by a step of two tokens (causal within
      the step), and a step past the cache's capacity raises ``ValueError``;
    - a left-padded row equals the same row alone (positions from the mask), also
      read into a cache and followed by decode steps, as generation reads prompts;
      cropping the cache back to the prompt and decoding again gives the same steps,
      and a cache of selected rows (`BackboneCache.select_rows`) decodes as those
      rows did;
    - packed documents (int64 ids in the mask) each equal the document alone,
      or the backbone refuses them with ``ValueError``;
    - gradients reach every trainable parameter (zero-initialised ones are
      redrawn for that, and put back after).

    Args:
        atol: tolerance of the comparisons (also relative); default 1e-5 for float32
            parameters, 2e-2 for half-precision ones.

    The weights, gradients, training mode and global random state are left as they were.
    """
    with unchanged_random_state():
        _check_backbone(backbone, seed, atol)


def _check_backbone(backbone: Backbone, seed: int, atol: float | None) -> None:
    name = type(backbone).__name__
    parameter = next(backbone.parameters())
    device, dtype = parameter.device, parameter.dtype
    atol = default_tolerance(dtype) if atol is None else atol
    generator = torch.Generator().manual_seed(seed)
    hidden_size = backbone.hidden_size

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def positions(length, batch=1):
        return torch.arange(length, device=device).expand(batch, length)

    with restored(backbone), torch.no_grad():
        backbone.eval()
        randomize(backbone, generator=generator)
        ids = torch.randint(0, backbone.vocab_size, (2, 7), generator=generator).to(device)
        embeds = backbone.embed(ids)
        assert embeds.shape == (2, 7, hidden_size), f"{name}: embed must give (B, L, H) = {(2, 7, hidden_size)}, " \
                                                    f"found {tuple(embeds.shape)}"
        full = backbone(embeds, positions(7, 2))
        assert full.shape == (2, 7, hidden_size), (
            f"{name}: forward must give (B, L, H) = {(2, 7, hidden_size)}, found {tuple(full.shape)}")
        assert_finite(full, f"{name}: forward")

        try:
            cache = backbone.new_cache(2, 7, device=device, dtype=dtype)
        except TypeError as error:
            raise AssertionError(f"{name}: new_cache must take device= and dtype= as generation passes them, raised "
                                 f"TypeError: {error}") from error
        steps = [backbone(embeds[:, :3], positions(3, 2), cache=cache)]
        for index in range(3, 7):
            steps.append(backbone(embeds[:, index:index + 1], positions(7, 2)[:, index:index + 1], cache=cache))
        assert_close(torch.cat(steps, 1), full, atol, f"{name}: a prefill and cached decode steps differ from the full "
                                                 "forward")
        refuses(lambda: backbone(embeds[:, :1], positions(1, 2), cache=cache), "a step past the cache's capacity",
                name)
        cache = backbone.new_cache(2, 7, device=device, dtype=dtype)
        chunks = [backbone(embeds[:, :3], positions(3, 2), cache=cache),
                  backbone(embeds[:, 3:5], positions(7, 2)[:, 3:5], cache=cache)]
        assert_close(torch.cat(chunks, 1), full[:, :5], atol, f"{name}: a step of two tokens after a prefill differs "
                                                              "from the full forward (is it causal within the step?)")

        long, short = draw(1, 6, hidden_size), draw(1, 3, hidden_size)
        padded = torch.cat([long, torch.cat([torch.zeros_like(short), short], 1)])
        mask = torch.tensor([[True] * 6, [False] * 3 + [True] * 3], device=device)
        batch = backbone(padded, positions_from_mask(mask), mask)
        assert_close(batch[0], backbone(long, positions(6))[0], atol, f"{name}: a row differs beside a left-padded row")
        assert_close(batch[1, 3:], backbone(short, positions(3))[0], atol,
               f"{name}: a left-padded row differs from the same row alone")
        _check_padded_decoding(backbone, name, long, short, padded, mask, draw(2, 2, hidden_size), atol)

        first, second = draw(1, 4, hidden_size), draw(1, 3, hidden_size)
        packed = torch.cat([first, second, torch.zeros(1, 2, hidden_size, device=device, dtype=dtype)], 1)
        documents = torch.tensor([[1] * 4 + [2] * 3 + [0] * 2], device=device)
        try:
            together = backbone(packed, positions_from_mask(documents), documents)
        except ValueError:
            together = None  # packing refused by name, as a backbone that cannot attend within documents should
        except Exception as error:
            raise AssertionError(f"{name}: packed documents must each equal the document alone or be refused with "
                                 f"ValueError, found {type(error).__name__}: {error}") from error
        if together is not None:
            assert_close(together[:, :4], backbone(first, positions(4)), atol,
                   f"{name}: the first of two packed documents differs from it alone")
            assert_close(together[:, 4:7], backbone(second, positions(3)), atol,
                   f"{name}: the second of two packed documents differs from it alone")

    with restored(backbone):
        backbone.train()
        randomize(backbone, generator=generator)
        backbone.zero_grad(set_to_none=True)
        backbone(backbone.embed(ids), positions(7, 2)).square().mean().backward()
        assert_every_parameter_gets_a_gradient(backbone)


def _check_padded_decoding(backbone, name, long, short, padded, mask, steps, atol) -> None:
    """A left-padded prefill into a cache, then two decode steps: each row as it is alone; the cache
    cropped back to the prompt decodes the same steps again; a cache of one row decodes as that row."""
    device = padded.device
    everything = [backbone(torch.cat([row, steps[i:i + 1]], 1),
                           torch.arange(row.shape[1] + 2, device=device)[None])[0]
                  for i, row in enumerate((long, short))]
    prompt = padded.shape[1]
    cache = backbone.new_cache(2, prompt + 2)
    positions = positions_from_mask(mask)
    prefilled = backbone(padded, positions, mask, cache)
    real = torch.ones(2, 1, dtype=torch.bool, device=device)

    def decode(on, rows=slice(None)):
        nexts = positions[rows, -1:] + 1
        return torch.cat([backbone(steps[rows, k:k + 1], nexts + k, real[rows], on) for k in range(2)], 1)

    decoded = decode(cache)
    for i, length in enumerate((long.shape[1], short.shape[1])):
        assert_close(prefilled[i, prompt - length:], everything[i][:length], atol,
                     f"{name}: a row read into a cache beside a left-padded row differs from the row alone")
        assert_close(decoded[i], everything[i][length:], atol,
                     f"{name}: decode steps after a left-padded prefill differ from the row alone")
    cache.crop(prompt)
    try:
        again = decode(cache)
    except ValueError as error:
        raise AssertionError(f"{name}: decode steps after crop(prompt length) raised ValueError: {error}") from error
    assert_close(again, decoded, atol, f"{name}: decode steps after crop(prompt length) differ from the first ones")
    cache.crop(prompt)
    row = torch.tensor([1], device=device)
    assert_close(decode(cache.select_rows(row), row), decoded[1:], atol,
                 f"{name}: a cache of selected rows (select_rows) decodes otherwise than those rows did")
