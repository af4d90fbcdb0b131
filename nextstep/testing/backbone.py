"""The contract of `nextstep.backbones.base.Backbone`."""

from __future__ import annotations

import torch

from nextstep.backbones.base import Backbone, positions_from_mask
from nextstep.testing.assertions import assert_close, refuses
from nextstep.testing.parameters import assert_every_parameter_gets_a_gradient, randomize, restored


def check_backbone(backbone: Backbone, *, seed: int = 0, atol: float = 1e-5) -> None:
    """Check a backbone's contract; raise ``AssertionError`` naming the property that fails.

    - `embed`: (B, L) ids -> (B, L, H); `forward`: (B, L, H) finite hidden states;
    - a prefill and one-token decode steps through `new_cache` equal the full
      forward, and a step past the cache's capacity raises ``ValueError``;
    - a left-padded row equals the same row alone (positions from the mask);
    - packed documents (int64 ids in the mask) each equal the document alone,
      or the backbone refuses them with ``ValueError``;
    - gradients reach every trainable parameter (zero-initialised ones are
      redrawn for that, and put back after).
    """
    name = type(backbone).__name__
    parameter = next(backbone.parameters())
    device, dtype = parameter.device, parameter.dtype
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
        assert full.shape == (2, 7, hidden_size) and torch.isfinite(full).all(), (
            f"{name}: forward must give finite (B, L, H) = {(2, 7, hidden_size)}, found {tuple(full.shape)}")

        cache = backbone.new_cache(2, 7)
        steps = [backbone(embeds[:, :3], positions(3, 2), cache=cache)]
        for index in range(3, 7):
            steps.append(backbone(embeds[:, index:index + 1], positions(7, 2)[:, index:index + 1], cache=cache))
        assert_close(torch.cat(steps, 1), full, atol, f"{name}: a prefill and cached decode steps differ from the full "
                                                 "forward")
        refuses(lambda: backbone(embeds[:, :1], positions(1, 2), cache=cache), "a step past the cache's capacity",
                name)

        long, short = draw(1, 6, hidden_size), draw(1, 3, hidden_size)
        padded = torch.cat([long, torch.cat([torch.zeros_like(short), short], 1)])
        mask = torch.tensor([[True] * 6, [False] * 3 + [True] * 3], device=device)
        batch = backbone(padded, positions_from_mask(mask), mask)
        assert_close(batch[0], backbone(long, positions(6))[0], atol, f"{name}: a row differs beside a left-padded row")
        assert_close(batch[1, 3:], backbone(short, positions(3))[0], atol,
               f"{name}: a left-padded row differs from the same row alone")

        first, second = draw(1, 4, hidden_size), draw(1, 3, hidden_size)
        packed = torch.cat([first, second, torch.zeros(1, 2, hidden_size, device=device, dtype=dtype)], 1)
        documents = torch.tensor([[1] * 4 + [2] * 3 + [0] * 2], device=device)
        try:
            together = backbone(packed, positions_from_mask(documents), documents)
        except ValueError:
            together = None  # packing refused by name, as a backbone that cannot attend within documents should
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

