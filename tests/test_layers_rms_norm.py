"""RMSNorm: eps inside the root, statistics in fp32, the gain applied after casting back."""

import torch


def test_rms_norm_adds_eps_to_the_mean_square_whether_eps_is_a_number_or_a_tensor():
    from nextstep.layers.rms_norm import rms_norm

    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-3, -1e-3, 2e-3, 0.0], [3.0, -1.0, 0.5, 2.0]])
    weight = torch.tensor([1.0, 2.0, 3.0, -4.0])
    expected = weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-4)
    for eps in (1e-4, torch.tensor(1e-4)):
        torch.testing.assert_close(rms_norm(x, weight, eps), expected)


def test_rms_norm_of_large_half_precision_values_is_computed_in_fp32():
    from nextstep.layers import RMSNorm

    x = torch.tensor([[300.0, -400.0, 500.0, 1000.0], [1.0, 2.0, -3.0, 4.0]], dtype=torch.float16)
    norm = RMSNorm(4).half()
    wide = x.float()
    expected = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    torch.testing.assert_close(norm(x), expected)


def test_rms_norm_casts_back_to_the_input_dtype_before_an_fp32_gain():
    from nextstep.layers import RMSNorm

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2.0, 3.0, 8))
    wide = x.float()
    normalised = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    found = norm(x)
    assert found.dtype == torch.float32
    torch.testing.assert_close(found, norm.weight.detach() * normalised, atol=0, rtol=0)
