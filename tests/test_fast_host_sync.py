"""What a CUDA graph records must not wait on the host: the captured steps checked on the CPU.

A captured token step or decode step that reads a tensor's value into Python
(``.item()``, ``bool(t)``, ``.tolist()``), copies to the host, or builds a
tensor from Python data cannot be recorded, and the sampler falls back to
running it eagerly (slowly) on the GPU. These tests run every function the fast
sampler would capture under `HostSyncProbe`, which refuses such calls made from
the library's own code, so a step that would stop capturing fails here, on a
machine without a GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from fast_helpers import fast_sample  # noqa: E402
from kernel_helpers import interpreter  # noqa: E402,F401
from torch.overrides import TorchFunctionMode  # noqa: E402

import nextstep  # noqa: E402
from nextstep.fast import CapturedCall, FastTokenSampler  # noqa: E402
from nextstep.fast.solver_plan import PLANNED_SAMPLERS  # noqa: E402

LIBRARY = str(Path(nextstep.__file__).parent)
PROMPTS = ("a red circle", "grinning face")

#: Calls that wait for the device or turn device data into host data.
HOST_SYNCHRONISING = frozenset({
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
    torch.tensor, torch.as_tensor, torch.Tensor.unique, torch.unique, torch.masked_select,
    torch.Tensor.masked_select,
})


class HostSyncProbe(TorchFunctionMode):
    """Raise on a host-synchronising call made from code under ``root``; count every other call.

    Args:
        root: the folder whose code is checked (calls from elsewhere, such as
            Triton's interpreter, pass).
    """

    def __init__(self, root: str = LIBRARY):
        super().__init__()
        self.root = root
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1)
        if func in HOST_SYNCHRONISING and caller.f_code.co_filename.startswith(self.root):
            raise AssertionError(f"{getattr(func, '__name__', func)} called at {caller.f_code.co_filename}:"
                                 f"{caller.f_lineno} inside a step that is captured as a CUDA graph")
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def probed_steps(monkeypatch):
    """Every `CapturedCall`'s function runs under a `HostSyncProbe`; yields {name: calls seen}."""
    seen: dict[str, int] = {}
    original = CapturedCall.__init__

    def init(self, fn, *, name="step", pool=None):
        def probed():
            probe = HostSyncProbe()
            with probe:
                fn()
            kind = name.split(" (")[0]
            seen[kind] = seen.get(kind, 0) + probe.calls

        original(self, probed, name=name, pool=pool)

    monkeypatch.setattr(CapturedCall, "__init__", init)
    return seen


@pytest.mark.parametrize("sampler_class", PLANNED_SAMPLERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("options", [
    dict(),
    dict(fused_blocks=True),
    dict(fused_decode=True),
    dict(fused_decode=True, decode_weights="skinny"),
    dict(fused_decode=True, decode_weights="int8"),
], ids=["plain", "block_kernels", "fused_decode", "skinny", "int8"])
def test_the_captured_steps_never_wait_on_the_host(trained_like_model, probed_steps, sampler_class, cfg, options):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False, **options)
    fast_sample(model, fast, sampler_class(sampler_class.config_class()), PROMPTS, (1, 3), cfg=cfg)
    assert probed_steps.get("token step", 0) > 0 and probed_steps.get("decode step", 0) > 0, probed_steps


@pytest.mark.parametrize("options", [
    dict(),
    dict(fused_blocks=True),
    dict(persistent_head=True),
    dict(fused_decode=True, decode_weights="int8"),
], ids=["norm_kernels", "block_kernels", "persistent_head", "fused_decode_int8"])
def test_the_captured_steps_with_their_kernels_never_wait_on_the_host(interpreter, trained_like_model,  # noqa: F811
                                                                      probed_steps, options):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=True, **options)
    fast_sample(model, fast, PLANNED_SAMPLERS[1](), ("a red circle",), (1, 2))
    assert probed_steps.get("token step", 0) > 0 and probed_steps.get("decode step", 0) > 0, probed_steps


@pytest.mark.parametrize("statement", ["int(x.sum())", "x.max().item()", "bool(x.any())", "x.tolist()",
                                       "torch.tensor([1.0]) + x"])
def test_the_probe_refuses_a_host_synchronising_call(statement):
    code = compile(statement, __file__, "eval")
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="captured as a CUDA graph"), HostSyncProbe(root=__file__):
        eval(code, {"torch": torch, "x": x})
