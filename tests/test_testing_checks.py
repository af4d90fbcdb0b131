"""The contract checks of `nextstep.testing` catch broken components, naming what breaks."""

import re

import pytest
import torch

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig
from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig
from nextstep.samplers import EulerSampler, MidpointSampler
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


@pytest.mark.parametrize("cls, message", [
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
        return super().sample(velocity_fn, noise, time_grid[:-1], step_noise)  # stops one step early


@pytest.mark.parametrize("sampler, message", [
    (UnkeptPromise(), r"UnkeptPromise: evaluation_times promised .* but the velocity was called at"),
    (Inexact(), r"Inexact: a constant velocity is not integrated exactly in 1 step\(s\)"),
])
def test_a_broken_sampler_is_named(sampler, message):
    with pytest.raises(AssertionError, match=message):
        check_sampler(sampler)


class IgnoresPadding(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        if attention_mask is not None and cache is None and attention_mask.dtype == torch.bool:
            attention_mask = None
        return super().forward(embeds, positions, attention_mask, cache)


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


def test_a_tokenizer_that_lets_prompts_write_special_tokens_is_named():
    check_text_tokenizer(ByteTextTokenizer())
    with pytest.raises(AssertionError, match=re.escape("Injectable: the text '<|begin_of_image|>' encodes to the "
                                                       "special")):
        check_text_tokenizer(Injectable())
