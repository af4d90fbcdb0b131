"""The fused LayerNorm + AdaLN modulation kernel against its eager reference (interpreter on CPU, or GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_helpers import DTYPES, TOLERANCES, interpreter, kernel_device, random_tensor  # noqa: E402,F401

from nextstep.kernels import (  # noqa: E402
    layer_norm_modulate,
    layer_norm_modulate_reference,
    layer_norm_modulate_triton,
)


@given(rows=st.integers(1, 6), width=st.integers(1, 300), dtype=DTYPES, seed=st.integers(0, 2**16),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), eps=st.sampled_from([1e-6, 1e-5]))
def test_kernel_matches_reference(kernel_device, rows, width, dtype, seed, scale, eps):  # noqa: F811
    x = random_tensor((rows, width), dtype, seed, scale, device=kernel_device)
    shift = random_tensor((rows, width), dtype, seed + 1, device=kernel_device)
    gain = random_tensor((rows, width), dtype, seed + 2, device=kernel_device)
    expected = layer_norm_modulate_reference(x, shift, gain, eps)
    found = layer_norm_modulate_triton(x, shift, gain, eps)
    assert found.dtype == dtype
    torch.testing.assert_close(found.float(), expected.float(), **TOLERANCES[dtype])


@given(rows=st.integers(1, 4), pieces=st.integers(2, 5), width=st.integers(1, 100), dtype=DTYPES,
       seed=st.integers(0, 2**16))
def test_kernel_reads_strided_modulation_rows(kernel_device, rows, pieces, width, dtype, seed):  # noqa: F811
    """shift and scale as views into an (N, pieces * W) table, as the head's fast path passes them."""
    table = random_tensor((rows, pieces, width), dtype, seed, device=kernel_device)
    shift, gain = table[:, 0], table[:, -1]  # row stride pieces * W
    x = random_tensor((2 * rows, width), dtype, seed + 1, device=kernel_device)[::2]  # strided rows
    expected = layer_norm_modulate_reference(x, shift, gain)
    torch.testing.assert_close(layer_norm_modulate_triton(x, shift, gain).float(), expected.float(),
                               **TOLERANCES[dtype])


def test_reference_is_layer_norm_then_modulation():
    x, shift, gain = (random_tensor((3, 16), torch.float32, seed) for seed in range(3))
    expected = F.layer_norm(x, (16,), eps=1e-6) * gain + shift
    torch.testing.assert_close(layer_norm_modulate_reference(x, shift, gain), expected)


def test_dispatch_uses_the_reference_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, shift, gain = (random_tensor((2, 8), torch.float32, seed) for seed in range(3))
    torch.testing.assert_close(layer_norm_modulate(x, shift, gain), layer_norm_modulate_reference(x, shift, gain))


def test_dispatch_runs_the_kernel_under_the_interpreter(interpreter, monkeypatch):  # noqa: F811
    import nextstep.kernels.adaln_modulation as module

    calls = []
    original = module.layer_norm_modulate_triton
    monkeypatch.setattr(module, "layer_norm_modulate_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, shift, gain = (random_tensor((2, 8), torch.float32, seed) for seed in range(3))
    torch.testing.assert_close(layer_norm_modulate(x, shift, gain), layer_norm_modulate_reference(x, shift, gain))
    assert calls == [1]
    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")
    layer_norm_modulate(x, shift, gain)
    assert calls == [1]


def test_bad_shapes_name_what_was_expected():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"shift must have the shape of x \(2, 8\), found \(2, 7\)"):
        layer_norm_modulate(x, torch.zeros(2, 7), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(N, W\)"):
        layer_norm_modulate(torch.zeros(8), torch.zeros(8), torch.zeros(8))


def test_the_reference_is_the_head_s_own_normalise_and_modulate():
    """Checked against the head's layers, not only against the kernel: the final layer's affine-free
    LayerNorm (its eps) followed by ``modulate``, whose scale enters as 1 + scale."""
    from nextstep.layers.adaln import AdaLNFinalLayer, modulate

    generator = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(5, 48, generator=generator) for _ in range(3))
    norm = AdaLNFinalLayer(48, 16).norm_final
    torch.testing.assert_close(layer_norm_modulate_reference(x, shift, 1 + scale),
                               modulate(norm(x), shift, scale), rtol=1e-6, atol=1e-6)


@given(rows=st.integers(2, 4), width=st.integers(1, 100), dtype=DTYPES, seed=st.integers(0, 2**16),
       strided=st.sampled_from(["x", "shift", "scale"]))
def test_each_input_may_have_its_own_row_stride(kernel_device, rows, width, dtype, seed, strided):  # noqa: F811
    tensors = {name: random_tensor((rows, width), dtype, seed + number, device=kernel_device)
               for number, name in enumerate(("x", "shift", "scale"))}
    wide = random_tensor((rows, 3 * width), dtype, seed + 3, device=kernel_device)
    wide[:, width:2 * width] = tensors[strided]
    given_tensors = dict(tensors, **{strided: wide[:, width:2 * width]})
    expected = layer_norm_modulate_reference(tensors["x"], tensors["shift"], tensors["scale"])
    found = layer_norm_modulate_triton(given_tensors["x"], given_tensors["shift"], given_tensors["scale"])
    torch.testing.assert_close(found.float(), expected.float(), **TOLERANCES[dtype])
