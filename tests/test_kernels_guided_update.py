"""The fused guidance combine + solver update kernel against its eager reference (interpreter on CPU, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, kernel_device, random_tensor  # noqa: E402,F401

from nextstep.kernels import guided_update, guided_update_reference, guided_update_triton  # noqa: E402
from nextstep.samplers import ClassifierFreeGuidance, ImageEditingGuidance  # noqa: E402


@given(branches=st.integers(1, 3), rows=st.integers(1, 4), dim=st.integers(1, 200),
       prediction_dtype=DTYPES, state_dtype=DTYPES, seed=st.integers(0, 2**16),
       with_extra=st.booleans(), keep_velocity=st.booleans(), in_place=st.booleans())
def test_kernel_matches_reference(kernel_device, branches, rows, dim, prediction_dtype, state_dtype,  # noqa: F811
                                  seed, with_extra, keep_velocity, in_place):
    predictions = random_tensor((branches * rows, dim), prediction_dtype, seed, device=kernel_device)
    state = random_tensor((rows, dim), state_dtype, seed + 1, device=kernel_device)
    weights = random_tensor((branches,), torch.float32, seed + 2, scale=3.0, device=kernel_device)
    coefficients = random_tensor((3,), torch.float32, seed + 3, device=kernel_device)
    extra = random_tensor((rows, dim), state_dtype, seed + 4, device=kernel_device) if with_extra else None
    expected_velocity = torch.zeros(rows, dim, device=kernel_device) if keep_velocity else None
    expected = guided_update_reference(predictions, state, weights, coefficients, extra,
                                       velocity_out=expected_velocity)
    velocity = torch.zeros(rows, dim, device=kernel_device) if keep_velocity else None
    target = state.clone() if in_place else None
    found = guided_update_triton(predictions, state if target is None else target, weights, coefficients, extra,
                                 out=target, velocity_out=velocity)
    if in_place:
        assert found is target
    dtype = torch.bfloat16 if torch.bfloat16 in (prediction_dtype, state_dtype) else torch.float32
    torch.testing.assert_close(found.float(), expected.float(), **TOLERANCES[dtype])
    if keep_velocity:
        torch.testing.assert_close(velocity, expected_velocity, **TOLERANCES[dtype])


@given(branches=st.integers(1, 3), rows=st.integers(1, 4), dim=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_a_kept_velocity_is_read_as_extra_before_it_is_replaced(kernel_device, branches, rows, dim,  # noqa: F811
                                                                seed):
    """An Adams-Bashforth stage adds the kept velocity and keeps its own in the same buffer."""
    predictions = random_tensor((branches * rows, dim), torch.float32, seed, device=kernel_device)
    state = random_tensor((rows, dim), torch.float32, seed + 1, device=kernel_device)
    weights = random_tensor((branches,), torch.float32, seed + 2, scale=3.0, device=kernel_device)
    coefficients = random_tensor((3,), torch.float32, seed + 3, device=kernel_device)
    kept = random_tensor((rows, dim), torch.float32, seed + 4, device=kernel_device)
    expected_velocity = torch.empty_like(kept)
    expected = guided_update_reference(predictions, state, weights, coefficients, kept.clone(),
                                       velocity_out=expected_velocity)
    for update in (guided_update_triton, guided_update_reference):
        shared = kept.clone()
        found = update(predictions, state, weights, coefficients, shared, velocity_out=shared)
        torch.testing.assert_close(found, expected, **TOLERANCES[torch.float32])
        torch.testing.assert_close(shared, expected_velocity, **TOLERANCES[torch.float32])


@given(scale=st.floats(0, 10), rows=st.integers(1, 3), dim=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_cfg_weights_reproduce_classifier_free_guidance(scale, rows, dim, seed):
    """Weights (s, 1 - s) and an Euler step give x + dt * CFG(v_c, v_u)."""
    predictions = random_tensor((2 * rows, dim), torch.float32, seed)
    state = random_tensor((rows, dim), torch.float32, seed + 1)
    dt = 0.05
    guided = ClassifierFreeGuidance(scale).combine(predictions.view(2, rows, dim))
    found = guided_update(predictions, state, torch.tensor([scale, 1 - scale]), torch.tensor([1.0, dt, 0.0]))
    torch.testing.assert_close(found, state + dt * guided, rtol=1e-5, atol=1e-5 * (1 + scale))


@given(scale=st.floats(0, 10), image_scale=st.floats(0, 5), seed=st.integers(0, 2**16))
def test_editing_weights_reproduce_three_way_guidance(scale, image_scale, seed):
    predictions = random_tensor((3 * 2, 8), torch.float32, seed)
    state = torch.zeros(2, 8)
    guided = ImageEditingGuidance(scale, image_scale).combine(predictions.view(3, 2, 8))
    weights = torch.tensor([scale, image_scale - scale, 1 - image_scale])
    found = guided_update(predictions, state, weights, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(found, guided, rtol=1e-5, atol=1e-5 * (1 + scale + image_scale))


def test_euler_maruyama_coefficients_reproduce_the_release_step():
    """(1 - dt, (1 + t) dt, sqrt(2 (1 - t) dt)) is the release's drift + score + noise step."""
    rows, dim, t, dt = 3, 16, 0.3, 0.07
    x, v, eps = (random_tensor((rows, dim), torch.float32, seed) for seed in range(3))
    score = (t * v - x) / (1 - t)
    expected = x + (v + (1 - t) * score) * dt + (2 * (1 - t)) ** 0.5 * (eps * dt ** 0.5)
    coefficients = torch.tensor([1 - dt, (1 + t) * dt, (2 * (1 - t) * dt) ** 0.5])
    found = guided_update(v, x, torch.ones(1), coefficients, eps)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_bad_shapes_name_what_was_expected():
    state = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"predictions must have shape \(G \* R, D\) = \(4, 4\)"):
        guided_update(torch.zeros(3, 4), state, torch.ones(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"coefficients must have shape \(3,\)"):
        guided_update(torch.zeros(2, 4), state, torch.ones(1), torch.zeros(2))
    with pytest.raises(ValueError, match=r"extra must have the shape of state \(2, 4\)"):
        guided_update(torch.zeros(2, 4), state, torch.ones(1), torch.zeros(3), torch.zeros(1, 4))


@given(branches=st.integers(1, 2), dim=st.integers(1025, 2100), seed=st.integers(0, 2**16))
def test_rows_wider_than_one_block_are_updated_to_their_end(kernel_device, branches, dim, seed):  # noqa: F811
    rows = 2
    predictions = random_tensor((branches * rows, dim), torch.float32, seed, device=kernel_device)
    state = random_tensor((rows, dim), torch.float32, seed + 1, device=kernel_device)
    weights = random_tensor((branches,), torch.float32, seed + 2, device=kernel_device)
    coefficients = random_tensor((3,), torch.float32, seed + 3, device=kernel_device)
    extra = random_tensor((rows, dim), torch.float32, seed + 4, device=kernel_device)
    expected_velocity, velocity = torch.zeros(rows, dim, device=kernel_device), torch.zeros(rows, dim,
                                                                                           device=kernel_device)
    expected = guided_update_reference(predictions, state, weights, coefficients, extra,
                                       velocity_out=expected_velocity)
    found = guided_update_triton(predictions, state, weights, coefficients, extra, velocity_out=velocity)
    torch.testing.assert_close(found, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(velocity, expected_velocity, **TOLERANCES[torch.float32])


def test_strided_tensors_are_updated_by_the_reference(kernel_device):  # noqa: F811
    """The kernel takes contiguous tensors only; the dispatching function hands strided ones to the reference."""
    predictions = random_tensor((8, 4), torch.float32, 0, device=kernel_device).t()  # (G * R, D) = (4, 8), strided
    state = random_tensor((2, 8), torch.float32, 1, device=kernel_device)
    weights = torch.tensor([3.0, -2.0], device=kernel_device)
    coefficients = torch.tensor([1.0, 0.1, 0.0], device=kernel_device)
    expected = guided_update_reference(predictions.contiguous(), state, weights, coefficients)
    torch.testing.assert_close(guided_update(predictions, state, weights, coefficients), expected)
    with pytest.raises(ValueError, match="predictions must be contiguous for the Triton kernel"):
        guided_update_triton(predictions, state, weights, coefficients)
