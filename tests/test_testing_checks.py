"""The contract checks of `nextstep.testing` catch broken components, naming what breaks."""

import re

import pytest
import torch

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig
from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig
from nextstep.samplers import (
    ClassifierFreeGuidance,
    EulerMaruyamaSampler,
    EulerSampler,
    HeunSampler,
    MidpointSampler,
)
from nextstep.samplers.base import check_step_noise
from nextstep.testing import check_backbone, check_image_head, check_sampler, check_text_tokenizer
from nextstep.tokenizers import ByteTextTokenizer

HEAD = FlowMatchingHeadConfig(token_dim=16, condition_dim=32, width=32, depth=2)


def test_a_working_head_passes_and_keeps_its_weights():
    head = FlowMatchingHead(HEAD)
    before = {key: value.clone() for key, value in head.state_dict().items()}
    check_image_head(head)
    assert all(torch.equal(before[key], value) for key, value in head.state_dict().items())
    assert all(p.grad is None for p in head.parameters()) and head.training


class DoubledPrepare(FlowMatchingHead):
    def prepare(self, condition, times=None):
        fast = super().prepare(condition, times)
        return lambda x_t, t: 2 * fast(x_t, t)


class RowCoupled(FlowMatchingHead):
    def velocity(self, x_t, t, condition):
        v = super().velocity(x_t, t, condition)
        return (v - v.mean(0)) / (v.std(0, unbiased=False) + 1e-6)


class CrashingLoss(FlowMatchingHead):
    def check_shapes(self, **tensors):  # no shape check: a wrong width fails deep inside
        pass

    def velocity(self, x_t, t, condition):
        return self.net(x_t, t, condition)


class IgnoresCondition(FlowMatchingHead):
    def velocity(self, x_t, t, condition):
        return super().velocity(x_t, t, torch.zeros_like(condition))

    def prepare(self, condition, times=None):
        return lambda x_t, t: self.velocity(x_t, t, condition)


class IgnoresTime(FlowMatchingHead):
    def velocity(self, x_t, t, condition):
        return super().velocity(x_t, torch.full_like(t, 0.5), condition)

    def prepare(self, condition, times=None):
        return lambda x_t, t: self.velocity(x_t, t, condition)


class ShuffledConditions(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition.roll(1, 0), generator)  # each target trained on another's condition


class AnyRows(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition[: target.shape[0]], generator)  # extra condition rows go unnoticed


class IgnoresState(FlowMatchingHead):
    def velocity(self, x_t, t, condition):
        return super().velocity(torch.zeros_like(x_t), t, condition)

    def prepare(self, condition, times=None):
        return lambda x_t, t: self.velocity(x_t, t, condition)


class IgnoresGenerator(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition, torch.Generator(device=target.device).manual_seed(1234))


class BatchStandardisedTarget(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss((target - target.mean(0)) / target.std(0), condition, generator)


class DetachedCondition(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition.detach(), generator)


@pytest.mark.parametrize("cls, message", [
    (IgnoresState, "IgnoresState: velocity does not change with the state x_t"),
    (IgnoresGenerator, "IgnoresGenerator: loss is the same under another generator seed"),
    (BatchStandardisedTarget, "BatchStandardisedTarget: another target for row 0 changes the loss of other rows"),
    (DetachedCondition, "DetachedCondition: no gradient reaches the condition through loss"),
    (IgnoresCondition, "IgnoresCondition: velocity does not change with the condition"),
    (IgnoresTime, "IgnoresTime: velocity does not change with the time"),
    (ShuffledConditions, "ShuffledConditions: the loss of row 0 does not change with its condition"),
    (AnyRows, r"AnyRows: loss of a condition of N \+ 1 rows should raise ValueError"),
    (DoubledPrepare, r"DoubledPrepare: prepare\(condition\) differs from velocity"),
    (RowCoupled, "RowCoupled: rows of velocity depend on the other rows of the batch"),
    (CrashingLoss, "CrashingLoss: loss of a target of width D \\+ 1 should raise ValueError naming what was "
                   "expected and found, raised RuntimeError"),
])
def test_a_broken_head_is_named(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_image_head(cls(HEAD))


class UnkeptPromise(MidpointSampler):
    def evaluation_times(self, time_grid):
        return time_grid[:-1]  # leaves out the midpoints the solver evaluates at


class Inexact(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(velocity_fn, noise, time_grid * 0.9, step_noise)  # stops short of the end


class OneShot(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(velocity_fn, noise, time_grid[[0, -1]])  # one step, whatever the grid


class FrozenState(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        x = noise
        for t, dt in zip(time_grid[:-1], time_grid.diff()):
            x = x + dt * velocity_fn(noise, t.expand(noise.shape[0]))  # always the velocity at the start
        return x


class ReversedTime(EulerSampler):
    def evaluation_times(self, time_grid):
        return None

    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(lambda x, t: velocity_fn(x, 1 - t), noise, time_grid)


class BatchMeanHeun(HeunSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        x = noise
        for t0, t1 in zip(time_grid[:-1], time_grid[1:]):
            start = velocity_fn(x, t0.expand(x.shape[0]))
            end = velocity_fn(x + (t1 - t0) * start, t1.expand(x.shape[0]))
            change = end - start  # zero for a constant velocity: rows couple only where the velocity varies
            x = x + (t1 - t0) * ((start + end) / 2 + 0.1 * (change.mean(0) - change))
        return x


class FirstNoiseOnly(EulerMaruyamaSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        if step_noise is not None:
            step_noise = step_noise[:1].expand(step_noise.shape[0], -1, -1)
        return super().sample(velocity_fn, noise, time_grid, step_noise)


class NoDeviceArgument(EulerSampler):
    def make_time_grid(self, num_steps, shift=1.0):
        return super().make_time_grid(num_steps, shift)


class NeedsItsNoise(EulerMaruyamaSampler):
    """A valid stochastic sampler that refuses to run without its step noise."""

    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        check_step_noise(self, step_noise, noise, time_grid.shape[0] - 1)
        return super().sample(velocity_fn, noise, time_grid, step_noise)


class IgnoresGrid(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):  # its own uniform grid over [0, 1]
        uniform = torch.linspace(0, 1, time_grid.shape[0], dtype=time_grid.dtype)
        return super().sample(velocity_fn, noise, uniform, step_noise)


class UnsortedPromise(MidpointSampler):
    def evaluation_times(self, time_grid):
        return torch.cat([time_grid[:-1], time_grid[:-1] + 0.5 * time_grid.diff()])


class Jitter(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(velocity_fn, noise + 1e-3 * torch.randn_like(noise), time_grid, step_noise)


class FlippedScore(EulerMaruyamaSampler):
    """Euler-Maruyama of the flow SDE (score from the velocity) with the score term's sign flipped."""

    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        x = noise
        for index, (t, dt) in enumerate(zip(time_grid[:-1], time_grid.diff())):
            v = velocity_fn(x, t.expand(x.shape[0]))
            if step_noise is None:
                x = x + dt * v
                continue
            score = (t * v - x) / (1 - t)
            x = x + dt * (v - 0.5 * score) + (dt ** 0.5) * step_noise[index]
        return x


class DoubleTimes(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(lambda x, t: velocity_fn(x, t.double()), noise, time_grid, step_noise)


@pytest.mark.parametrize("sampler, message", [
    (DoubleTimes(), r"DoubleTimes: t must be in the grid's dtype torch.float32, found torch.float64"),
    (IgnoresGrid(), r"IgnoresGrid: a grid that stops at t = .* is not integrated to there"),
    (UnsortedPromise(), r"UnsortedPromise: evaluation_times must give increasing \(E,\) times"),
    (Jitter(), r"Jitter: two calls with the same inputs give different results"),
    (FlippedScore(), r"FlippedScore: sampling the exact flow to N\(0.5, 0.3\^2\) in 50 steps gives mean .* "
                     r"standard deviation"),
    (UnkeptPromise(), r"UnkeptPromise: evaluation_times promised .* but the velocity was called at"),
    (Inexact(), r"Inexact: a constant velocity is not integrated exactly in 1 step\(s\)"),
    (OneShot(), r"OneShot: the grids of shift 2.0 and 1.0 give the same result in 3 steps"),
    (FrozenState(), r"FrozenState: on dx/dt = -x \+ 2t the error with 10 steps .* is not below half"),
    (ReversedTime(), r"ReversedTime: on dx/dt = -x \+ 2t the error with 40 steps .* is not below half"),
    (BatchMeanHeun(), r"BatchMeanHeun: rows of the result depend on each other \(for a velocity of the state"),
    (FirstNoiseOnly(), r"FirstNoiseOnly: is stochastic but ignores the noise of step 1 of 3"),
    (NoDeviceArgument(), r"NoDeviceArgument: make_time_grid must take device= and dtype= as generation passes"),
])
def test_a_broken_sampler_is_named(sampler, message):
    with pytest.raises(AssertionError, match=message):
        check_sampler(sampler)


def test_a_stochastic_sampler_that_needs_its_noise_passes_and_the_random_state_is_kept():
    state = torch.random.get_rng_state()
    check_sampler(NeedsItsNoise())
    assert torch.equal(torch.random.get_rng_state(), state)


class IgnoresPadding(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if attention_mask is not None and cache is None and attention_mask.dtype == torch.bool:
            attention_mask = None
        return super().forward(embeds, positions, attention_mask, cache)


class IgnoresPaddingWithACache(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if cache is not None:
            attention_mask = None
        return super().forward(embeds, positions, attention_mask, cache)


class NaNOut(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        return super().forward(embeds, positions, attention_mask, cache) * float("nan")


class WithDropout(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        return super().forward(torch.nn.functional.dropout(embeds, 0.1, self.training), positions, attention_mask,
                               cache)


class ForgetfulCrop(Qwen2Backbone):
    def new_cache(self, batch_size, max_length, **kwargs):
        cache = super().new_cache(batch_size, max_length, **kwargs)
        cache.crop = lambda length: None  # keeps every slot
        return cache


class NoDtypeCache(Qwen2Backbone):
    def new_cache(self, batch_size, max_length):
        return super().new_cache(batch_size, max_length)


class ChunkPositions(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if cache is not None and embeds.shape[1] > 1 and bool((positions[:, 0] > 0).all()):
            positions = positions[:, :1].expand_as(positions)  # every token of a later step at the step's start
        return super().forward(embeds, positions, attention_mask, cache)


def test_backbones_that_break_cached_padding_or_give_nan_are_named_and_the_random_state_is_kept():
    config = Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                 num_kv_heads=2)
    with pytest.raises(AssertionError, match="IgnoresPaddingWithACache: a row read into a cache beside a left-padded "
                                             "row differs from the row alone"):
        check_backbone(IgnoresPaddingWithACache(config))
    with pytest.raises(AssertionError, match=r"NaNOut: forward is not finite: 448 NaN and 0 infinite of 448 values"):
        check_backbone(NaNOut(config))
    with pytest.raises(AssertionError, match=r"ForgetfulCrop: decode steps after crop\(prompt length\) raised"):
        check_backbone(ForgetfulCrop(config))
    with pytest.raises(AssertionError, match=r"NoDtypeCache: new_cache must take device= and dtype= as generation"):
        check_backbone(NoDtypeCache(config))
    with pytest.raises(AssertionError, match=r"ChunkPositions: a step of two tokens after a prefill differs"):
        check_backbone(ChunkPositions(config))
    dropping = WithDropout(config)
    state = torch.random.get_rng_state()
    check_backbone(dropping)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_backbone_that_attends_to_padding_is_named():
    config = Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                 num_kv_heads=2)
    check_backbone(Qwen2Backbone(config))
    with pytest.raises(AssertionError, match="IgnoresPadding: a left-padded row differs from the same row alone"):
        check_backbone(IgnoresPadding(config))


class Injectable(ByteTextTokenizer):
    def encode(self, text):
        if text == "<|begin_of_image|>":
            return [self.begin_of_image_id]
        return super().encode(text)


class EndsItself(ByteTextTokenizer):
    def encode(self, text):
        head, marker, tail = text.partition("<|endoftext|>")
        if not marker:
            return super().encode(text)
        return super().encode(head) + [self.eos_id] + super().encode(tail)


class BeyondItsIds(ByteTextTokenizer):
    def encode(self, text):
        return [i + self.input_vocab_size if i == ord("a") else i for i in super().encode(text)]


class EndIsImageArea(ByteTextTokenizer):
    def special_token_id(self, token):
        return super().special_token_id("<|image_area|>" if token == "<|endoftext|>" else token)


class EndOutsideVocabulary(ByteTextTokenizer):
    def special_token_id(self, token):
        return 10_000 if token == "<|endoftext|>" else super().special_token_id(token)


class QIsBeginOfImage(ByteTextTokenizer):
    def special_token_id(self, token):
        return ord("q") if token == "<|begin_of_image|>" else super().special_token_id(token)


class QEncodesAsBeginOfImage(ByteTextTokenizer):
    def encode(self, text):
        return [self.begin_of_image_id if i == ord("q") else i for i in super().encode(text)]


class DropsSpecialIds(ByteTextTokenizer):
    def decode(self, ids):
        return super().decode([i for i in ids if i < 256])


class OnlyTheRequiredTokens(ByteTextTokenizer):
    def special_token_id(self, token):
        if "thinking" in token or "prompt_refinement" in token:
            raise ValueError(f"unknown special token {token!r}")
        return super().special_token_id(token)


class RefusesTheEmptyPrompt(ByteTextTokenizer):
    def encode(self, text):
        if not text:
            raise ValueError("nothing to encode")
        return super().encode(text)


class LacksPlaceholder(ByteTextTokenizer):
    def special_token_id(self, token):
        if token == "<|image_placeholder|>":
            raise ValueError(f"unknown special token {token!r}")
        return super().special_token_id(token)


@pytest.mark.parametrize("tokenizer, message", [
    (EndsItself(), re.escape("EndsItself: the text '<|endoftext|>' encodes to the special token <|endoftext|>")),
    (BeyondItsIds(), r"BeyondItsIds: encode\('a red circle .*'\) gives ids outside \[0, \d+\)"),
    (EndIsImageArea(), r"EndIsImageArea: special tokens share ids: \{'<\|endoftext\|>': \d+, '<\|image_area"),
    (EndOutsideVocabulary(), r"EndOutsideVocabulary: special token ids outside the vocabulary .*endoftext"),
    (QIsBeginOfImage(), r"QIsBeginOfImage: decode\(\[113\]\) must render the special token <\|begin_of_image"),
    (QEncodesAsBeginOfImage(), r"QEncodesAsBeginOfImage: the character 'q' encodes to the special token "
                               r"<\|begin_of_image\|>"),
    (DropsSpecialIds(), r"DropsSpecialIds: decode\(\[\d+\]\) must render the special token <\|endoftext\|>"),
    (RefusesTheEmptyPrompt(), r"RefusesTheEmptyPrompt: encode\(''\) must give a list .* raised ValueError"),
    (LacksPlaceholder(), r"LacksPlaceholder: special_token_id\('<\|image_placeholder\|>'\) must give an id"),
])
def test_a_tokenizer_that_lets_prompts_end_themselves_or_gives_unknown_ids_is_named(tokenizer, message):
    with pytest.raises(AssertionError, match=message):
        check_text_tokenizer(tokenizer)


def test_an_image_tokenizer_whose_decode_mixes_images_is_named():
    from nextstep.testing import check_image_tokenizer
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    class MixingDecode(FluxVAE):
        def decode(self, latents):
            return super().decode(latents - latents.mean(0, keepdim=True))

    config = FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
    with pytest.raises(AssertionError, match="MixingDecode: a decoded image depends on the other latents"):
        check_image_tokenizer(MixingDecode(config))


def test_image_tokenizers_that_mix_sampled_latents_or_lay_tokens_out_otherwise_are_named():
    from einops import rearrange

    from nextstep.testing import check_image_tokenizer
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    class SampledBatchMixing(FluxVAE):
        def encode(self, images, generator=None):
            latents = super().encode(images, generator)
            return (latents - latents.mean(0, keepdim=True)) / latents.std(0, keepdim=True)

    class ColumnMajorTokens(FluxVAE):
        def patchify(self, latents):
            return rearrange(latents, "b c (h p) (w q) -> b (w h) (p q c)", p=self.patch_size, q=self.patch_size)

        def unpatchify(self, tokens, grid_height, grid_width):
            p = self.patch_size
            return rearrange(tokens, "b (w h) (p q c) -> b c (h p) (w q)", h=grid_height, w=grid_width, p=p, q=p)

    config = FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
    with pytest.raises(AssertionError, match="SampledBatchMixing: an image's latents change when only another image"):
        check_image_tokenizer(SampledBatchMixing(config.replace(deterministic=False)))
    with pytest.raises(AssertionError, match=r"ColumnMajorTokens: patchify must lay tokens out in raster order"):
        check_image_tokenizer(ColumnMajorTokens(config))


def test_a_tokenizer_that_lets_prompts_write_special_tokens_is_named():
    check_text_tokenizer(ByteTextTokenizer())
    check_text_tokenizer(OnlyTheRequiredTokens())  # the thinking and prompt-refinement tokens are optional
    with pytest.raises(AssertionError, match=re.escape("Injectable: the text '<|begin_of_image|>' encodes to the "
                                                       "special")):
        check_text_tokenizer(Injectable())


class RowNormalisedGuidance(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        guided = super().combine(predictions, t, progress)
        return guided / guided.norm(dim=-1).mean()  # one scale for the whole batch


class AllBranches(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        return predictions


class InPlace(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        predictions[1].zero_()
        return super().combine(predictions, t, progress)


class Overshoots(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        return predictions[1] + self.scale * (predictions[0] - predictions[1]) + 0.1  # a bias even when branches agree


@pytest.mark.parametrize("guidance, message", [
    (RowNormalisedGuidance(3.0), r"RowNormalisedGuidance: rows of the guided velocity depend on the other rows"),
    (AllBranches(3.0), r"AllBranches: combine must give \(N, D\) = \(5, 8\), found \(2, 5, 8\)"),
    (InPlace(3.0), "InPlace: combine changed the predictions it was given"),
    (Overshoots(3.0), "Overshoots: where every branch predicts the same velocity, combine must return it"),
])
def test_a_broken_guidance_is_named(guidance, message):
    from nextstep.testing import check_guidance

    with pytest.raises(AssertionError, match=message):
        check_guidance(guidance)


def test_a_head_whose_prepare_is_slightly_off_is_named():
    class SlightlyOffPrepare(FlowMatchingHead):
        def prepare(self, condition, times=None):
            fast = super().prepare(condition, times)
            return lambda x_t, t: fast(x_t, t) + 1e-3

    with pytest.raises(AssertionError, match=r"SlightlyOffPrepare: prepare\(condition\) differs from velocity"):
        check_image_head(SlightlyOffPrepare(HEAD))


class OffWithRawTimes(FlowMatchingHead):
    def prepare(self, condition, times=None):
        fast = super().prepare(condition, times)
        if isinstance(times, torch.Tensor):
            return lambda x_t, t: fast(x_t, t) + 1e-2
        return fast


class OffWithPreparedTimes(FlowMatchingHead):
    def prepare(self, condition, times=None):
        fast = super().prepare(condition, times)
        if times is not None and not isinstance(times, torch.Tensor):
            return lambda x_t, t: fast(x_t, t) + 1e-2
        return fast


class DoublePrecisionLoss(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition, generator).double()


class NegativeLoss(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition, generator) - 10.0


class DriftingLoss(FlowMatchingHead):
    calls = 0

    def loss(self, target, condition, generator=None):
        self.calls += 1
        return super().loss(target, condition, generator) + 1e-3 * self.calls


class CropsWideConditions(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition[:, :self.condition_dim], generator)


class BatchMeanCondition(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition + condition.mean(0), generator)


class IgnoresTarget(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(torch.zeros_like(target), condition, generator)


class WideVelocity(FlowMatchingHead):
    def velocity(self, x_t, t, condition):
        v = super().velocity(x_t, t, condition)
        return torch.cat([v, v[:, :1]], 1)


class ColumnLoss(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target, condition, generator)[:, None]


class InfiniteConditionGradient(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        if condition.requires_grad:
            condition = condition + 0
            condition.register_hook(lambda grad: grad + float("inf"))
        return super().loss(target, condition, generator)


@pytest.mark.parametrize("cls, message", [
    (OffWithRawTimes, r"OffWithRawTimes: prepare\(condition, times\) differs from velocity at those times"),
    (OffWithPreparedTimes, r"OffWithPreparedTimes: prepare\(condition, prepare_times\(times\)\) differs from velocity"),
    (DoublePrecisionLoss, "DoublePrecisionLoss: loss must be float32, found torch.float64"),
    (NegativeLoss, "NegativeLoss: loss must be finite and >= 0"),
    (DriftingLoss, "DriftingLoss: loss differs between two calls with the same generator seed"),
    (CropsWideConditions, r"CropsWideConditions: loss of a condition of width C \+ 1 should raise ValueError, and was "
                          "accepted"),
    (BatchMeanCondition, "BatchMeanCondition: another condition for row 0 changes the loss of other rows"),
    (IgnoresTarget, "IgnoresTarget: the loss of row 0 does not change with its target"),
    (WideVelocity, r"WideVelocity: velocity must be \(N, D\) = \(5, 16\), found \(5, 17\)"),
    (ColumnLoss, r"ColumnLoss: loss must be \(N,\) = \(5,\), found \(5, 1\)"),
    (InfiniteConditionGradient, "InfiniteConditionGradient: the gradient of the condition is not finite"),
])
def test_a_head_with_a_wrong_prepare_loss_or_shape_is_named(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_image_head(cls(HEAD))


def test_every_parameter_gets_a_gradient_names_missing_zero_and_non_finite_gradients():
    from nextstep.testing import assert_every_parameter_gets_a_gradient

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Parameter(torch.ones(3))
            self.other = torch.nn.Parameter(torch.ones(3))

    module = Two()
    module.used.sum().backward()
    with pytest.raises(AssertionError, match=re.escape("Two: no gradient reaches ['other']")):
        assert_every_parameter_gets_a_gradient(module)
    module.zero_grad(set_to_none=True)
    (module.used.sum() + 0 * module.other.sum()).backward()
    with pytest.raises(AssertionError, match=re.escape("Two: zero gradient for ['other']")):
        assert_every_parameter_gets_a_gradient(module)
    module.other.grad = torch.full((3,), float("nan"))
    with pytest.raises(AssertionError, match=re.escape("Two: non-finite gradient for ['other']")):
        assert_every_parameter_gets_a_gradient(module)
    module.other.grad = torch.ones(3)
    assert_every_parameter_gets_a_gradient(module)


class WrongCachedSteps(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        out = super().forward(embeds, positions, attention_mask, cache)
        if cache is not None and attention_mask is None and embeds.shape[1] == 1:
            out = out + 1e-2
        return out


class RoomyCache(Qwen2Backbone):
    def new_cache(self, batch_size, max_length, **kwargs):
        return super().new_cache(batch_size, max_length + 1, **kwargs)


class PaddingShiftsEveryRow(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        out = super().forward(embeds, positions, attention_mask, cache)
        if cache is None and attention_mask is not None and attention_mask.dtype == torch.bool:
            out = out + 0.1 * (~attention_mask).any()
        return out


class PackingLeaks(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if attention_mask is not None and attention_mask.dtype == torch.int64:
            attention_mask = attention_mask != 0  # documents attend to the documents before them
        return super().forward(embeds, positions, attention_mask, cache)


class UnusedParameter(Qwen2Backbone):
    def __init__(self, config):
        super().__init__(config)
        self.unused = torch.nn.Parameter(torch.ones(3))


class ShiftedPaddedDecoding(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if cache is not None and attention_mask is not None and embeds.shape[1] == 1:
            positions = positions + 1
        return super().forward(embeds, positions, attention_mask, cache)


class ShortCrop(Qwen2Backbone):
    def new_cache(self, batch_size, max_length, **kwargs):
        cache = super().new_cache(batch_size, max_length, **kwargs)
        crop = cache.crop
        cache.crop = lambda length: crop(length - 1)
        return cache


class SelectsTheFirstRow(Qwen2Backbone):
    def new_cache(self, batch_size, max_length, **kwargs):
        cache = super().new_cache(batch_size, max_length, **kwargs)
        select_rows = cache.select_rows
        cache.select_rows = lambda rows: select_rows(torch.zeros_like(rows))
        return cache


class ExtraTokenEmbed(Qwen2Backbone):
    def embed(self, input_ids):
        embeds = super().embed(input_ids)
        return torch.cat([embeds[:, :1], embeds], 1)


class RefusesPackingUnusedParameter(UnusedParameter):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if attention_mask is not None and attention_mask.dtype == torch.int64:
            raise ValueError("packed documents are not supported")
        return super().forward(embeds, positions, attention_mask, cache)


@pytest.mark.parametrize("cls, message", [
    (WrongCachedSteps, "WrongCachedSteps: a prefill and cached decode steps differ from the full forward"),
    (RoomyCache, "RoomyCache: a step past the cache's capacity should raise ValueError, and was accepted"),
    (PaddingShiftsEveryRow, "PaddingShiftsEveryRow: a row differs beside a left-padded row"),
    (PackingLeaks, "PackingLeaks: the second of two packed documents differs from it alone"),
    (UnusedParameter, re.escape("UnusedParameter: no gradient reaches ['unused']")),
    (ShiftedPaddedDecoding, "ShiftedPaddedDecoding: decode steps after a left-padded prefill differ from the row "
                            "alone"),
    (ShortCrop, r"ShortCrop: decode steps after crop\(prompt length\) differ from the first ones"),
    (SelectsTheFirstRow, r"SelectsTheFirstRow: a cache of selected rows \(select_rows\) decodes otherwise"),
    (ExtraTokenEmbed, r"ExtraTokenEmbed: embed must give \(B, L, H\) = \(2, 7, 32\), found \(2, 8, 32\)"),
    (RefusesPackingUnusedParameter, re.escape("RefusesPackingUnusedParameter: no gradient reaches ['unused']")),
])
def test_a_backbone_with_wrong_cached_decoding_packing_or_gradients_is_named(cls, message):
    config = Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                 num_kv_heads=2)
    with pytest.raises(AssertionError, match=message):
        check_backbone(cls(config))


def test_a_backbone_that_fails_on_packed_documents_other_than_by_value_error_does_not_pass():
    class PackingCrashes(Qwen2Backbone):
        def forward(self, embeds, positions, attention_mask=None, cache=None):
            if attention_mask is not None and attention_mask.dtype == torch.int64:
                raise RuntimeError("packed documents are not supported")
            return super().forward(embeds, positions, attention_mask, cache)

    config = Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                 num_kv_heads=2)
    with pytest.raises(AssertionError, match="PackingCrashes: packed documents must each equal the document alone "
                                             "or be refused with ValueError, found RuntimeError: packed documents "
                                             "are not supported"):
        check_backbone(PackingCrashes(config))


class NoBranches(ClassifierFreeGuidance):
    num_branches = 0


class DoublePrecisionGuidance(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        return super().combine(predictions, t, progress).double()


class DriftingGuidance(ClassifierFreeGuidance):
    calls = 0

    def combine(self, predictions, t=None, progress=0.0):
        self.calls += 1
        return super().combine(predictions, t, progress) + 1e-3 * self.calls


class OvershootsAtTheEnd(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        guided = super().combine(predictions, t, progress)
        return 2 * guided if progress >= 1.0 else guided


class OneRowWithoutTimes(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        guided = super().combine(predictions, t, progress)
        return guided[:1] if t is None else guided


class OneNaN(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        guided = super().combine(predictions, t, progress).clone()
        guided[0, 0] = float("nan")
        return guided


@pytest.mark.parametrize("guidance, message", [
    (NoBranches(3.0), "NoBranches: num_branches must be an integer >= 1, found 0"),
    (DoublePrecisionGuidance(3.0), "DoublePrecisionGuidance: combine must give the predictions' dtype torch.float32, "
                                   "found torch.float64"),
    (DriftingGuidance(3.0), "DriftingGuidance: combine gives different results for the same inputs"),
    (OvershootsAtTheEnd(3.0), r"OvershootsAtTheEnd: where every branch predicts the same velocity, combine must "
                              r"return it \(progress 1.0\)"),
    (OneRowWithoutTimes(3.0), r"OneRowWithoutTimes: combine must give \(N, D\) = \(5, 8\), found \(1, 8\) \(t=None"),
    (OneNaN(3.0), "OneNaN: combine is not finite: 1 NaN and 0 infinite of 40 values"),
])
def test_a_guidance_with_a_wrong_dtype_branch_count_or_progress_is_named(guidance, message):
    from nextstep.testing import check_guidance

    with pytest.raises(AssertionError, match=message):
        check_guidance(guidance)


class NoOrder(EulerSampler):
    order = 0


class LateStart(EulerSampler):
    def make_time_grid(self, num_steps, shift=1.0, **kwargs):
        return super().make_time_grid(num_steps, shift, **kwargs) * 0.9 + 0.1


class RepeatedStart(EulerSampler):
    def make_time_grid(self, num_steps, shift=1.0, **kwargs):
        grid = super().make_time_grid(num_steps, shift, **kwargs)
        return torch.cat([grid[:1], grid[:-1]])


class AlwaysFloat32Grid(EulerSampler):
    def make_time_grid(self, num_steps, shift=1.0, device=None, dtype=None):
        return super().make_time_grid(num_steps, shift, device=device)


class OffAlone(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        out = super().sample(velocity_fn, noise, time_grid, step_noise)
        return out + 1e-2 if noise.shape[0] == 1 else out


class BiasedStepNoise(EulerMaruyamaSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(velocity_fn, noise, time_grid, None if step_noise is None else step_noise + 0.5)


class RolledStepNoise(EulerMaruyamaSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(velocity_fn, noise, time_grid, None if step_noise is None else step_noise.roll(1, 1))


class RefusesEveryCount(EulerSampler):
    def make_time_grid(self, num_steps, shift=1.0, **kwargs):
        raise ValueError(f"no grid of {num_steps} steps")


class Float64Promise(EulerSampler):
    def evaluation_times(self, time_grid):
        return super().evaluation_times(time_grid).double()


class ColumnStochastic(EulerMaruyamaSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        out = super().sample(velocity_fn, noise, time_grid, step_noise)
        return out if step_noise is None else out[..., None]


class InfiniteStochastic(EulerMaruyamaSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        out = super().sample(velocity_fn, noise, time_grid, step_noise)
        return out if step_noise is None else out + float("inf")


@pytest.mark.parametrize("sampler, message", [
    (NoOrder(), "NoOrder: order must be an integer >= 1, found 0"),
    (LateStart(), "LateStart: the grid must rise from 0"),
    (RepeatedStart(), "RepeatedStart: the grid must rise from 0"),
    (AlwaysFloat32Grid(), r"AlwaysFloat32Grid: make_time_grid\(\.\.\., dtype=float64\) must give a float64 grid"),
    (OffAlone(), "OffAlone: rows of the result depend on each other: "),
    (BiasedStepNoise(), r"BiasedStepNoise: sampling the exact flow to N\(0.5, 0.3\^2\) in 50 steps gives mean"),
    (RolledStepNoise(), "RolledStepNoise: rows of a stochastic sample depend on each other"),
    (RefusesEveryCount(), r"RefusesEveryCount: make_time_grid refused every step count of \(1, 3, 10\)"),
    (Float64Promise(), r"Float64Promise: evaluation_times must give increasing \(E,\) times in the grid's dtype"),
    (ColumnStochastic(), r"ColumnStochastic: a stochastic sample must be \(N, D\), found \(4, 8, 1\)"),
    (InfiniteStochastic(), "InfiniteStochastic: a stochastic sample is not finite: 0 NaN and 32 infinite"),
])
def test_a_sampler_with_a_wrong_grid_order_or_step_noise_is_named(sampler, message):
    with pytest.raises(AssertionError, match=message):
        check_sampler(sampler)


class PadIsEnd(ByteTextTokenizer):
    @property
    def pad_id(self):
        return self.eos_id


class EndsItselfWithinText(ByteTextTokenizer):
    def encode(self, text):
        head, marker, tail = text.partition("<|endoftext|>")
        if not marker or not (head or tail):
            return super().encode(text)
        return super().encode(head) + [self.eos_id] + super().encode(tail)


class KnowsEveryToken(ByteTextTokenizer):
    def special_token_id(self, token):
        try:
            return super().special_token_id(token)
        except ValueError:
            return 0


class ShiftedByteIds(ByteTextTokenizer):
    def byte_id(self, value):
        return super().byte_id(value) + 1


class FloatIds(ByteTextTokenizer):
    def encode(self, text):
        return [float(i) for i in super().encode(text)]

    def decode(self, ids):
        return super().decode([int(i) for i in ids])


class EmptyIsEnd(ByteTextTokenizer):
    def encode(self, text):
        return super().encode(text) if text else [self.eos_id]


@pytest.mark.parametrize("tokenizer, message", [
    (PadIsEnd(), "PadIsEnd: eos_id and pad_id must be the ids of"),
    (EndsItselfWithinText(), re.escape("EndsItselfWithinText: the text 'x<|endoftext|> y' encodes to the special "
                                       "token <|endoftext|>")),
    (KnowsEveryToken(), "KnowsEveryToken: special_token_id of an unknown token should raise ValueError, and was "
                        "accepted"),
    (ShiftedByteIds(), re.escape("ShiftedByteIds: byte_id(ord('a')) decodes to 'b'")),
    (FloatIds(), "FloatIds: encode must give Python ints"),
    (EmptyIsEnd(), "EmptyIsEnd: encode\\(''\\) must give a list that decodes to ''"),
])
def test_a_tokenizer_with_wrong_pad_byte_or_empty_ids_is_named(tokenizer, message):
    with pytest.raises(AssertionError, match=message):
        check_text_tokenizer(tokenizer)


def test_image_tokenizers_with_wrong_dtypes_shapes_seeds_or_refusals_are_named():
    from nextstep.testing import check_image_tokenizer
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    class DoubleLatents(FluxVAE):
        def encode(self, images, generator=None):
            return super().encode(images, generator).double()

    class CroppedDecode(FluxVAE):
        def decode(self, latents):
            return super().decode(latents)[..., :-1]

    class FlippedUnpatchify(FluxVAE):
        def unpatchify(self, tokens, grid_height, grid_width):
            return super().unpatchify(tokens, grid_height, grid_width).flip(-1)

    class ReseedsEachCall(FluxVAE):
        calls = 0

        def encode_seeded(self, images, seed):
            self.calls += 1
            return super().encode_seeded(images, seed + self.calls)

    class IgnoresSeed(FluxVAE):
        def encode_seeded(self, images, seed):
            return super().encode_seeded(images, 0)

    class BatchMixing(FluxVAE):
        def encode(self, images, generator=None):
            latents = super().encode(images, generator)
            return latents + latents.mean(0, keepdim=True)

    class ClampsImages(FluxVAE):
        def encode(self, images, generator=None):
            return super().encode(images.clamp(-1, 1), generator)

    class RoundsGridSize(FluxVAE):
        def grid_size(self, height, width):
            side = self.pixels_per_token
            return super().grid_size(height - height % side, width - width % side)

    class CropsImages(FluxVAE):
        def encode(self, images, generator=None):
            f = self.downsample
            height, width = images.shape[-2:]
            return super().encode(images[..., :height - height % f, :width - width % f], generator)

    class UnusedParameter(FluxVAE):
        def __init__(self, config):
            super().__init__(config)
            self.unused = torch.nn.Parameter(torch.ones(3))

    config = FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
    sampled = config.replace(deterministic=False)
    for tokenizer, message in [
        (DoubleLatents(config), "DoubleLatents: latents must be in the images' dtype torch.float32, found "
                                "torch.float64"),
        (CroppedDecode(config), r"CroppedDecode: decode must give images of shape \(2, 3, 32, 48\), found "
                                r"\(2, 3, 32, 47\)"),
        (FlippedUnpatchify(config), r"FlippedUnpatchify: unpatchify\(patchify\(latents\)\) is not latents"),
        (ReseedsEachCall(sampled), "ReseedsEachCall: encode_seeded gives other latents for the same seed"),
        (IgnoresSeed(sampled), "IgnoresSeed: samples its latents, but another seed gives the same ones"),
        (BatchMixing(config), "BatchMixing: an image's latents depend on the other images of the batch"),
        (ClampsImages(config), r"ClampsImages: encode of values outside \[-1, 1\] should raise ValueError, and was "
                               "accepted"),
        (RoundsGridSize(config), "RoundsGridSize: grid_size of a height that is not a multiple of pixels_per_token"),
        (CropsImages(config), "CropsImages: encode of a height that is not a multiple of f"),
        (UnusedParameter(config), re.escape("UnusedParameter: no gradient reaches ['unused']")),
    ]:
        with pytest.raises(AssertionError, match=message):
            check_image_tokenizer(tokenizer)


def test_the_checks_leave_a_component_in_evaluation_mode_as_it_was():
    head = FlowMatchingHead(HEAD).eval()
    check_image_head(head)
    assert not head.training
    backbone = Qwen2Backbone(Qwen2BackboneConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                                                 num_heads=4, num_kv_heads=2)).eval()
    check_backbone(backbone)
    assert not backbone.training


def test_a_guidance_whose_branch_count_is_a_bool_is_named():
    from nextstep.samplers import NoGuidance
    from nextstep.testing import check_guidance

    class BoolBranches(NoGuidance):
        num_branches = True

    with pytest.raises(AssertionError, match="BoolBranches: num_branches must be an integer >= 1, found True"):
        check_guidance(BoolBranches())


class FractionalOrder(EulerSampler):
    order = 1.5


class ScalarTimes(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        return super().sample(lambda x, t: velocity_fn(x, t[0]), noise, time_grid, step_noise)


@pytest.mark.parametrize("sampler, message", [
    (FractionalOrder(), "FractionalOrder: order must be an integer >= 1, found 1.5"),
    (ScalarTimes(), r"ScalarTimes: t must be \(N,\) = \(4,\), found \(\)"),
])
def test_a_sampler_with_a_fractional_order_or_scalar_times_is_named(sampler, message):
    with pytest.raises(AssertionError, match=message):
        check_sampler(sampler)


def test_an_image_tokenizer_whose_token_dim_is_not_its_patch_features_is_named():
    from nextstep.testing import check_image_tokenizer
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    class WideTokens(FluxVAE):
        @property
        def token_dim(self):
            return self.latent_channels * self.patch_size**2 + 1

    config = FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
    with pytest.raises(AssertionError, match=r"WideTokens: token_dim must be latent_channels \* patch_size\*\*2"):
        check_image_tokenizer(WideTokens(config))


@pytest.mark.parametrize("attribute", ["order", "evaluations_per_step"])
def test_a_sampler_whose_order_or_evaluation_count_is_a_bool_is_named(attribute):
    sampler = type("BoolCount", (EulerSampler,), {attribute: True})()
    with pytest.raises(AssertionError, match=f"BoolCount: {attribute} must be an integer >= 1, found True"):
        check_sampler(sampler)


class WrongWeightHeun(HeunSampler):
    """Heun's two evaluations with the second one's weight dropped: first order, claiming the second."""

    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        x = noise
        for index in range(time_grid.shape[0] - 1):
            t, following = time_grid[index], time_grid[index + 1]
            dt = (following - t).to(x.dtype)
            v = velocity_fn(x, t.expand(x.shape[0]))
            predicted = x + dt * v
            velocity_fn(predicted, following.expand(x.shape[0]))
            x = x + dt * v
        return x


@pytest.mark.parametrize("sampler, claimed", [(type("Overclaimed", (EulerSampler,), {"order": 2})(), 2),
                                              (WrongWeightHeun(), 2)])
def test_a_sampler_that_does_not_reach_its_stated_order_is_named(sampler, claimed):
    name = type(sampler).__name__
    with pytest.raises(AssertionError, match=rf"{name}: order is {claimed}, but on dx/dt = -x \+ 2t in float64 the "
                                             r"error falls from .* \(16 steps\) to .* \(32 steps\), order 1\.0"):
        check_sampler(sampler)
