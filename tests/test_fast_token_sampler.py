"""The fast image-token loop (eager on the CPU) against `generate_tokens`, sampler by sampler.

These tests run the kernels' PyTorch references (``use_kernels=False``) whatever
the environment; tests/test_fast_kernels.py runs the loop with the Triton kernels.
"""

import pytest
import torch
from fast_helpers import draw_noise, prefill

from nextstep import generate_tokens
from nextstep.fast import FastTokenSampler
from nextstep.fast.decode_step import DecodeStep
from nextstep.samplers import (
    AdamsBashforthSampler,
    ClassifierFreeGuidance,
    EulerMaruyamaSampler,
    EulerSampler,
    FlowSDESampler,
    HeunSampler,
    MidpointSampler,
    guidance_for_scale,
)
from nextstep.samplers.step_schedule import LinearSteps

PROMPTS = ["a red circle", "grinning face"]
GRID = (2, 3)


def fast_tokens(model, fast, guidance, sampler, num_steps, *, seed=0, use_norm=None, shift=1.0):
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, guidance.num_branches, fast.new_cache)
    count = GRID[0] * GRID[1]
    schedule_max = num_steps if isinstance(num_steps, int) else num_steps.max_steps(count)
    noise, step_noise = draw_noise(len(PROMPTS), seed, count, model.token_dim, schedule_max, sampler.stochastic)
    return fast.sample_tokens(hidden, cache, next_positions, noise, step_noise, guidance=guidance,
                              sampler=sampler, num_steps=num_steps, shift=shift, use_norm=use_norm)


@pytest.mark.parametrize("sampler", [EulerSampler(), HeunSampler(), MidpointSampler(), AdamsBashforthSampler(),
                                     EulerMaruyamaSampler(), FlowSDESampler()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("fused_blocks", [False, True], ids=["norm_kernels", "block_kernels"])
def test_matches_generate_tokens(trained_like_model, sampler, cfg, fused_blocks):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False, fused_blocks=fused_blocks)
    guidance = guidance_for_scale(cfg)
    expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=cfg, num_steps=4, sampler=sampler,
                                     shift=2.0, seed=3)
    found = fast_tokens(model, fast, guidance, sampler, 4, seed=3, shift=2.0)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    if type(sampler) is FlowSDESampler:
        assert fast.fused_reason(sampler, guidance) is not None  # the generic path ran
    else:
        assert fast.fused_reason(sampler, guidance) is None


def test_guidance_schedule_interval_step_schedule_and_use_norm(trained_like_model):
    model = trained_like_model.eval()
    guidance = ClassifierFreeGuidance(4.0, schedule="linear_increasing", interval=(0.2, 0.8))
    schedule = LinearSteps(6, 2)
    expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=guidance, num_steps=schedule,
                                     sampler=HeunSampler(), seed=5, use_norm=True)
    fast = FastTokenSampler(model, use_kernels=False)
    found = fast_tokens(model, fast, guidance, HeunSampler(), schedule, seed=5, use_norm=True)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    assert len(fast._token_steps) == len({schedule.steps_for(i, 6) for i in range(6)})


def test_steps_are_reused_across_generations(trained_like_model):
    """A second generation reuses the pooled cache, the decode step and the token step."""
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    guidance = guidance_for_scale(2.0)
    first = fast_tokens(model, fast, guidance, EulerSampler(), 3, seed=1)
    steps, decodes = dict(fast._token_steps), dict(fast._decode_steps)
    again = fast_tokens(model, fast, guidance, EulerSampler(), 3, seed=1)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert fast._token_steps == steps and fast._decode_steps == decodes
    other_shift = fast_tokens(model, fast, guidance, EulerSampler(), 3, seed=1, shift=3.0)
    assert fast._token_steps.keys() == steps.keys()  # new numbers, same step
    assert not torch.equal(other_shift, first)


def test_generations_alternating_between_sizes_keep_their_decode_steps(tiny_model):
    """Each pooled cache keeps its decode step (and so its captured graphs); caches from elsewhere share one."""
    fast = FastTokenSampler(tiny_model.eval(), use_kernels=False)
    buffers = fast._buffers_for(1, 2)
    small, large = fast.new_cache(2, 10), fast.new_cache(2, 300)
    first_small, first_large = fast._decode_step(small, buffers)[0], fast._decode_step(large, buffers)[0]
    assert first_small.cache is small and first_large.cache is large
    for _ in range(2):
        assert fast._decode_step(fast.new_cache(2, 10), buffers)[0] is first_small
        assert fast._decode_step(fast.new_cache(2, 300), buffers)[0] is first_large
    for _ in range(3):
        own = tiny_model.backbone.new_cache(2, 10)
        assert fast._decode_step(own, buffers)[0].cache is own
    assert len(fast._decode_steps) == 3


def test_decode_step_equals_backbone_forward(tiny_model):
    """The graph-ready step (all slots, future ones masked) equals a cached forward call."""
    model = tiny_model.eval()
    backbone = model.backbone
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2)
    reference_cache = cache.clone()
    embeds = torch.randn(4, 1, backbone.hidden_size)
    output = torch.zeros(4, backbone.hidden_size)
    step = DecodeStep(backbone, cache, embeds, output)
    step.start(next_positions)
    with torch.inference_mode():
        expected = []
        positions = next_positions.clone()
        for _ in range(3):
            expected.append(backbone(embeds, positions, torch.ones(4, 1, dtype=torch.bool), reference_cache)[:, 0])
            positions = positions + 1
            visible = step.visible()
            assert visible == min(cache.max_length, 256)
            step.compute(visible if len(expected) % 2 else None)  # a bucket of slots, or all of them
            step.advance()
            torch.testing.assert_close(output, expected[-1], rtol=1e-5, atol=1e-5)
    assert cache.length == reference_cache.length
    torch.testing.assert_close(cache.key_mask, reference_cache.key_mask)


def test_bad_inputs_are_named(tiny_model):
    model = tiny_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2, fast.new_cache)
    noise, _ = draw_noise(2, 0, 6, model.token_dim, 2, False)
    with pytest.raises(ValueError, match=r"hidden must have shape \(2, 64\) for 1 branch\(es\) x 2 image\(s\)"):
        fast.sample_tokens(hidden, cache, next_positions, noise, guidance=guidance_for_scale(1.0), num_steps=2)
    with pytest.raises(ValueError, match=r"noise must have shape \(R, T, 64\)"):
        fast.sample_tokens(hidden, cache, next_positions, noise[0], guidance=guidance_for_scale(2.0))
    long_noise, _ = draw_noise(2, 0, 400, model.token_dim, 2, False)
    with pytest.raises(ValueError, match="more image tokens do not fit"):
        fast.sample_tokens(hidden, cache, next_positions, long_noise, guidance=guidance_for_scale(2.0))
    with pytest.raises(TypeError, match="FastTokenSampler needs a BackboneCache .* found dict"):
        fast.sample_tokens(hidden, {"state": None}, next_positions, noise, guidance=guidance_for_scale(2.0))
    with pytest.raises(ValueError, match="capture=True needs the model on a CUDA device"):
        FastTokenSampler(model, capture=True)


def test_pooled_caches_round_up_and_are_emptied(tiny_model):
    fast = FastTokenSampler(tiny_model)
    cache = fast.new_cache(2, 10)
    assert cache.max_length == 256
    cache.reserve(None, 5)
    cache.commit(5)
    again = fast.new_cache(2, 200)
    assert again is cache and again.length == 0
    assert fast.new_cache(2, 300).max_length == 512


@pytest.mark.parametrize(("sampler", "candidates"), [("euler", 1), ("euler_maruyama", 2)])
def test_generate_tokens_takes_a_token_sampler(trained_like_model, sampler, candidates):
    model = trained_like_model.eval()
    settings = dict(height=32, width=32, cfg=3.0, num_steps=3, seed=7, sampler=sampler, candidates=candidates)
    expected, grid_h, grid_w = generate_tokens(model, ["a red circle", "grinning face"], **settings)
    found, *grid = generate_tokens(model, ["a red circle", "grinning face"], **settings,
                                   token_sampler=FastTokenSampler(model, fused_decode=True))
    assert grid == [grid_h, grid_w]
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)



def test_one_sampler_serves_the_same_rows_split_another_way(trained_like_model):
    """Two images without guidance, then one image with CFG: two backbone rows both times, but other
    buffers; the second generation must not decode into the first one's."""
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, capture=False, use_kernels=False)
    settings = dict(height=32, width=32, num_steps=3, seed=1, sampler="euler")
    for prompts, cfg in ((["a", "b"], 1.0), (["a"], 3.0)):
        expected, _, _ = generate_tokens(model, prompts, cfg=cfg, **settings)
        found, _, _ = generate_tokens(model, prompts, cfg=cfg, token_sampler=fast, **settings)
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)

def test_a_sampler_follows_its_model_to_another_dtype():
    from nextstep import build_model

    model = build_model("tiny", seed=0).eval()
    fast = FastTokenSampler(model, use_kernels=False)
    settings = dict(height=32, width=32, num_steps=2, cfg=2.0, seed=4)
    generate_tokens(model, ["a"], token_sampler=fast, **settings)
    model.to(torch.bfloat16)  # noticed without a reset
    expected, _, _ = generate_tokens(model, ["a"], **settings)
    found, _, _ = generate_tokens(model, ["a"], token_sampler=fast, **settings)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(found, expected, rtol=0.05, atol=0.05)
    fast.reset()  # and after an explicit reset
    torch.testing.assert_close(generate_tokens(model, ["a"], token_sampler=fast, **settings)[0], found)
    pooled = fast.new_cache(2, 40)
    model.to("meta")  # another device: a pooled cache of that size is not handed back
    moved = fast.new_cache(2, 40)
    assert moved is not pooled and moved.keys.device.type == "meta" and fast.device.type == "meta"


def test_a_token_sampler_of_another_model_is_refused(trained_like_model):
    from nextstep import build_model

    other = FastTokenSampler(build_model("tiny", seed=1))
    with pytest.raises(ValueError, match="token_sampler samples another model"):
        generate_tokens(trained_like_model, ["a red circle"], height=32, width=32, token_sampler=other)


def test_token_samplers_by_name_and_in_sampling_settings(trained_like_model):
    from nextstep.evaluation.sampling import SamplingSettings, generate_images
    from nextstep.fast.token_sampler import TOKEN_SAMPLERS, token_sampler_named

    model = trained_like_model.eval()
    assert token_sampler_named(model, "loop") is None
    int8 = token_sampler_named(model, "int8")
    assert int8.fused_decode and int8.decode_weights == "int8"
    with pytest.raises(ValueError, match="token sampler must be one of"):
        token_sampler_named(model, "graphs")
    with pytest.raises(ValueError, match="token_sampler"):
        SamplingSettings(token_sampler="graphs")
    assert set(TOKEN_SAMPLERS) == {"loop", "fast", "fused", "skinny", "int8"}
    settings = SamplingSettings(height=32, width=32, num_steps=2, batch_size=2)
    loop = generate_images(model, ["a red circle", "grinning face"], settings)
    fast = generate_images(model, ["a red circle", "grinning face"], SamplingSettings(
        height=32, width=32, num_steps=2, batch_size=2, token_sampler="fused"))
    for a, b in zip(loop, fast):
        assert (torch.tensor(list(a.tobytes())) - torch.tensor(list(b.tobytes()))).abs().max() <= 1


def test_a_head_that_prepares_its_velocity_otherwise_is_sampled_through_its_own_code(trained_like_model):
    import copy

    from nextstep.heads import FlowMatchingHead

    class HalfPrepared(FlowMatchingHead):
        def prepare(self, condition, times=None):
            fast = super().prepare(condition, times)
            return lambda x_t, t: 0.5 * fast(x_t, t)

    model = copy.deepcopy(trained_like_model).eval()
    head = HalfPrepared(model.image_head.config)
    head.load_state_dict(model.image_head.state_dict())
    model.image_head = head
    fast = FastTokenSampler(model, use_kernels=False)
    settings = dict(height=32, width=48, cfg=3.0, num_steps=4, seed=3)
    expected, _, _ = generate_tokens(model, PROMPTS, **settings)
    found, _, _ = generate_tokens(model, PROMPTS, token_sampler=fast, **settings)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    assert fast.fused_reason(EulerSampler(), guidance_for_scale(3.0)) is not None


def test_a_backbone_subclass_with_its_own_forward_or_modules_steps_through_them(tiny_model):
    """The graph-ready step runs Qwen2Backbone's own stack: a subclass that changes what a step computes
    is stepped through its forward, and samples the loop's tokens."""
    from nextstep.backbones.qwen2 import Qwen2Backbone, Qwen2MLP
    from nextstep.fast.decode_step import decode_step_reason

    class Scaled(Qwen2Backbone):
        def forward(self, *args, **kwargs):
            return 3.0 * super().forward(*args, **kwargs)

    class DoubledMLP(Qwen2MLP):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = tiny_model.eval()
    cache = model.backbone.new_cache(2, 16)
    assert decode_step_reason(model.backbone, cache) is None
    for change, reason in (
            (lambda: setattr(model.backbone, "__class__", Scaled), "Scaled overrides the forward of Qwen2Backbone"),
            (lambda: setattr(model.backbone.layers[0].mlp, "__class__", DoubledMLP),
             "Qwen2Backbone's layers.0.mlp is a DoubledMLP, not one of the modules Qwen2Backbone builds")):
        change()
        assert decode_step_reason(model.backbone, cache) == reason
        expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, num_steps=2, seed=3)
        found, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, num_steps=2, seed=3,
                                      token_sampler=FastTokenSampler(model, use_kernels=False))
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
        model.backbone.__class__ = Qwen2Backbone


def test_an_eager_fallback_is_logged_once_with_its_reason(tiny_model, caplog):
    from nextstep.backbones.qwen2 import Qwen2Backbone

    class Scaled(Qwen2Backbone):
        def forward(self, *args, **kwargs):
            return 2.0 * super().forward(*args, **kwargs)

    model = tiny_model.eval()
    model.backbone.__class__ = Scaled
    fast = FastTokenSampler(model, use_kernels=False)
    with caplog.at_level("INFO", logger="nextstep.fast.token_sampler"):
        for _ in range(2):
            generate_tokens(model, PROMPTS, height=32, width=32, num_steps=1, seed=0, token_sampler=fast)
    said = [record.getMessage() for record in caplog.records]
    assert said == ["decode steps run eagerly through the components' own code: Scaled overrides the forward of "
                    "Qwen2Backbone"]


@pytest.mark.parametrize("sampler", [EulerMaruyamaSampler(), FlowSDESampler()], ids=lambda s: type(s).__name__)
def test_a_step_schedule_with_a_stochastic_sampler_matches_generate_tokens(trained_like_model, sampler):
    """Per-token step noise is drawn for the longest schedule; a token with fewer steps takes its first slices."""
    model = trained_like_model.eval()
    schedule = LinearSteps(5, 2)
    expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=3.0, num_steps=schedule,
                                     sampler=sampler, seed=6)
    fast = FastTokenSampler(model, use_kernels=False)
    found = fast_tokens(model, fast, guidance_for_scale(3.0), sampler, schedule, seed=6)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_pooled_caches_of_another_dtype_are_other_caches(tiny_model):
    fast = FastTokenSampler(tiny_model)
    native = fast.new_cache(2, 10)
    half = fast.new_cache(2, 10, dtype=torch.bfloat16)
    assert native.keys.dtype == torch.float32 and half.keys.dtype == half.values.dtype == torch.bfloat16
    assert half is not native and fast.new_cache(2, 10) is native


def test_one_sampler_switching_use_norm_samples_as_generate_tokens_does_each_time(trained_like_model):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    guidance = guidance_for_scale(2.0)
    for use_norm in (False, True, False):
        expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=2.0, num_steps=3,
                                         sampler=EulerSampler(), seed=2, use_norm=use_norm)
        found = fast_tokens(model, fast, guidance, EulerSampler(), 3, seed=2, use_norm=use_norm)
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_a_decode_step_attends_over_the_fill_level_and_its_own_slot_rounded_up_to_a_bucket(tiny_model):
    from nextstep.fast.decode_step import VISIBLE_BUCKET

    backbone = tiny_model.backbone
    cache = backbone.new_cache(1, 3 * VISIBLE_BUCKET + 10)
    step = DecodeStep(backbone, cache, torch.zeros(1, 1, backbone.hidden_size), torch.zeros(1, backbone.hidden_size))
    for filled, visible in ((0, VISIBLE_BUCKET), (VISIBLE_BUCKET - 1, VISIBLE_BUCKET),
                            (VISIBLE_BUCKET, 2 * VISIBLE_BUCKET), (3 * VISIBLE_BUCKET, 3 * VISIBLE_BUCKET + 10)):
        cache.reserve(None, filled - cache.length)
        cache.commit(filled)
        assert step.visible() == visible, filled  # the step writes slot ``filled``: it must be visible


def test_a_cache_of_another_type_is_stepped_eagerly_and_samples_the_loop_s_tokens(trained_like_model):
    from nextstep.backbones.base import KVCache
    from nextstep.fast.decode_step import decode_step_reason

    class OwnCache(KVCache):
        pass

    def own_cache(rows, length):
        cache = model.backbone.new_cache(rows, length)
        cache.__class__ = OwnCache
        return cache

    model = trained_like_model.eval()
    guidance = guidance_for_scale(2.0)
    expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=2.0, num_steps=3,
                                     sampler=EulerSampler(), seed=4)
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2, own_cache)
    assert decode_step_reason(model.backbone, cache) == "the cache is a OwnCache, not a KVCache"
    noise, _ = draw_noise(len(PROMPTS), 4, GRID[0] * GRID[1], model.token_dim, 3, False)
    found = FastTokenSampler(model, use_kernels=False).sample_tokens(
        hidden, cache, next_positions, noise, guidance=guidance, sampler=EulerSampler(), num_steps=3)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_a_call_captured_on_the_cpu_says_why_and_runs_eagerly():
    from nextstep.fast.cuda_graph import CapturedCall

    calls = []
    call = CapturedCall(lambda: calls.append(1), name="counting step")
    assert call.capture(torch.device("cpu")) is False
    assert not call.captured and call.graph is None
    assert call.failure is not None and "CUDA" in call.failure and "cpu" in call.failure
    assert calls == []  # nothing warmed up on a device that cannot record
    call()
    call()
    assert calls == [1, 1]


def test_pooled_caches_hold_the_fewest_whole_buckets_that_fit():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nextstep import build_model
    from nextstep.fast.token_sampler import CACHE_BUCKET

    fast = FastTokenSampler(build_model("tiny", seed=0))

    @settings(max_examples=25, deadline=None)
    @given(max_length=st.one_of(st.integers(1, 3 * CACHE_BUCKET), st.sampled_from([CACHE_BUCKET, 2 * CACHE_BUCKET])))
    def holds(max_length):
        capacity = fast.new_cache(1, max_length).max_length
        assert capacity % CACHE_BUCKET == 0 and max_length <= capacity < max_length + CACHE_BUCKET, max_length

    holds()


def test_a_cache_with_room_for_every_token_but_the_last_is_enough(trained_like_model):
    """The last token is sampled but never decoded: the cache ends as full as generate_tokens leaves it."""
    model = trained_like_model.eval()
    count = GRID[0] * GRID[1]

    def tight_cache(rows, length):
        return model.backbone.new_cache(rows, length - 1)

    expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=2.0, num_steps=3,
                                     sampler=EulerSampler(), seed=4)
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2, tight_cache)
    prompt_length = cache.length
    noise, _ = draw_noise(len(PROMPTS), 4, count, model.token_dim, 3, False)
    found = FastTokenSampler(model, use_kernels=False).sample_tokens(
        hidden, cache, next_positions, noise, guidance=guidance_for_scale(2.0), sampler=EulerSampler(), num_steps=3)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    assert cache.length == cache.max_length == prompt_length + count - 1


def test_step_noise_drawn_for_more_steps_is_read_from_its_first_slices(trained_like_model):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    guidance, sampler = guidance_for_scale(3.0), EulerMaruyamaSampler()
    noise, step_noise = draw_noise(len(PROMPTS), 1, GRID[0] * GRID[1], model.token_dim, 5, True)
    samples = []
    for given_noise in (step_noise, step_noise[:, :3].clone()):
        hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2, fast.new_cache)
        samples.append(fast.sample_tokens(hidden, cache, next_positions, noise, given_noise, guidance=guidance,
                                          sampler=sampler, num_steps=3))
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)


def test_a_deterministic_sampler_ignores_the_step_noise_it_is_given(trained_like_model):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    guidance = guidance_for_scale(2.0)
    without = fast_tokens(model, fast, guidance, HeunSampler(), 3, seed=2)
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2, fast.new_cache)
    noise, _ = draw_noise(len(PROMPTS), 2, GRID[0] * GRID[1], model.token_dim, 3, False)
    stray = torch.randn(1, 1, len(PROMPTS), model.token_dim)
    found = fast.sample_tokens(hidden, cache, next_positions, noise, stray, guidance=guidance,
                               sampler=HeunSampler(), num_steps=3)
    torch.testing.assert_close(found, without, rtol=0, atol=0)


def test_an_in_projector_of_another_dtype_keeps_the_token_steps_generic(trained_like_model):
    import copy

    model = copy.deepcopy(trained_like_model).eval()
    model.image_in_projector.double()
    reason = FastTokenSampler(model, use_kernels=False).fused_reason(EulerSampler(), guidance_for_scale(2.0))
    assert reason is not None and "torch.float64" in reason and "mix dtypes" in reason


def test_a_decode_step_on_a_full_cache_refuses_to_step(tiny_model):
    backbone = tiny_model.backbone
    cache = backbone.new_cache(1, 4)
    step = DecodeStep(backbone, cache, torch.zeros(1, 1, backbone.hidden_size), torch.zeros(1, backbone.hidden_size))
    cache.reserve(None, 3)
    cache.commit(3)
    step.check_room()  # the last slot is free
    cache.reserve(None, 1)
    cache.commit(4)
    with pytest.raises(ValueError, match=r"the cache is full \(4 slots\)"):
        step.check_room()


def test_a_decode_step_snapshot_restores_positions_slot_and_key_mask(tiny_model):
    model = tiny_model.eval()
    backbone = model.backbone
    hidden, cache, next_positions = prefill(model, PROMPTS, GRID, 2)
    step = DecodeStep(backbone, cache, torch.randn(4, 1, backbone.hidden_size), torch.zeros(4, backbone.hidden_size))
    step.start(next_positions)
    positions, slot, key_mask = step.positions.clone(), step.slot.clone(), cache.key_mask.clone()
    restore = step.snapshot()
    with torch.inference_mode():
        step.compute(step.visible())
    assert not torch.equal(cache.key_mask, key_mask) and not torch.equal(step.slot, slot)
    restore()
    assert torch.equal(step.positions, positions) and torch.equal(step.slot, slot)
    assert torch.equal(cache.key_mask, key_mask)


def test_one_sampler_switching_between_grids_with_the_same_evaluation_times_samples_each_correctly(
        trained_like_model):
    """Euler-Maruyama ending at t=1 or short of it evaluates at the same times; only its last step differs."""
    from nextstep.samplers.euler_maruyama import EulerMaruyamaSamplerConfig

    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    guidance = guidance_for_scale(2.0)
    for to_one in (False, True, False):
        sampler = EulerMaruyamaSampler(EulerMaruyamaSamplerConfig(to_one=to_one))
        expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=2.0, num_steps=3, sampler=sampler,
                                         shift=2.0, seed=2)
        found = fast_tokens(model, fast, guidance, sampler, 3, seed=2, shift=2.0)
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    assert len(fast._token_steps) == 1


@pytest.mark.parametrize("sampler", [HeunSampler(), EulerMaruyamaSampler()], ids=lambda s: type(s).__name__)
def test_modulations_computed_per_stage_sample_the_same_tokens(trained_like_model, sampler):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False, max_table_elements=0)
    expected, _, _ = generate_tokens(model, PROMPTS, height=32, width=48, cfg=3.0, num_steps=3, sampler=sampler,
                                     seed=3)
    found = fast_tokens(model, fast, guidance_for_scale(3.0), sampler, 3, seed=3)
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
    assert fast._token_steps and not any(step.tabulate for step, _ in fast._token_steps.values())


def test_a_normalised_token_uses_the_epsilon_of_generate_tokens(tiny_model):
    """A token of tiny spread, where LayerNorm's epsilon dominates its variance."""
    import torch.nn.functional as F

    from nextstep.fast.token_step import GenericTokenStep, TokenStepBuffers

    class Shrinking:
        def sample(self, velocity, noise, grid, step_noise):
            return noise * 1e-3

    model = tiny_model.eval()
    buffers = TokenStepBuffers.allocate(2, 1, model.backbone.hidden_size, model.token_dim,
                                        device=torch.device("cpu"), dtype=torch.float32)
    step = GenericTokenStep(model, Shrinking(), guidance_for_scale(1.0), rows=2, buffers=buffers, use_norm=True)
    noise = torch.randn(2, model.token_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        step.compute(noise, torch.linspace(0, 1, 3), None, None, 0.0)
        expected = F.layer_norm(noise * 1e-3, (model.token_dim,), eps=1e-6)
        torch.testing.assert_close(buffers.token, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(buffers.embeds[:, 0], model.image_in_projector(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_blocks", [False, True], ids=["norm_kernels", "block_kernels"])
def test_the_fused_head_reads_each_layer_norm_epsilon_of_the_head(fused_blocks):
    from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity
    from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig

    torch.manual_seed(0)
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=8, depth=2)).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.5)
    head.net.res_blocks[0].in_ln.eps = 0.3
    head.net.final_layer.norm_final.eps = 0.7
    velocity = FusedFlowMatchingVelocity(head, use_kernels=False, fused_blocks=fused_blocks)
    times, condition, x_t = torch.tensor([0.2, 0.7]), torch.randn(3, 8), torch.randn(3, 4)
    with torch.no_grad():
        table = velocity.modulations(velocity.time_embedding(times), velocity.condition_embedding(condition))
        for index, t in enumerate(times):
            torch.testing.assert_close(velocity(x_t, table[index]), head.velocity(x_t, t.expand(3), condition),
                                       rtol=1e-5, atol=1e-5)
    assert not FusedFlowMatchingVelocity(head, persistent=True).persistent  # one epsilon for all blocks only
