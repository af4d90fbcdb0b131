"""Edge cases of the backbones, their checkpoints, tokenizers, file helpers and the contract-check kits."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_backbone_hf_adapter import hf_adapter

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig
from nextstep.backbones.attention import attention_backend
from nextstep.backbones.qwen2_checkpoint import hf_config_from_qwen2, qwen2_config_from_hf
from nextstep.heads import FlowMatchingHead, FlowMatchingHeadConfig
from nextstep.images import as_image_list, from_pil, to_pil
from nextstep.interop.convert import parse_size
from nextstep.interop.qwen_init import padded_vocab_size
from nextstep.io import read_json_object
from nextstep.samplers import ClassifierFreeGuidance, EulerSampler
from nextstep.testing import (
    check_backbone,
    check_guidance,
    check_image_head,
    check_sampler,
    check_text_tokenizer,
)
from nextstep.tokenizers import ByteTextTokenizer

CONFIG = Qwen2BackboneConfig(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2
)


class LateTokensOfTheSecondDocumentDrift(Qwen2Backbone):
    def forward(self, embeds, positions, attention_mask=None, cache=None):
        out = super().forward(embeds, positions, attention_mask, cache)
        if attention_mask is not None and attention_mask.dtype == torch.int64:
            out = torch.cat([out[:, :5], out[:, 5:] + 1e-2], 1)
        return out


class SecondStepAfterCropDrifts(Qwen2Backbone):
    def new_cache(self, batch_size, max_length, **kwargs):
        cache = super().new_cache(batch_size, max_length, **kwargs)
        crop = cache.crop

        def counting_crop(length):
            crop(length)
            cache.steps_after_crop = 0

        cache.crop = counting_crop
        return cache

    def forward(self, embeds, positions, attention_mask=None, cache=None):
        out = super().forward(embeds, positions, attention_mask, cache)
        count = getattr(cache, "steps_after_crop", None)
        if count is not None:
            cache.steps_after_crop = count + 1
            if count == 1:
                out = out + 1e-2
        return out


def test_a_backbone_whose_later_packed_tokens_differ_is_named():
    """Every token of the second packed document is compared, not only its first."""
    with pytest.raises(AssertionError, match="the second of two packed documents differs from it alone"):
        check_backbone(LateTokensOfTheSecondDocumentDrift(CONFIG))


def test_a_backbone_whose_second_decode_step_after_a_crop_differs_is_named():
    """Both decode steps after crop(prompt length) are compared with the first ones."""
    with pytest.raises(AssertionError, match=r"decode steps after crop\(prompt length\) differ from the first ones"):
        check_backbone(SecondStepAfterCropDrifts(CONFIG))


class TargetLeaksIntoTheLastRow(FlowMatchingHead):
    def loss(self, target, condition, generator=None):
        return super().loss(target + 0.5 * target.flip(0), condition, generator)


def test_a_head_whose_loss_leaks_a_target_into_a_distant_row_is_named():
    """Another target for row 0 must leave the loss of every other row alone, the last one included."""
    head = TargetLeaksIntoTheLastRow(FlowMatchingHeadConfig(token_dim=16, condition_dim=32, width=32, depth=2))
    with pytest.raises(AssertionError, match="another target for row 0 changes the loss of other rows"):
        check_image_head(head)


class CapsItsSteps(EulerSampler):
    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        steps = time_grid.shape[0] - 1
        if steps > 10:
            time_grid = time_grid[:: steps // 10]  # at most ten steps, whatever the grid
        return super().sample(velocity_fn, noise, time_grid, step_noise)


def test_a_sampler_that_stops_converging_past_ten_steps_is_named():
    """Four times as many steps as the most checked must at least halve the error again."""
    with pytest.raises(AssertionError, match="steps .* is not below half that with 10"):
        check_sampler(CapsItsSteps())


class OneIdPastTheEnd(ByteTextTokenizer):
    def encode(self, text):
        return [self.input_vocab_size if i == ord("a") else i for i in super().encode(text)]

    def decode(self, ids):
        return super().decode([ord("a") if int(i) == self.input_vocab_size else i for i in ids])


def test_a_tokenizer_giving_the_id_just_past_its_input_vocabulary_is_named():
    """``input_vocab_size`` itself lies outside the ids the model reads."""
    with pytest.raises(AssertionError, match="gives ids outside"):
        check_text_tokenizer(OneIdPastTheEnd())


class TimeScaledGuidance(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        scale = 1.0 if t is None else 1.0 + t[:, None]
        return predictions[1] + scale * (predictions[0] - predictions[1])


class MeanTimeGuidance(ClassifierFreeGuidance):
    def combine(self, predictions, t=None, progress=0.0):
        scale = 1.0 if t is None else 1.0 + t.mean()
        return predictions[1] + scale * (predictions[0] - predictions[1])


def test_a_guidance_reading_each_rows_time_passes_and_one_reading_their_mean_is_named():
    """Each row combined alone is given its own time, so per-row times pass and a batch statistic of them fails."""
    check_guidance(TimeScaledGuidance(3.0))
    with pytest.raises(AssertionError, match="MeanTimeGuidance: rows of the guided velocity depend on the other rows"):
        check_guidance(MeanTimeGuidance(3.0))


def test_an_empty_attention_backend_name_is_refused_by_name():
    """``attention_backend('')`` raises ValueError listing the backends, not a KeyError."""
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        attention_backend("")


def test_a_cache_on_another_device_is_refused_by_name():
    """A cache whose tensors live elsewhere than the embeddings is refused with ValueError naming both."""
    backbone = Qwen2Backbone(CONFIG).eval()
    cache = backbone.new_cache(1, 4, device="meta")
    with torch.no_grad(), pytest.raises(ValueError, match="cache is on meta, the embeddings on cpu"):
        backbone(torch.randn(1, 2, 32), torch.arange(2)[None], cache=cache)


def test_hf_config_without_kv_heads_or_norm_epsilon_reads_the_defaults():
    """No (or a null) num_key_value_heads means one per attention head; no rms_norm_eps means Qwen2Config's 1e-6."""
    from transformers import Qwen2Config

    fields = {
        "model_type": "qwen2",
        "vocab_size": 90,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    for given_fields in (fields, {**fields, "num_key_value_heads": None}):
        config = qwen2_config_from_hf(given_fields)
        assert config.num_kv_heads == 4
    reference = Qwen2Config(**{k: v for k, v in fields.items() if k != "model_type"})
    assert config.rms_norm_eps == reference.rms_norm_eps == 1e-6


def test_a_decoder_with_an_output_bias_has_no_hf_qwen2_config():
    """Hugging Face Qwen2 has no output-projection bias: such a decoder is refused by name."""
    with pytest.raises(ValueError, match="output_attention_bias=True"):
        hf_config_from_qwen2(CONFIG.replace(output_attention_bias=True))


def test_hf_cache_cropped_by_one_token_decodes_another_step_as_a_fresh_cache():
    """Cropping an HFCache back by a single slot forgets that slot in the transformers cache too."""
    backbone = hf_adapter()
    prompt, step, other = torch.randn(1, 3, 32), torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    real = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        cache, fresh = backbone.new_cache(1, 5), backbone.new_cache(1, 5)
        for filled in (cache, fresh):
            backbone(prompt, torch.arange(3)[None], None, filled)
        backbone(step, torch.tensor([[3]]), real, cache)
        cache.crop(3)
        cropped = [backbone(other, torch.tensor([[3]]), real, cache), backbone(step, torch.tensor([[4]]), real, cache)]
        expected = [backbone(other, torch.tensor([[3]]), real, fresh), backbone(step, torch.tensor([[4]]), real, fresh)]
    assert cache.length == 5
    torch.testing.assert_close(torch.cat(cropped, 1), torch.cat(expected, 1), atol=1e-5, rtol=1e-5)


def test_hf_backbone_keeps_two_packed_documents_apart():
    """Two packed documents (ids 1 and 2) each give what they give alone."""
    backbone = hf_adapter(1)
    first, second = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    packed = torch.cat([first, second, torch.zeros(1, 2, 32)], 1)
    documents = torch.tensor([[1] * 4 + [2] * 3 + [0] * 2])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 0]])
    with torch.no_grad():
        together = backbone(packed, positions, documents)
        alone = [backbone(first, torch.arange(4)[None]), backbone(second, torch.arange(3)[None])]
    torch.testing.assert_close(together[:, :4], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 4:7], alone[1], atol=1e-5, rtol=1e-5)


def test_hf_backbone_refuses_a_cache_of_another_batch_size():
    """A cached call whose batch differs from the cache's rows raises ValueError naming both."""
    backbone = hf_adapter()
    cache = backbone.new_cache(2, 5)
    with torch.no_grad(), pytest.raises(ValueError, match="batch of 1 rows does not match the cache's 2 rows"):
        backbone(torch.randn(1, 2, 32), torch.arange(2)[None], None, cache)


def test_hf_backbone_refuses_embeddings_of_another_width():
    """New input embeddings must be hidden_size wide."""
    backbone = hf_adapter()
    with pytest.raises(ValueError, match="embeddings must be 32 wide"):
        backbone.set_input_embeddings(torch.nn.Embedding(10, 16))


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 4096),
    st.sampled_from(
        [("", 1), ("KB", 1000), ("MB", 1000**2), ("GB", 1000**3), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3)]
    ),
)
def test_parse_size_multiplies_by_each_unit(number, unit):
    """Decimal units are powers of 1000, binary ones (KiB, MiB, GiB) powers of 1024, any letter case."""
    suffix, factor = unit
    assert parse_size(f"{number}{suffix}") == number * factor
    assert parse_size(f"{number} {suffix.lower()}") == number * factor


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200_000), st.integers(1, 256))
def test_padded_vocab_size_is_the_smallest_multiple_not_below(tokens, multiple):
    """The vocabulary grows to the least multiple of ``multiple`` that holds every token (no more)."""
    padded = padded_vocab_size(tokens, multiple)
    assert padded % multiple == 0 and tokens <= padded < tokens + multiple


def test_padded_vocab_size_refuses_a_zero_multiple():
    """A multiple of 0 is refused by name."""
    assert padded_vocab_size(128, 64) == 128
    with pytest.raises(ValueError, match="pad_vocab_to_multiple_of must be >= 1"):
        padded_vocab_size(10, 0)


def test_byte_tokenizer_refuses_byte_256_and_marks_invalid_bytes():
    """byte_id stops at 255; bytes that are not UTF-8 decode to replacement characters, not to nothing."""
    tokenizer = ByteTextTokenizer()
    assert tokenizer.byte_id(255) == 255
    with pytest.raises(ValueError, match="a byte value lies in"):
        tokenizer.byte_id(256)
    assert tokenizer.decode([ord("a"), 0xFF, ord("b")]) == "a\ufffdb"


def test_eight_bit_levels_in_a_32_bit_integer_image_stay_eight_bit():
    """A mode "I" image whose levels are all <= 255 is read as 8-bit grey, not as 16-bit."""
    image = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), mode="I")
    tensor = from_pil([image])
    expected = torch.tensor([0, 128, 255], dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(tensor[0, 0, 0], expected)


def test_image_tensor_shapes_are_checked_and_single_images_batched():
    """to_pil refuses four channels; as_image_list takes one (3, H, W) image as a batch of one."""
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        to_pil(torch.zeros(1, 4, 2, 2))
    images = as_image_list(torch.zeros(3, 4, 5))
    assert [tuple(image.shape) for image in images] == [(1, 3, 4, 5)]


def test_read_json_object_refuses_a_list(tmp_path):
    """A JSON file holding a list (not an object) is refused by name."""
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, found list"):
        read_json_object(path)
