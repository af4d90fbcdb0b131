"""Edge cases of the fast path: plan checks, int8 rounding, packing, decode and token steps, sampler options."""

import pytest
import torch
from fast_helpers import draw_noise, fast_sample, prefill

from nextstep.fast import SolverPlan, SolverStage, solver_plan
from nextstep.fast.solver_plan import check_plan, plan_reason
from nextstep.samplers import EulerMaruyamaSampler, EulerSampler
from nextstep.samplers.euler_maruyama import EulerMaruyamaSamplerConfig


def _plan(stages, noise_steps=0, times=None):
    times = torch.linspace(0, 1, 3) if times is None else times
    return SolverPlan(tuple(stages), times, torch.ones(len(stages), 3), noise_steps)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _plan([SolverStage(0)], times=torch.zeros(3, 1)), r"times must be \(E,\), found shape \(3, 1\)"),
        (lambda: _plan([SolverStage(0)], noise_steps=-1), "noise_steps must be a count >= 0, found -1"),
        (lambda: _plan([SolverStage(0)], noise_steps=1.0), "noise_steps must be a count >= 0, found 1.0"),
        (lambda: _plan([SolverStage(0, extra="bogus")]), "extra must be None, 'noise' or 'velocity'"),
        (lambda: _plan([SolverStage(-1)]), "time_index outside the plan's 3 evaluation times"),
        (lambda: _plan([SolverStage(0, extra="noise", noise_index=-1)], noise_steps=1), "noise_index outside"),
    ],
    ids=[
        "times_2d",
        "negative_noise_steps",
        "float_noise_steps",
        "unknown_extra",
        "negative_time_index",
        "negative_noise_index",
    ],
)
def test_malformed_plans_are_refused_with_what_is_wrong(build, message):
    """Every structural check of a plan raises a ValueError naming the offending field."""
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("grid", [torch.zeros(1), torch.zeros(0), torch.zeros(3, 1)], ids=["one_point", "empty", "2d"])
def test_a_time_grid_without_a_step_is_named(grid):
    """A plan needs a 1-D grid of at least two times; anything else is named with its shape."""
    with pytest.raises(ValueError, match=r"time_grid must be \(S \+ 1,\) with S >= 1 steps, found shape"):
        solver_plan(EulerSampler(), grid)


def test_a_scratch_buffer_written_once_stays_readable_by_later_stages():
    """A trial point or kept velocity written by an early stage may be read after stages that leave it alone."""
    plan = _plan(
        [
            SolverStage(0, target="trial", keep_velocity=True),
            SolverStage(1),
            SolverStage(2, source="trial", extra="velocity"),
        ]
    )
    check_plan(plan)


def test_euler_maruyama_without_step_noise_plans_its_probability_flow_limit():
    """A stochastic plan asked for without step noise is the deterministic Euler plan on the same grid."""
    sampler = EulerMaruyamaSampler()
    grid = sampler.make_time_grid(5, 2.0)
    plan = solver_plan(sampler, grid, stochastic=False)
    assert plan.noise_steps == 0
    assert all(stage.extra is None for stage in plan.stages)
    torch.testing.assert_close(plan.coefficients[:, 0], torch.ones(5))
    torch.testing.assert_close(plan.coefficients[:, 1], grid.diff())
    torch.testing.assert_close(plan.coefficients[:, 2], torch.zeros(5))


@pytest.mark.parametrize("last_step_size, noisy", [(0.0, 4), (0.04, 3)])
def test_euler_maruyama_plans_a_deterministic_last_step_only_when_it_has_one(last_step_size, noisy):
    """With ``last_step_size = 0`` every step takes step noise; otherwise the last one is a plain Euler step."""
    sampler = EulerMaruyamaSampler(EulerMaruyamaSamplerConfig(last_step_size=last_step_size))
    plan = solver_plan(sampler, sampler.make_time_grid(4, 1.0))
    assert plan.noise_steps == noisy
    assert [stage.extra for stage in plan.stages] == ["noise"] * noisy + [None] * (4 - noisy)
    assert [stage.noise_index for stage in plan.stages[:noisy]] == list(range(noisy))


def test_a_subclass_of_a_planned_sampler_has_no_plan():
    """Plans are for the exact sampler classes: a subclass may change ``sample`` and runs generically."""

    class ShiftedEuler(EulerSampler):
        pass

    sampler = ShiftedEuler()
    assert "ShiftedEuler has no fused plan" in plan_reason(sampler)
    with pytest.raises(ValueError, match="ShiftedEuler has no fused plan"):
        solver_plan(sampler, sampler.make_time_grid(3))


@pytest.mark.parametrize(
    "weight, found",
    [
        (torch.zeros(2, 3, 4), r"found \(2, 3, 4\) torch.float32"),
        (torch.ones(2, 3, dtype=torch.int32), r"found \(2, 3\) torch.int32"),
        (torch.zeros(3, 0), r"found \(3, 0\) torch.float32"),
    ],
    ids=["three_dims", "integer", "no_columns"],
)
def test_quantize_int8_refuses_what_is_not_a_floating_matrix(weight, found):
    """Only floating (N, K) matrices with a column are rounded; anything else is named in the error."""
    from nextstep.fast import quantize_int8

    with pytest.raises(ValueError, match=r"a floating \(N, K\) matrix with K >= 1, " + found):
        quantize_int8(weight)


def test_int8_weights_of_a_low_precision_matrix_keep_float32_scales_and_dequantize_to_any_dtype():
    """Scales are float32 whatever the weight's dtype, and ``dequantize`` returns the dtype asked for."""
    from nextstep.fast import quantize_int8

    weight = torch.randn(4, 9, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    quantized = quantize_int8(weight)
    assert quantized.scale.dtype == torch.float32
    torch.testing.assert_close(quantized.scale, weight.float().abs().amax(dim=1) / 127.0)
    assert quantized.dequantize().dtype == torch.float32
    assert quantized.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert quantized.dequantize(torch.float64).dtype == torch.float64
    error = (quantized.dequantize() - weight.float()).abs()
    assert torch.all(error <= quantized.scale[:, None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize(
    "bad_rows, listed",
    [
        ([0, 1, 2, 3, 4], r"rows \[0, 1, 2, 3, 4\]$"),
        ([0, 1, 2, 3, 4, 6], r"rows \[0, 1, 2, 3, 4\] \.\.\.$"),
    ],
)
def test_non_finite_weights_name_at_most_five_rows(bad_rows, listed):
    """The error lists the first five rows holding NaN or infinity, with an ellipsis only when there are more."""
    from nextstep.fast import quantize_int8

    weight = torch.ones(8, 2)
    weight[bad_rows, 0] = float("nan")
    with pytest.raises(ValueError, match=listed):
        quantize_int8(weight)


def _tiny_backbone():
    from nextstep import build_model

    return build_model("tiny", seed=0).backbone.eval()


def test_packing_and_fusing_refuse_what_is_not_a_qwen2_backbone():
    """Packing needs the Qwen2 decoder's projections; any other module is refused by type."""
    from nextstep.fast import FusedDecodeStack, pack_projections

    with pytest.raises(TypeError, match="pack_projections needs a Qwen2Backbone, found Linear"):
        pack_projections(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="FusedDecodeStack needs a Qwen2Backbone, found Linear"):
        FusedDecodeStack(torch.nn.Linear(2, 2))


def test_projections_packed_under_inference_mode_stay_trainable():
    """A fused stack built while sampling (inference mode) leaves ordinary parameters that an optimizer can step."""
    from nextstep.fast import FusedDecodeStack

    backbone = _tiny_backbone()
    with torch.inference_mode():
        stack = FusedDecodeStack(backbone)
    assert not stack.packs[0].qkv_weight.is_inference()
    assert not any(parameter.is_inference() for parameter in backbone.parameters())
    up = backbone.layers[0].mlp.up_proj.weight
    before = up.detach().clone()
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1.0)
    up.grad = torch.ones_like(up)
    optimizer.step()
    torch.testing.assert_close(up.detach(), before - 1.0)
    width = up.shape[0]
    torch.testing.assert_close(stack.packs[0].gate_up_weight[width:], before - 1.0)


def test_a_backbone_overriding_its_stack_or_a_cache_subclass_is_stepped_through_forward():
    """Only Qwen2Backbone's own ``_run`` over a plain KVCache is recorded as a graph-ready step."""
    from nextstep.backbones.base import KVCache
    from nextstep.backbones.qwen2 import Qwen2Backbone
    from nextstep.fast import DecodeStep
    from nextstep.fast.decode_step import decode_step_reason

    class OwnStack(Qwen2Backbone):
        def _run(self, *args, **kwargs):
            return super()._run(*args, **kwargs)

    class TaggedCache(KVCache):
        pass

    backbone = _tiny_backbone()
    cache = backbone.new_cache(1, 8)
    assert decode_step_reason(backbone, cache) is None
    tagged = TaggedCache.__new__(TaggedCache)
    tagged.__dict__.update(vars(cache))
    assert decode_step_reason(backbone, tagged) == "the cache is a TaggedCache, not a KVCache"
    step = DecodeStep(backbone, tagged, torch.zeros(1, 1, backbone.hidden_size), torch.zeros(1, backbone.hidden_size))
    assert not step.graph_ready and step.stack is None
    backbone.__class__ = OwnStack
    assert decode_step_reason(backbone, cache) == "OwnStack overrides the _run of Qwen2Backbone"


def test_an_eager_decode_step_advances_its_positions():
    """The eager step through ``forward`` moves the rotary positions on by one, like the graph-ready step."""
    from nextstep.fast import DecodeStep

    backbone = _tiny_backbone()
    cache = backbone.new_cache(2, 8)
    embeds = torch.randn(2, 1, backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(2, backbone.hidden_size)
    step = DecodeStep(backbone, cache, embeds, hidden)
    step.start(torch.tensor([[3], [5]]))
    with torch.no_grad():
        step.eager()
    assert step.positions.tolist() == [[4], [6]]
    assert cache.length == 1 and hidden.abs().sum() > 0


def test_token_step_buffers_keep_the_token_in_float32_whatever_the_model_dtype():
    """The backbone-side buffers take the model's dtype; the sampled token stays float32."""
    from nextstep.fast import TokenStepBuffers

    buffers = TokenStepBuffers.allocate(3, 2, 16, 4, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert buffers.hidden.shape == (6, 16) and buffers.hidden.dtype == torch.bfloat16
    assert buffers.embeds.shape == (6, 1, 16) and buffers.embeds.dtype == torch.bfloat16
    assert buffers.token.shape == (3, 4) and buffers.token.dtype == torch.float32


def _fused_step(model, plan, max_table_elements, rows=2, branches=2):
    from nextstep.fast import FusedFlowMatchingVelocity, FusedTokenStep, TokenStepBuffers

    velocity = FusedFlowMatchingVelocity(model.image_head, use_kernels=False)
    buffers = TokenStepBuffers.allocate(
        rows, branches, model.backbone.hidden_size, model.token_dim, device=torch.device("cpu"), dtype=torch.float32
    )
    step = FusedTokenStep(
        model,
        velocity,
        plan,
        rows=rows,
        branches=branches,
        buffers=buffers,
        use_norm=False,
        use_kernels=False,
        max_table_elements=max_table_elements,
    )
    return step, velocity


def test_a_modulation_table_of_exactly_the_limit_is_still_tabulated(tiny_model):
    """``max_table_elements`` is the largest table held per token: a table of that size is kept, one more is not."""
    sampler = EulerSampler()
    plan = solver_plan(sampler, sampler.make_time_grid(3))
    step, velocity = _fused_step(tiny_model, plan, 0)
    size = plan.times.shape[0] * 2 * 2 * velocity.pieces * velocity.width
    assert _fused_step(tiny_model, plan, size)[0].tabulate
    assert not _fused_step(tiny_model, plan, size - 1)[0].tabulate


def test_a_fused_token_step_refuses_a_plan_of_another_structure(tiny_model):
    """New numbers for the same stages are taken; a plan with other stages needs another step."""
    from nextstep.samplers import HeunSampler

    sampler = EulerSampler()
    step, _ = _fused_step(tiny_model, solver_plan(sampler, sampler.make_time_grid(3)), 1 << 20)
    shifted = solver_plan(sampler, sampler.make_time_grid(3, 3.0))
    step.set_plan(shifted)
    torch.testing.assert_close(step.coefficients, shifted.coefficients)
    with pytest.raises(ValueError, match="keeps its plan's structure"):
        step.set_plan(solver_plan(sampler, sampler.make_time_grid(4)))
    heun = HeunSampler()
    with pytest.raises(ValueError, match="keeps its plan's structure"):
        step.set_plan(solver_plan(heun, heun.make_time_grid(3)))


def test_a_fused_head_names_an_unknown_barrier_polling():
    """The one-launch head's barrier polling is checked against the kernel's choices."""
    from nextstep.fast import FusedFlowMatchingVelocity
    from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig

    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=8, depth=1))
    with pytest.raises(
        ValueError,
        match=r"barrier_polling must be one of \['relaxed', 'loads', 'acquire'\], "
        r"found 'spin'",
    ):
        FusedFlowMatchingVelocity(head, barrier_polling="spin")


PROMPTS = ["a red circle", "grinning face"]
GRID = (2, 3)


def _inputs(model, fast, branches=2, stochastic=False, steps=2, seed=0):
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, branches, fast.new_cache)
    noise, step_noise = draw_noise(len(PROMPTS), seed, GRID[0] * GRID[1], model.token_dim, steps, stochastic)
    return hidden, cache, next_positions, noise, step_noise


@pytest.mark.parametrize("max_length", [0, -3, 10.0, "10"])
def test_a_pooled_cache_needs_a_positive_integer_length(tiny_model, max_length):
    """``new_cache`` refuses lengths that are not integers >= 1 by name."""
    from nextstep.fast import FastTokenSampler

    with pytest.raises(ValueError, match="max_length must be an integer >= 1, found"):
        FastTokenSampler(tiny_model).new_cache(2, max_length)


def test_mismatched_sampling_inputs_are_named(tiny_model):
    """Rows of the positions and cache, the token width of the noise and the step-noise token count are checked."""
    from nextstep.fast import FastTokenSampler
    from nextstep.samplers import guidance_for_scale

    model = tiny_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    guidance = guidance_for_scale(2.0)
    hidden, cache, next_positions, noise, step_noise = _inputs(model, fast, stochastic=True)
    with pytest.raises(ValueError, match=r"next_positions must have shape \(4, 1\), found \(2, 1\)"):
        fast.sample_tokens(hidden, cache, next_positions[:2], noise, guidance=guidance, sampler=EulerSampler())
    with pytest.raises(ValueError, match=r"noise must have shape \(R, T, 64\), found \(2, 6, 32\)"):
        fast.sample_tokens(hidden, cache, next_positions, noise[..., :32], guidance=guidance, sampler=EulerSampler())
    other = model.backbone.new_cache(2, 64)
    with pytest.raises(ValueError, match="the cache has 2 rows, the generation needs 4"):
        fast.sample_tokens(hidden, other, next_positions, noise, guidance=guidance, sampler=EulerSampler())
    with pytest.raises(ValueError, match=r"step_noise must have shape \(6, 2, 2, 64\), found \(5, 2, 2, 64\)"):
        fast.sample_tokens(
            hidden,
            cache,
            next_positions,
            noise,
            step_noise[:5],
            guidance=guidance,
            sampler=EulerMaruyamaSampler(),
            num_steps=2,
        )


def test_sampled_tokens_are_ordinary_tensors_and_progress_counts_every_token(tiny_model):
    """The tokens come back as a tensor that accepts in-place updates; ``progress`` sees 1..T of T."""
    from nextstep.fast import FastTokenSampler

    model = tiny_model.eval()
    seen = []
    tokens = fast_sample(
        model,
        FastTokenSampler(model, use_kernels=False),
        EulerSampler(),
        PROMPTS,
        GRID,
        cfg=2.0,
        use_norm=None,
        progress=lambda *done: seen.append(done),
    )
    assert seen == [(index, 6) for index in range(1, 7)]
    assert not tokens.is_inference()
    tokens.add_(1.0)


def test_use_norm_defaults_to_the_model_config(tiny_model):
    """Without ``use_norm`` the sampler normalises tokens exactly when the model's config says so."""
    from nextstep.fast import FastTokenSampler

    model = tiny_model.eval()
    model.config.use_norm = True
    fast = FastTokenSampler(model, use_kernels=False)
    found = {
        use_norm: fast_sample(model, fast, EulerSampler(), PROMPTS, GRID, cfg=2.0, use_norm=use_norm)
        for use_norm in (None, True, False)
    }
    torch.testing.assert_close(found[None], found[True], rtol=0, atol=0)
    assert not torch.allclose(found[None], found[False])


@pytest.mark.parametrize("repoint", ["transposed", "narrowed"])
def test_a_projection_re_pointed_at_its_own_memory_in_another_layout_is_packed_again(repoint):
    """A parameter that still starts where the pack says but is transposed or shorter is no longer packed."""
    from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig
    from nextstep.fast import pack_projections

    config = Qwen2BackboneConfig(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        attention_bias=False,
    )
    torch.manual_seed(0)
    backbone = Qwen2Backbone(config)
    packs = pack_projections(backbone)
    attention = backbone.layers[0].self_attn
    with torch.no_grad():
        if repoint == "transposed":
            attention.q_proj.weight.data = attention.q_proj.weight.data.t()
        else:
            attention.v_proj.weight.data = attention.v_proj.weight.data[:8]
    expected = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach()
    repacked = pack_projections(backbone)
    assert repacked is not packs
    assert torch.equal(repacked[0].qkv_weight, expected)


@pytest.mark.parametrize("int8_weights", [False, True], ids=["native", "int8"])
def test_a_fused_stack_refreshed_after_a_cast_multiplies_by_the_new_weights(int8_weights):
    """After the model is cast, ``refresh`` repacks and every product reads the cast weights (or their copies)."""
    from nextstep.fast import FusedDecodeStack, quantize_int8

    backbone = _tiny_backbone()
    stack = FusedDecodeStack(backbone, int8_weights=int8_weights)
    backbone.double()
    assert stack.refresh()
    layer = backbone.layers[0]
    weight, bias, scale = stack.products[0]["o"]
    if int8_weights:
        expected = quantize_int8(layer.self_attn.o_proj.weight)
        assert torch.equal(weight, expected.values) and torch.equal(scale, expected.scale)
    else:
        assert weight is layer.self_attn.o_proj.weight and scale is None
    qkv_weight = stack.products[0]["qkv"][0]
    assert qkv_weight.dtype == (torch.int8 if int8_weights else torch.float64)
    if not int8_weights:
        assert qkv_weight is stack.packs[0].qkv_weight
        assert stack.products[0]["down"][0] is layer.mlp.down_proj.weight


def test_the_fused_head_takes_only_flow_matching_heads_and_stays_off_the_one_launch_kernel_without_kernels():
    """Another head is named as not fusable; ``persistent`` without kernels keeps the separate products."""
    from nextstep.fast import FusedFlowMatchingVelocity
    from nextstep.fast.flow_head_velocity import fused_head_reason
    from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig
    from nextstep.heads.base import ImageHead

    class LinearHead(ImageHead):
        token_dim = property(lambda self: 4)
        condition_dim = property(lambda self: 2)

        def velocity(self, x_t, t, condition):
            return x_t

        def loss(self, target, condition, generator=None):
            return target.new_zeros(target.shape[0])

    assert fused_head_reason(LinearHead()) == "LinearHead is not a FlowMatchingHead"
    with pytest.raises(ValueError, match="LinearHead is not a FlowMatchingHead"):
        FusedFlowMatchingVelocity(LinearHead())
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=8, depth=1))
    assert not FusedFlowMatchingVelocity(head, use_kernels=False, persistent=True).persistent


def test_a_fused_decode_sampler_steps_another_backbone_through_its_own_forward():
    """With ``fused_decode`` a backbone other than Qwen2Backbone is stepped eagerly and samples the loop's tokens."""
    from nextstep import build_model, generate_tokens
    from nextstep.backbones import HFBackboneConfig
    from nextstep.config import ComponentSpec
    from nextstep.fast import FastTokenSampler
    from nextstep.presets import tiny

    preset = tiny()
    fields = {key: value for key, value in preset.backbone.config.to_hf_config().items() if key != "architectures"}
    spec = ComponentSpec("backbone", "huggingface", HFBackboneConfig(model_config={**fields, "model_type": "qwen2"}))
    model = build_model(preset.replace(backbone=spec), seed=0).eval()
    settings = dict(height=32, width=32, num_steps=2, cfg=2.0, seed=5)
    expected, _, _ = generate_tokens(model, ["a red circle"], **settings)
    fast = FastTokenSampler(model, use_kernels=False, fused_decode=True)
    found, _, _ = generate_tokens(model, ["a red circle"], token_sampler=fast, **settings)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
