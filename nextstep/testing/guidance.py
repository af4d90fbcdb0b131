"""The contract of `nextstep.samplers.guidance.Guidance`."""

from __future__ import annotations

import torch

from nextstep.samplers.guidance import Guidance
from nextstep.testing.assertions import assert_close, assert_finite
from nextstep.testing.parameters import unchanged_random_state


def check_guidance(guidance: Guidance, *, rows: int = 5, dim: int = 8, seed: int = 0, atol: float = 1e-5) -> None:
    """Check a guidance's contract; raise ``AssertionError`` naming the property that fails.

    - ``num_branches`` is an integer >= 1;
    - `combine` takes predictions (G, N, D) with times (N,) or ``t=None`` and a
      progress in [0, 1], and gives a finite (N, D) in their dtype, the same for
      the same inputs, without changing the predictions;
    - each row's result is its own (the same when combined alone);
    - where every branch predicts the same velocity, that velocity comes back
      (so the conditional prediction, whatever the scale, when the branches agree).

    Args:
        guidance: the guidance.
        rows: N, the tokens of each check.
        dim: D, the token width.
        seed: seeds every draw.
        atol: tolerance of the comparisons (also relative).

    The global random state is left as it was.
    """
    with unchanged_random_state():
        _check_guidance(guidance, rows, dim, seed, atol)


def _check_guidance(guidance: Guidance, rows: int, dim: int, seed: int, atol: float) -> None:
    name = type(guidance).__name__
    branches = getattr(guidance, "num_branches", None)
    assert isinstance(branches, int) and not isinstance(branches, bool) and branches >= 1, (
        f"{name}: num_branches must be an integer >= 1, found {branches!r}")
    generator = torch.Generator().manual_seed(seed)
    predictions = torch.randn(branches, rows, dim, generator=generator)
    t = torch.rand(rows, generator=generator)
    kept = predictions.clone()
    for times, progress in ((t, 0.0), (None, 0.0), (t, 0.5), (t, 1.0)):
        out = guidance.combine(predictions, times, progress)
        assert isinstance(out, torch.Tensor) and out.shape == (rows, dim), (
            f"{name}: combine must give (N, D) = {(rows, dim)}, found "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} "
            f"(t={'None' if times is None else '(N,)'}, progress {progress})")
        assert out.dtype == predictions.dtype, f"{name}: combine must give the predictions' dtype " \
                                               f"{predictions.dtype}, found {out.dtype}"
        assert_finite(out, f"{name}: combine")
        assert torch.equal(predictions, kept), f"{name}: combine changed the predictions it was given"
        assert torch.equal(guidance.combine(predictions, times, progress), out), (
            f"{name}: combine gives different results for the same inputs")
        alone = torch.cat([guidance.combine(predictions[:, i:i + 1], None if times is None else times[i:i + 1],
                                            progress) for i in range(rows)])
        assert_close(alone, out, atol, f"{name}: rows of the guided velocity depend on the other rows "
                                       f"(progress {progress})")
        agreed = predictions[:1].expand(branches, rows, dim).clone()
        assert_close(guidance.combine(agreed, times, progress), agreed[0], atol,
                     f"{name}: where every branch predicts the same velocity, combine must return it "
                     f"(progress {progress})")
