"""The one-launch head evaluation against the head's unfused velocity (interpreter on CPU with one program, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, interpreter, kernel_device  # noqa: E402,F401

from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity  # noqa: E402
from nextstep.heads.flow_matching import FlowMatchingHead, FlowMatchingHeadConfig  # noqa: E402
from nextstep.kernels.persistent_head import (  # noqa: E402
    BARRIER_POLLING,
    barriers_per_evaluation,
    features_per_program,
    grid_barriers_triton,
    persistent_head_triton,
    persistent_programs,
)

TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def random_head(width: int, blocks: int, seed: int, dtype, device, mlp_ratio: float = 1.0) -> FlowMatchingHead:
    torch.manual_seed(seed)
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=8, condition_dim=12, width=width, depth=blocks,
                                                   mlp_ratio=mlp_ratio))
    with torch.no_grad():  # unit-scale activations: products of fan-in-scaled weights
        for parameter in head.parameters():
            parameter.normal_(0.0, parameter.shape[1] ** -0.5 if parameter.ndim == 2 else 0.1)
    return head.to(device=device, dtype=dtype).eval()


def inputs(head, rows: int, seed: int, device):
    reference = FusedFlowMatchingVelocity(head, use_kernels=False)
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(rows, 8, generator=generator).to(device, reference.dtype)
    condition = torch.randn(rows, 12, generator=generator).to(device, reference.dtype)
    table = reference.modulations(reference.time_embedding(torch.tensor([0.4], device=device)),
                                  reference.condition_embedding(condition))
    return reference, x_t, table[0]


@settings(max_examples=10)
@given(rows=st.sampled_from([1, 2, 3, 5, 12]), width=st.sampled_from([16, 24, 40]), blocks=st.integers(1, 2),
       dtype=DTYPES, seed=st.integers(0, 2**10), min_features=st.sampled_from([4, 6, 16]),
       mlp_ratio=st.sampled_from([1.0, 1.5]))
def test_one_launch_matches_the_unfused_velocity(kernel_device, rows, width, blocks, dtype, seed,  # noqa: F811
                                                 min_features, mlp_ratio):
    head = random_head(width, blocks, seed, dtype, kernel_device, mlp_ratio)
    reference, x_t, modulation = inputs(head, rows, seed, kernel_device)
    expected = reference(x_t, modulation)
    persistent = FusedFlowMatchingVelocity(head, persistent=True)
    persistent(x_t, modulation)  # builds the stacked weights
    weights = persistent._persistent_weights
    polling = BARRIER_POLLING[seed % len(BARRIER_POLLING)]  # every way of waiting at the barrier
    if kernel_device.type == "cpu":  # one program, owning min_features features per step (masked tiles)
        found = persistent_head_triton(x_t, modulation, weights, 1, features=min_features, polling=polling)
    else:
        programs = persistent_programs(max(width, weights.inner_width), 8, min_features)
        found = persistent_head_triton(x_t, modulation, weights, programs, polling=polling)
    assert found.dtype == dtype and found.shape == expected.shape
    torch.testing.assert_close(found.float(), expected.float(), **TOLERANCES[dtype])


def test_the_velocity_uses_it_only_where_it_can_run():
    head = random_head(16, 2, 0, torch.float32, "cpu")
    reference, x_t, modulation = inputs(head, 3, 0, "cpu")
    off = FusedFlowMatchingVelocity(head, use_kernels=False, persistent=True)
    torch.testing.assert_close(off(x_t, modulation), reference(x_t, modulation), rtol=0, atol=0)
    assert off._persistent_weights is None  # kernels off: the unfused path ran


def test_bad_input_names_what_was_expected(interpreter):  # noqa: F811
    head = random_head(16, 1, 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"barrier_polling must be one of \['relaxed', 'loads', 'acquire'\], "
                                         "found 'spin'"):
        FusedFlowMatchingVelocity(head, persistent=True, barrier_polling="spin")
    persistent = FusedFlowMatchingVelocity(head, persistent=True)
    _, x_t, modulation = inputs(head, 2, 0, "cpu")
    persistent(x_t, modulation)
    weights = persistent._persistent_weights
    with pytest.raises(ValueError, match=r"modulation \(N, 5, 16\)"):
        persistent_head_triton(x_t, modulation[:, :4], weights, 1)
    with pytest.raises(ValueError, match="programs must be 1, found 2"):
        persistent_head_triton(x_t, modulation, weights, 2)
    with pytest.raises(ValueError, match="features must be >= 1, found 0"):
        persistent_head_triton(x_t, modulation, weights, 1, features=0)


def test_the_fast_sampler_samples_the_same_tokens_with_it(interpreter, trained_like_model):  # noqa: F811
    from nextstep import generate_tokens
    from nextstep.fast import FastTokenSampler

    model = trained_like_model.eval()
    settings = dict(height=32, width=32, cfg=3.0, num_steps=2, seed=3)
    expected, *_ = generate_tokens(model, ["a red circle"], **settings)
    found, *_ = generate_tokens(model, ["a red circle"], **settings,
                                token_sampler=FastTokenSampler(model, persistent_head=True))
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_programs_use_the_multiprocessors_and_none_idles():
    assert persistent_programs(1536, 132) == 128  # 12 features each
    assert features_per_program(1536, 1536, 128) == 12
    assert persistent_programs(1536, None) == 192  # 8 features each, no limit
    assert persistent_programs(40, 8, 6) == 7  # 6 features each: the 8th would be idle
    assert persistent_programs(4, 132) == 1
    for width in range(1, 300):
        for multiprocessors in (1, 7, 132):
            programs = persistent_programs(width, multiprocessors)
            features = features_per_program(width, width, programs)
            assert programs <= multiprocessors and (programs - 1) * features < width <= programs * features


@pytest.mark.parametrize("polling", BARRIER_POLLING)
@pytest.mark.parametrize("rounds", [0, 1, 7])
def test_programs_meet_at_every_grid_barrier(kernel_device, rounds, polling):  # noqa: F811
    programs = 1 if kernel_device.type == "cpu" else persistent_programs(1536, 8)
    counter = grid_barriers_triton(programs, rounds, kernel_device, polling=polling)
    assert counter.item() == rounds * programs


def test_grid_barriers_name_what_was_expected(interpreter):  # noqa: F811
    with pytest.raises(ValueError, match="rounds must be >= 0, found -1"):
        grid_barriers_triton(1, -1, "cpu")
    with pytest.raises(ValueError, match="programs must be 1 under Triton's interpreter, found 2"):
        grid_barriers_triton(2, 1, "cpu")
    with pytest.raises(ValueError, match=r"polling must be one of \['relaxed', 'loads', 'acquire'\], found 'spin'"):
        grid_barriers_triton(1, 1, "cpu", polling="spin")
    assert barriers_per_evaluation(12) == 25


def test_the_fast_sampler_samples_the_same_tokens_with_it_on_the_gpu(kernel_device, trained_like_model):  # noqa: F811
    """The comparison of the tokens above, with the kernel compiled and run by many programs (on a CUDA machine
    with ``TRITON_INTERPRET=0``, as benchmarks/gpu_check.sh runs it)."""
    if kernel_device.type != "cuda":
        pytest.skip("the GPU variant of the one-launch head's token comparison: expected CUDA with "
                    "TRITON_INTERPRET=0, found the CPU (the interpreter variant covers it there)")
    from nextstep import generate_tokens
    from nextstep.fast import FastTokenSampler

    model = trained_like_model.eval().to(kernel_device)
    settings = dict(height=32, width=32, cfg=3.0, num_steps=2, seed=3)
    expected, *_ = generate_tokens(model, ["a red circle"], **settings)
    sampler = FastTokenSampler(model, persistent_head=True)
    found, *_ = generate_tokens(model, ["a red circle"], **settings, token_sampler=sampler)
    assert sampler._velocity is not None and sampler._velocity._persistent_weights is not None, (
        "expected the one-launch head to run on the GPU, found the separate kernels in its place")
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
