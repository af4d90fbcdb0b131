"""The contract of `nextstep.heads.base.ImageHead`."""

from __future__ import annotations

import torch

from nextstep.heads.base import ImageHead
from nextstep.samplers.time_grid import time_grid
from nextstep.testing.assertions import assert_close, assert_finite, refuses
from nextstep.testing.parameters import (
    assert_every_parameter_gets_a_gradient,
    default_tolerance,
    randomize,
    restored,
    unchanged_random_state,
)


def check_image_head(head: ImageHead, *, rows: int = 5, seed: int = 0, atol: float | None = None) -> None:
    """Check an image head's contract; raise ``AssertionError`` naming the property that fails.

    - `velocity`: (N, D) from x_t (N, D), t (N,), condition (N, C), finite, each
      row the same as when computed alone, and changed by another state, by
      another condition and by another time;
    - `prepare`: equal to `velocity`, with and without evaluation times (prepared
      by `prepare_times` or not) and at times drawn from them;
    - `loss`: (N,) float32, finite, >= 0, repeated exactly by the same generator
      and changed by another seed (its draws come from the generator), each row's
      loss changed by its own condition and its own target only, and ``ValueError``
      for a target or condition of another width or a condition of another number
      of rows;
    - gradients reach every trainable parameter through `loss` (zero-initialised
      parameters are redrawn for that, and put back after), and the condition
      (the image loss trains the backbone through it).

    Args:
        head: the head, on the CPU or any device.
        rows: N, the tokens of each check.
        seed: seeds every draw.
        atol: tolerance of the comparisons (also relative); default 1e-5 for float32
            parameters, 2e-2 for half-precision ones.

    Not checked: that the loss trains the velocity sampling integrates (its target
    ``x1 - x0`` under the head's own draws). The weights, gradients, training mode
    and global random state are left as they were.
    """
    with unchanged_random_state():
        _check_image_head(head, rows, seed, atol)


def _check_image_head(head: ImageHead, rows: int, seed: int, atol: float) -> None:
    name = type(head).__name__
    parameter = next(head.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    atol = default_tolerance(dtype) if atol is None else atol
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    x, condition = draw(rows, head.token_dim), draw(rows, head.condition_dim)
    t = torch.rand(rows, generator=generator).to(device, dtype)
    with restored(head), torch.no_grad():
        head.eval()
        randomize(head, generator=generator)
        velocity = head.velocity(x, t, condition)
        assert velocity.shape == (rows, head.token_dim), (
            f"{name}: velocity must be (N, D) = {(rows, head.token_dim)}, found {tuple(velocity.shape)}")
        assert_finite(velocity, f"{name}: velocity")
        alone = torch.cat([head.velocity(x[i:i + 1], t[i:i + 1], condition[i:i + 1]) for i in range(rows)])
        assert_close(alone, velocity, atol, f"{name}: rows of velocity depend on the other rows of the batch")
        assert not torch.equal(head.velocity(x + 1, t, condition), velocity), (
            f"{name}: velocity does not change with the state x_t")
        assert not torch.equal(head.velocity(x, t, condition.flip(0)), velocity), (
            f"{name}: velocity does not change with the condition")
        assert not torch.equal(head.velocity(x, 1 - t, condition), velocity), (
            f"{name}: velocity does not change with the time")
        assert_close(head.prepare(condition)(x, t), velocity, atol, f"{name}: prepare(condition) differs from "
                      "velocity")
        times = time_grid(4, 2.0, device=device, dtype=dtype)[:-1]  # (E,) evaluation times of a shifted grid
        at = times[torch.randint(0, times.numel(), (rows,), generator=generator)]
        expected = head.velocity(x, at, condition)
        assert_close(head.prepare(condition, times)(x, at), expected, atol,
                      f"{name}: prepare(condition, times) differs from velocity at those times")
        assert_close(head.prepare(condition, head.prepare_times(times))(x, at), expected, atol,
                      f"{name}: prepare(condition, prepare_times(times)) differs from velocity at those times")
        loss = head.loss(x, condition, generator=torch.Generator(device=device).manual_seed(seed))
        again = head.loss(x, condition, generator=torch.Generator(device=device).manual_seed(seed))
        other = condition.clone()
        other[0] = draw(head.condition_dim)
        changed = head.loss(x, other, generator=torch.Generator(device=device).manual_seed(seed))
        reseeded = head.loss(x, condition, generator=torch.Generator(device=device).manual_seed(seed + 1))
        other_target = x.clone()
        other_target[0] = draw(head.token_dim)
        target_changed = head.loss(other_target, condition, generator=torch.Generator(device=device).manual_seed(seed))
    assert loss.shape == (rows,), f"{name}: loss must be (N,) = ({rows},), found {tuple(loss.shape)}"
    assert loss.dtype == torch.float32, f"{name}: loss must be float32, found {loss.dtype}"
    assert torch.isfinite(loss).all() and (loss >= 0).all(), f"{name}: loss must be finite and >= 0, found {loss}"
    assert torch.equal(loss, again), f"{name}: loss differs between two calls with the same generator seed"
    assert not torch.equal(reseeded, loss), (
        f"{name}: loss is the same under another generator seed: its draws (times, noise) must come from the "
        "generator it is given")
    assert not torch.equal(changed[0], loss[0]), f"{name}: the loss of row 0 does not change with its condition"
    assert_close(changed[1:], loss[1:], atol, f"{name}: another condition for row 0 changes the loss of other rows "
                                              "(the same draws)")
    assert not torch.equal(target_changed[0], loss[0]), f"{name}: the loss of row 0 does not change with its target"
    assert_close(target_changed[1:], loss[1:], atol, f"{name}: another target for row 0 changes the loss of other "
                                                     "rows (the same draws)")
    refuses(lambda: head.loss(draw(rows, head.token_dim + 1), condition), "loss of a target of width D + 1", name)
    refuses(lambda: head.loss(x, draw(rows, head.condition_dim + 1)), "loss of a condition of width C + 1", name)
    refuses(lambda: head.loss(x, draw(rows + 1, head.condition_dim)), "loss of a condition of N + 1 rows", name)
    with restored(head):
        head.train()
        randomize(head, generator=generator)
        head.zero_grad(set_to_none=True)
        tracked = condition.clone().requires_grad_(True)
        head.loss(x, tracked, generator=torch.Generator(device=device).manual_seed(seed)).mean().backward()
        assert_every_parameter_gets_a_gradient(head)
        assert tracked.grad is not None and bool(tracked.grad.abs().sum() > 0), (
            f"{name}: no gradient reaches the condition through loss (a detached condition would never train "
            "the backbone with the image loss)")
        assert_finite(tracked.grad, f"{name}: the gradient of the condition")

