"""The fused decode stack (packed projections, fused rotary + cache write, fused add + norm) against the backbone."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of Triton; see kernel_helpers

import pytest  # noqa: E402
import torch  # noqa: E402
from fast_helpers import draw_noise, prefill  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig  # noqa: E402
from nextstep.backbones.base import positions_from_mask  # noqa: E402
from nextstep.fast import DecodeStep, FastTokenSampler  # noqa: E402
from nextstep.fast.fused_decode import FusedDecodeStack  # noqa: E402
from nextstep.fast.packed_projections import pack_projections  # noqa: E402
from nextstep.samplers import EulerSampler, guidance_for_scale  # noqa: E402
from nextstep.serialization import load_pretrained, save_pretrained  # noqa: E402

#: The GPU when there is one (compiled kernels under TRITON_INTERPRET=0), else the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_backbone(kv_heads=2, group=2, half=4, layers=2, bias=True, seed=0) -> Qwen2Backbone:
    config = Qwen2BackboneConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_layers=layers,
                                 num_heads=kv_heads * group, num_kv_heads=kv_heads, head_dim=2 * half,
                                 attention_bias=bias)
    torch.manual_seed(seed)
    backbone = Qwen2Backbone(config).eval()
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_(0.0, 0.3)
    return backbone.to(DEVICE)


def decode(backbone, fused: bool, left_padding: int, steps: int = 3, seed: int = 1, skinny: bool = False,
           dependent: bool = False, int8_weights: bool = False):
    """Prefill 6 tokens into 2 rows (the second left-padded), then ``steps`` decode steps."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, 6, backbone.hidden_size, generator=generator).to(DEVICE)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :left_padding] = False
    mask = mask.to(DEVICE)
    positions = positions_from_mask(mask)
    cache = backbone.new_cache(2, 6 + steps)
    hidden = torch.zeros(2, backbone.hidden_size, device=DEVICE)
    inputs = torch.randn(steps, 2, 1, backbone.hidden_size, generator=generator).to(DEVICE)
    step_embeds = torch.zeros(2, 1, backbone.hidden_size, device=DEVICE)
    with torch.no_grad():
        backbone(embeds, positions, mask, cache)
        step = DecodeStep(backbone, cache, step_embeds, hidden,
                          compile_stack=FusedDecodeStack(backbone, skinny=skinny, dependent_launches=dependent,
                                                         int8_weights=int8_weights)
                          if fused else None)
        step.start(positions[:, -1:] + 1)
        found = []
        for index in range(steps):
            step_embeds.copy_(inputs[index])
            step.compute(step.visible())
            step.advance()
            found.append(hidden.clone())
    return torch.stack(found), cache


@given(kv_heads=st.integers(1, 3), group=st.integers(1, 3), half=st.integers(1, 8), layers=st.integers(1, 2),
       bias=st.booleans(), left_padding=st.integers(0, 4), seed=st.integers(0, 2**10), skinny=st.booleans(),
       dependent=st.booleans())
def test_fused_stack_matches_the_backbone(kv_heads, group, half, layers, bias, left_padding, seed, skinny,
                                          dependent):
    backbone = random_backbone(kv_heads, group, half, layers, bias, seed)
    expected, expected_cache = decode(backbone, False, left_padding)
    found, cache = decode(backbone, True, left_padding, skinny=skinny, dependent=dependent)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.keys, expected_cache.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.values, expected_cache.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.key_mask, expected_cache.key_mask)


def test_packing_keeps_parameters_memory_names_and_checkpoints():
    backbone = random_backbone()
    parameters = dict(backbone.named_parameters())
    state = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    memory = sum(parameter.untyped_storage().nbytes() for parameter in backbone.parameters())
    packs = pack_projections(backbone)
    assert dict(backbone.named_parameters()) == parameters  # the same Parameter objects
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    attention = backbone.layers[0].self_attn
    qkv = packs[0].qkv_weight
    assert attention.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attention.v_proj.weight.data_ptr() == qkv[-attention.v_proj.weight.shape[0]:].data_ptr()
    storages = {parameter.untyped_storage().data_ptr(): parameter.untyped_storage().nbytes()
                for parameter in backbone.parameters()}
    assert sum(storages.values()) == memory  # the packs replace the projections' memory
    assert pack_projections(backbone) is packs  # still packed: kept
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1.0)
    backbone.layers[0].mlp.up_proj.weight.grad = torch.ones_like(backbone.layers[0].mlp.up_proj.weight)
    optimizer.step()
    width = backbone.layers[0].mlp.up_proj.weight.shape[0]
    torch.testing.assert_close(packs[0].gate_up_weight[width:], state["layers.0.mlp.up_proj.weight"] - 1.0)
    backbone.load_state_dict(state)  # loading copies into the views: the packs see it, the packing holds
    assert pack_projections(backbone) is packs
    torch.testing.assert_close(packs[0].gate_up_weight[width:], state["layers.0.mlp.up_proj.weight"])


def test_a_packed_model_saves_and_loads(tmp_path, trained_like_model):
    model = trained_like_model
    pack_projections(model.backbone)
    save_pretrained(model, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_moving_the_model_packs_again():
    backbone = random_backbone()
    stack = FusedDecodeStack(backbone)
    assert not stack.refresh()
    backbone.double()
    assert stack.refresh()
    assert stack.packs[0].qkv_weight.dtype == torch.float64
    attention = backbone.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == stack.packs[0].qkv_weight.data_ptr()
    expected, _ = decode(backbone.float(), False, 2)
    found, _ = decode(backbone, True, 2)  # packed again as float32 by the new stack
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decode_weights", ["native", "skinny", "int8"])
def test_the_fast_sampler_samples_the_same_tokens_with_the_fused_stack(trained_like_model, decode_weights):
    model = trained_like_model.eval().to(DEVICE)
    guidance, sampler = guidance_for_scale(3.0), EulerSampler()
    samples = []
    for fused in (False, True):
        fast = FastTokenSampler(model, fused_decode=fused, decode_weights=decode_weights if fused else "native")
        hidden, cache, next_positions = prefill(model, ["a red circle", "grinning face"], (1, 2), 2, fast.new_cache)
        noise, _ = draw_noise(2, 0, 2, model.token_dim, 3, False)
        samples.append(fast.sample_tokens(hidden, cache, next_positions, noise.to(DEVICE), guidance=guidance,
                                          sampler=sampler, num_steps=3))
        assert fast.fused_decode == fused and (fast._fused_stack is not None) == fused
    if decode_weights == "int8":  # rounded weights: close, not equal
        relative = ((samples[1] - samples[0]).norm() / samples[0].norm()).item()
        assert 0 < relative < 0.02, relative
    else:
        torch.testing.assert_close(samples[1], samples[0], rtol=1e-4, atol=1e-4)


def test_bad_input_names_what_was_expected():
    with pytest.raises(TypeError, match="FusedDecodeStack needs a Qwen2Backbone, found Linear"):
        FusedDecodeStack(torch.nn.Linear(2, 2))
    backbone = random_backbone()
    cache = backbone.new_cache(1, 4)
    with pytest.raises(ValueError, match="one token per row, found 2"):
        FusedDecodeStack(backbone)(torch.zeros(1, 2, 24, device=DEVICE), torch.zeros(1, 2, dtype=torch.long),
                                   cache.key_mask, torch.zeros(1, dtype=torch.long), cache.layers, 4)


def test_dependent_launches_only_where_compiled_kernels_can():
    from nextstep.kernels.triton_support import (
        dependent_launch_available,
        dependent_launch_options,
        dependent_launches,
        interpreter_enabled,
        set_compiling_for,
    )

    x = torch.zeros(2, 8)
    assert dependent_launch_options(x) == {}  # outside the context
    with dependent_launches():
        inside = dependent_launch_options(x)
        with dependent_launches(False):
            assert dependent_launch_options(x) == {}
        assert dependent_launch_options(x) == inside
        if not interpreter_enabled() and dependent_launch_available():  # compiling for a GPU: Hopper or later
            for arch, expected in ((80, {}), (90, {"launch_pdl": True})):
                previous = set_compiling_for(arch)
                try:
                    assert dependent_launch_options(x) == expected
                finally:
                    set_compiling_for(previous)
    assert dependent_launch_options(x) == {}
    if interpreter_enabled():
        assert inside == {}  # the interpreter runs kernels one after another


@pytest.mark.parametrize("use_kernels, disabled, kernels", [(False, False, False), (True, False, True),
                                                             (True, True, False), (None, True, False)])
def test_use_kernels_and_the_switch_off_variable_reach_every_fused_operation(monkeypatch, use_kernels, disabled,
                                                                             kernels):
    import importlib

    from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity
    from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig

    add_rms_norm, rotary_cache, swiglu, skinny_module = (
        importlib.import_module(f"nextstep.kernels.{name}") for name in ("add_rms_norm", "rotary_cache", "swiglu",
                                                                         "skinny_linear"))
    from nextstep.kernels.triton_support import DISABLE_VARIABLE, kernel_function

    if disabled:
        monkeypatch.setenv(DISABLE_VARIABLE, "1")
    else:
        monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    form = "triton" if kernels else "reference"
    stack = FusedDecodeStack(random_backbone(layers=1), skinny=True, use_kernels=use_kernels)
    for module, name in ((add_rms_norm, "add_rms_norm"), (rotary_cache, "rotate_into_cache"), (swiglu, "swiglu")):
        assert getattr(stack, name) is getattr(module, f"{name}_{form}"), name
    calls = []
    monkeypatch.setattr(skinny_module, "skinny_linear_triton", lambda *a: calls.append("triton") or a[0])
    monkeypatch.setattr(skinny_module, "skinny_linear_reference", lambda *a: calls.append("reference") or a[0])
    monkeypatch.setattr("nextstep.fast.fused_decode.skinny_linear_triton", skinny_module.skinny_linear_triton)
    monkeypatch.setattr("nextstep.fast.fused_decode.skinny_linear_reference", skinny_module.skinny_linear_reference)
    stack._product(torch.zeros(1, 24, device=DEVICE), stack.products[0]["o"])
    assert calls == [form]
    velocity = FusedFlowMatchingVelocity(FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8,
                                                                                 width=8, depth=1)),
                                         use_kernels=use_kernels, persistent=True)
    assert velocity.layer_norm_modulate.__name__.endswith(form) and velocity.persistent is kernels
    from nextstep.kernels import guided_update
    assert kernel_function(guided_update, use_kernels).__name__ == f"guided_update_{form}"


def test_the_fused_stack_uses_the_backbone_s_norm_epsilon():
    """A large epsilon, which the random weights' activations do not hide."""
    config = Qwen2BackboneConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, attention_bias=True, rms_norm_eps=5.0)
    torch.manual_seed(0)
    backbone = Qwen2Backbone(config).eval()
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_(0.0, 0.3)
    backbone = backbone.to(DEVICE)
    expected, _ = decode(backbone, False, 1)
    found, _ = decode(backbone, True, 1)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


def test_the_int8_step_is_the_backbone_with_its_weights_rounded():
    """Each product multiplies by values * scale: a step of the backbone with those weights in place is the same."""
    from nextstep.fast.weight_quantization import quantize_int8

    backbone = random_backbone(seed=3)
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 5, backbone.hidden_size, generator=generator).to(DEVICE)
    step_embeds = torch.randn(2, 1, backbone.hidden_size, generator=generator).to(DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    positions = positions_from_mask(mask)
    prefilled = backbone.new_cache(2, 7)
    with torch.no_grad():
        backbone(embeds, positions, mask, prefilled)
    caches = [prefilled.clone(), prefilled.clone()]
    outputs = []
    for int8, cache in zip((True, False), caches):
        if not int8:
            with torch.no_grad():
                for layer in backbone.layers:
                    attention, mlp = layer.self_attn, layer.mlp
                    for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                                   mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                        linear.weight.copy_(quantize_int8(linear.weight).dequantize(linear.weight.dtype))
        hidden = torch.zeros(2, backbone.hidden_size, device=DEVICE)
        step = DecodeStep(backbone, cache, step_embeds, hidden,
                          compile_stack=FusedDecodeStack(backbone, int8_weights=True) if int8 else None)
        step.start(positions[:, -1:] + 1)
        with torch.no_grad():
            step.compute(step.visible())
        outputs.append(hidden)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_products_of_more_rows_than_the_kernel_takes_use_the_library_product_with_kernels_on():
    from nextstep.kernels.skinny_linear import MAX_ROWS

    stack = FusedDecodeStack(random_backbone(layers=1), skinny=True, use_kernels=True)
    weight, bias, _ = stack.products[0]["o"]
    x = torch.randn(MAX_ROWS + 1, weight.shape[1], device=DEVICE)
    torch.testing.assert_close(stack._product(x, stack.products[0]["o"]), torch.nn.functional.linear(x, weight, bias))


def test_projections_with_and_without_a_bias_are_not_packed():
    backbone = random_backbone()
    backbone.layers[1].self_attn.k_proj.bias = None
    with pytest.raises(ValueError, match=r"cannot pack bias: some projections have one and some not "
                                         r"\(\[True, False, True\]\)"):
        pack_projections(backbone)


def test_a_replaced_projection_parameter_is_packed_again():
    """A bias or a weight assigned anew (not copied into) is no view of the pack: the pack is rebuilt."""
    backbone = random_backbone(layers=1)
    packs = pack_projections(backbone)
    attention, mlp = backbone.layers[0].self_attn, backbone.layers[0].mlp
    attention.k_proj.bias = torch.nn.Parameter(torch.full_like(attention.k_proj.bias, 3.0))
    repacked = pack_projections(backbone)
    assert repacked is not packs
    queries = attention.q_proj.bias.shape[0]
    assert torch.equal(repacked[0].qkv_bias[queries:queries + attention.k_proj.bias.shape[0]],
                       torch.full_like(attention.k_proj.bias, 3.0))
    mlp.up_proj.weight = torch.nn.Parameter(torch.full_like(mlp.up_proj.weight, 2.0))
    again = pack_projections(backbone)
    assert again is not repacked
    gates = mlp.gate_proj.weight.shape[0]
    assert torch.equal(again[0].gate_up_weight[gates:], torch.full_like(mlp.up_proj.weight, 2.0))
    assert pack_projections(backbone) is again
