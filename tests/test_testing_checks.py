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
