"""The fast token loop with its Triton kernels (interpreter on CPU) against the eager references; GPU capture."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
from fast_helpers import fast_sample  # noqa: E402
from kernel_helpers import interpreter  # noqa: E402,F401

from nextstep import generate_tokens  # noqa: E402
from nextstep.fast import CapturedCall, FastTokenSampler  # noqa: E402
from nextstep.samplers import AdamsBashforthSampler, EulerMaruyamaSampler, HeunSampler  # noqa: E402

PROMPTS = ["a red circle", "grinning face"]
GRID = (1, 2)


def sample(model, fast, sampler, cfg=3.0, steps=3, seed=0):
    return fast_sample(model, fast, sampler, PROMPTS, GRID, cfg=cfg, steps=steps, seed=seed)


@pytest.mark.parametrize(("sampler", "dtype", "fused_blocks"), [
    (HeunSampler(), torch.float32, True),
    (HeunSampler(), torch.bfloat16, False),
    (EulerMaruyamaSampler(), torch.float32, False),
    (EulerMaruyamaSampler(), torch.bfloat16, True),
    (AdamsBashforthSampler(), torch.float32, False),
], ids=["heun-fp32-block_kernels", "heun-bf16-norm_kernels", "em-fp32-norm_kernels", "em-bf16-block_kernels",
        "adams_bashforth-fp32-norm_kernels"])
def test_kernels_match_references_in_the_token_loop(interpreter, trained_like_model, dtype, sampler,  # noqa: F811
                                                     fused_blocks):
    model = trained_like_model.eval().to(dtype)
    with_kernels = sample(model, FastTokenSampler(model, use_kernels=True, fused_blocks=fused_blocks), sampler,
                          steps=2)
    without = sample(model, FastTokenSampler(model, use_kernels=False), sampler, steps=2)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(with_kernels, without, **tolerance)


def test_capture_is_refused_on_the_cpu():
    call = CapturedCall(lambda: None, name="nothing")
    assert not call.capture(torch.device("cpu"))
    assert "CUDA graphs need a CUDA device" in call.failure
    call()  # runs eagerly


def test_every_warm_up_call_starts_from_the_state_before_the_capture(monkeypatch):
    """A decode step captured at a cache's last free slot warms up at that slot, never the one past it."""
    import contextlib

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    slot, seen = [5], []

    def step():
        seen.append(slot[0])
        slot[0] += 1

    def snapshot():
        saved = slot[0]

        def restore():
            slot[0] = saved

        return restore

    call = CapturedCall(step, name="decode")
    assert call.capture(torch.device("cuda"), warmup=3, snapshot=snapshot)
    assert seen == [5, 5, 5, 5]  # three warm-up calls and the recorded one


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("sampler", [HeunSampler(), EulerMaruyamaSampler(), AdamsBashforthSampler()],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("fused_blocks", [False, True], ids=["norm_kernels", "block_kernels"])
def test_captured_loop_matches_generate_tokens_on_gpu(trained_like_model, sampler, fused_blocks):
    model = trained_like_model.eval().cuda()
    fast = FastTokenSampler(model, fused_blocks=fused_blocks)
    found = sample(model, fast, sampler, seed=4)
    assert all(call.captured for _, call in fast._token_steps.values())
    assert all(call.captured for _, calls in fast._decode_steps.values() for call in calls.values())
    expected, _, _ = generate_tokens(model, PROMPTS, height=16 * GRID[0], width=16 * GRID[1], cfg=3.0,
                                     num_steps=3, sampler=sampler, seed=4, use_norm=True)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    again = sample(model, fast, sampler, seed=4)  # replays the graphs of the first generation
    torch.testing.assert_close(again, found, rtol=0, atol=0)
