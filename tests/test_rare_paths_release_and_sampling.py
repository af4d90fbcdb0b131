"""Rarely taken paths of the component test kits (a sampler that refuses some grids or shifts, an image tokenizer
of one pixel per token and no parameters), of the release interop (tensors a loader leaves unread, tokenizer files
without a pad token or with their own ``added_tokens.json``), and of the fast token sampler, generation, the
model, the flow head, the Qwen interop, the word tokenizers' files and the Qwen2 backbone's decode step."""

import json

import pytest
import torch
import torch.nn.functional as F
from fast_helpers import fast_sample
from interop_synthetic import write_qwen_checkpoint
from test_interop_qwen_init import tiny_vae
from test_interop_release import small_release
from test_rare_paths_kernels_and_generation import rewrite_weights
from test_testing_checks import FlippedScore
from test_word_aliases import ALIASES, word_model_directory
from test_word_vectors import letter_counts, word_model
from torch import nn

from nextstep.fast import FastTokenSampler
from nextstep.generation import decode_tokens, encode_each
from nextstep.heads.flow_matching import FlowMatchingMLP
from nextstep.interop import nextstep_from_qwen
from nextstep.interop.release_tokenizer import save_release_tokenizer, special_tokens_map, with_nextstep_tokens
from nextstep.model import NextStep
from nextstep.presets import flow_head_config
from nextstep.samplers import EulerSampler
from nextstep.testing import check_image_tokenizer, check_sampler
from nextstep.tokenizers.base import ImageTokenizer
from nextstep.tokenizers.word_aliases import write_model_with_aliases
from nextstep.tokenizers.word_vector_table import attach_word_vectors

# ----------------------------------------------------------------------------- the sampler kit


class _NoSingleStep(EulerSampler):
    """Builds a one-step grid but refuses to sample it; promises no evaluation times."""

    def evaluation_times(self, time_grid):
        return None

    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        if time_grid.shape[0] < 3:
            raise ValueError(f"_NoSingleStep needs at least 2 steps, found {time_grid.shape[0] - 1}")
        return super().sample(velocity_fn, noise, time_grid, step_noise)


class _WholeGridsOnly(EulerSampler):
    """Refuses, by name, a grid that stops short of t = 1."""

    def sample(self, velocity_fn, noise, time_grid, step_noise=None):
        if float(time_grid[-1]) != 1.0:
            raise ValueError(f"the grid must end at t = 1, found {float(time_grid[-1])}")
        return super().sample(velocity_fn, noise, time_grid, step_noise)


def _one_shift_only(sampler_class):
    """``sampler_class`` whose grids exist for the shift 2.0 only."""

    class OneShift(sampler_class):
        def make_time_grid(self, num_steps, shift=1.0, *, device=None, dtype=torch.float32):
            if shift != 2.0:
                raise ValueError(f"{type(self).__name__} takes the shift 2.0 only, found {shift}")
            return super().make_time_grid(num_steps, shift, device=device, dtype=dtype)

    return OneShift


def test_a_deterministic_sampler_that_refuses_a_grid_its_own_make_time_grid_built_raises_that_refusal():
    with pytest.raises(ValueError, match="_NoSingleStep needs at least 2 steps, found 1"):
        check_sampler(_NoSingleStep())


def test_a_sampler_that_refuses_a_grid_stopping_short_of_one_passes():
    check_sampler(_WholeGridsOnly())


def test_a_sampler_whose_grids_exist_for_one_shift_only_passes():
    check_sampler(_one_shift_only(EulerSampler)())


def test_a_stochastic_sampler_with_a_flipped_score_is_named_even_when_it_refuses_the_shift_one():
    with pytest.raises(AssertionError, match=r"OneShift: sampling the exact flow to N\(0.5, 0.3\^2\)"):
        check_sampler(_one_shift_only(FlippedScore)())


# ----------------------------------------------------------------------------- the image tokenizer kit


class _PoolingTokenizer(ImageTokenizer):
    """A tokenizer without parameters: latents are the images averaged over f x f pixels (zero channels after
    the first three); decoding repeats each latent over its f x f pixels."""

    def __init__(self, channels: int = 3, downsample: int = 1, patch_size: int = 1, check: bool = True):
        super().__init__()
        self.channels, self.factor, self.patch_size, self.check = channels, downsample, patch_size, check

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def downsample(self) -> int:
        return self.factor

    def encode(self, images):
        if self.check:
            self.check_images(images)
        pooled = F.avg_pool2d(images, self.factor)
        return F.pad(pooled, (0, 0, 0, 0, 0, self.channels - 3))

    def decode(self, latents):
        f = self.factor
        return latents[:, :3].repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def test_an_image_tokenizer_of_one_pixel_per_token_and_no_parameters_passes():
    check_image_tokenizer(_PoolingTokenizer())


def test_an_image_tokenizer_of_one_pixel_per_token_that_accepts_values_outside_the_range_is_named():
    with pytest.raises(AssertionError, match=r"_PoolingTokenizer: encode of values outside \[-1, 1\] should raise "
                                             "ValueError, and was accepted"):
        check_image_tokenizer(_PoolingTokenizer(check=False))


def test_the_encoding_identity_of_a_tokenizer_without_config_or_tensors_is_its_class_name():
    assert _PoolingTokenizer().encoding_identity() == ("_PoolingTokenizer", {})


@pytest.mark.parametrize("images", [torch.full((0, 3, 2, 2), 5.0), torch.empty(1, 3, 2, 2, device="meta")],
                         ids=["empty", "meta"])
def test_images_without_values_to_read_pass_the_image_check(images):
    _PoolingTokenizer().check_images(images)


# ----------------------------------------------------------------------------- the release interop


def test_a_release_tensor_the_loader_leaves_unread_is_named(tmp_path, monkeypatch):
    import nextstep.interop.release_checkpoint as release_checkpoint

    small_release(tmp_path / "release")
    load = release_checkpoint.load_safetensors

    def without_the_head(parts, directory, **options):
        del parts.image_head
        return load(parts, directory, **{**options, "strict": False})

    monkeypatch.setattr(release_checkpoint, "load_safetensors", without_the_head)
    with pytest.raises(RuntimeError, match=r"tensors left uninitialised after loading .*release: "
                                           r"\['image_head\.net\.input_proj\.weight', "):
        NextStep.from_pretrained(tmp_path / "release")


def test_a_vocabulary_without_a_pad_token_sets_no_pad_token():
    config = with_nextstep_tokens({"eos_token": "<|endoftext|>"}, {"<|endoftext|>": 0, "<|image_area|>": 1})
    assert config == {"eos_token": "<|endoftext|>", "additional_special_tokens": ["<|image_area|>"]}


def test_a_config_without_additional_special_tokens_maps_only_its_named_tokens():
    assert special_tokens_map({"eos_token": "e", "pad_token": None, "additional_special_tokens": []}) == \
        {"eos_token": "e"}


class _FourXTokenizer:
    """A tokenizer whose ``save_pretrained`` writes ``added_tokens.json`` itself, as transformers 4.x does."""

    def save_pretrained(self, directory):
        from pathlib import Path

        (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        (Path(directory) / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 7}))

    def get_vocab(self):
        return {"a": 0, "<|endoftext|>": 7, "[PAD]": 8}

    def get_added_vocab(self):
        return {"<|endoftext|>": 7, "[PAD]": 8}


def test_an_added_tokens_file_the_tokenizer_wrote_is_kept(tmp_path):
    save_release_tokenizer(_FourXTokenizer(), tmp_path)
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {"<|endoftext|>": 7}
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == \
        {"eos_token": "<|endoftext|>", "pad_token": "[PAD]"}


def test_a_qwen_checkpoint_storing_its_embedding_without_the_model_prefix_is_read(tmp_path):
    write_qwen_checkpoint(tmp_path, vocab_size=300, num_layers=1, vocabulary="small")
    prefixed = nextstep_from_qwen(tmp_path, image_tokenizer=tiny_vae(), head="tiny")

    def unprefixed(tensors):
        tensors["embed_tokens.weight"] = tensors.pop("model.embed_tokens.weight")

    rewrite_weights(tmp_path, unprefixed)
    model = nextstep_from_qwen(tmp_path, image_tokenizer=tiny_vae(), head="tiny")
    assert torch.equal(model.backbone.embed_tokens.weight, prefixed.backbone.embed_tokens.weight)


# ----------------------------------------------------------------------------- fast token sampler


class _CropOnlyCache:
    """A cache that can be cropped but has no ``reset``."""

    def __init__(self):
        self.crops = []

    def crop(self, length):
        self.crops.append(length)


def test_a_pooled_cache_without_reset_is_cropped_to_empty_when_handed_out_again(tiny_model, monkeypatch):
    cache = _CropOnlyCache()
    monkeypatch.setattr(tiny_model.backbone, "new_cache", lambda rows, length, dtype=None: cache)
    fast = FastTokenSampler(tiny_model)
    assert fast.new_cache(2, 10) is cache and cache.crops == []
    assert fast.new_cache(2, 10) is cache and cache.crops == [0]


def test_a_progress_bar_counts_every_token_and_changes_no_token(trained_like_model, capsys):
    model = trained_like_model.eval()
    fast = FastTokenSampler(model, use_kernels=False)
    found = {progress: fast_sample(model, fast, EulerSampler(), ["a red circle"], (2, 3), cfg=2.0, use_norm=None,
                                   progress=progress)
             for progress in (None, True)}
    assert torch.equal(found[True], found[None])
    assert "6/6" in capsys.readouterr().err


# ----------------------------------------------------------------------------- generation, model, heads


def test_a_tokenizer_without_parameters_encodes_and_decodes_in_the_dtype_it_is_given(tiny_model):
    tokenizer = _PoolingTokenizer(channels=16, downsample=8, patch_size=2)
    tiny_model.image_tokenizer = tokenizer
    image = torch.rand(1, 3, 32, 16, dtype=torch.float64) * 2 - 1
    [(tokens, grid_h, grid_w)] = encode_each(tiny_model, [image])
    assert (grid_h, grid_w) == (2, 1)
    assert torch.equal(tokens, tokenizer.patchify(tokenizer.encode(image))[0].float())
    decoded = decode_tokens(tiny_model, tokens[None].double(), grid_h, grid_w)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, tokenizer.decode(tokenizer.unpatchify(tokens[None].double(), 2, 1)).float())


def test_a_parameter_two_components_share_is_counted_once_under_the_first(tiny_model):
    before = tiny_model.parameter_counts()
    tiny_model.image_head.net.input_proj.weight = tiny_model.image_in_projector.weight
    shared = tiny_model.image_in_projector.weight.numel()
    assert tiny_model.parameter_counts() == {**before, "image_head": before["image_head"] - shared,
                                             "total": before["total"] - shared}


class _BiasFreeInput(FlowMatchingMLP):
    def __init__(self, config):
        super().__init__(config)
        self.input_proj = nn.Linear(config.token_dim, config.width, bias=False)
        self.reset_parameters()


def test_a_flow_net_with_a_linear_without_bias_is_initialised():
    torch.manual_seed(0)
    net = _BiasFreeInput(flow_head_config("tiny", 64, 16).replace(depth=1))
    assert net.input_proj.bias is None
    bound = (6 / (16 + net.input_proj.out_features)) ** 0.5
    assert 0 < net.input_proj.weight.abs().max() <= bound


# ----------------------------------------------------------------------------- word tokenizers' files


def test_a_model_directory_with_a_subfolder_keeps_it_when_given_aliases(tmp_path):
    source = word_model_directory(tmp_path)
    (source / "extra").mkdir()
    (source / "extra" / "notes.txt").write_text("kept")
    write_model_with_aliases(source, tmp_path / "out", lambda words: ALIASES)
    assert (tmp_path / "out" / "extra" / "notes.txt").read_text() == "kept"


def test_word_vectors_without_further_words_cover_only_the_vocabulary():
    model = word_model()
    attached = attach_word_vectors(model, ["red", "3d"], letter_counts, dim=4)
    tokenizer = attached.text_tokenizer
    assert tokenizer.config.vector_words == ()
    assert tokenizer.input_vocab_size == tokenizer.vocab_size
    assert torch.equal(attached.word_vectors.learned_ids.long(),
                       torch.arange(tokenizer.vocab_size).clamp_max(model.backbone.vocab_size - 1))


def test_word_vectors_of_an_unregistered_tokenizer_keep_the_model_config_s_tokenizer_spec():
    from nextstep.tokenizers import WordTextTokenizer

    class OwnWords(WordTextTokenizer):
        pass

    model = word_model()
    spec = model.config.text_tokenizer
    model.text_tokenizer.__class__ = OwnWords
    attached = attach_word_vectors(model, ["crimson"], letter_counts, dim=4)
    assert type(attached.text_tokenizer) is OwnWords
    assert attached.config.text_tokenizer == spec
    assert attached.text_tokenizer.config.vector_words == ("crimson",)


# ----------------------------------------------------------------------------- the Qwen2 backbone


def test_an_uncached_forward_whose_step_fails_raises_that_failure(tiny_model, monkeypatch):
    backbone = tiny_model.backbone

    def failing(*args):
        raise RuntimeError("the step failed")

    monkeypatch.setattr(backbone, "_run", failing)
    embeds = torch.zeros(1, 2, backbone.hidden_size)
    with pytest.raises(RuntimeError, match="the step failed"):
        backbone(embeds, torch.arange(2)[None])


def test_an_ahead_of_time_compilation_that_fails_warns_and_decodes_eagerly(tiny_model, monkeypatch):
    import nextstep.backbones.qwen2 as qwen2

    class Failing(qwen2.AheadOfTimeDecodeStep):
        def __init__(self, *args):
            raise RuntimeError("no compiler here")

    monkeypatch.setattr(qwen2, "AheadOfTimeDecodeStep", Failing)
    monkeypatch.setattr(qwen2, "ahead_of_time_available", lambda: True)
    backbone = tiny_model.backbone
    with pytest.warns(RuntimeWarning, match=r"ahead-of-time compilation of the decode step failed \(RuntimeError: "
                                            r"no compiler here\); decoding stays eager"):
        backbone.compile_decode(ahead_of_time=True)
    assert backbone._compiled_decode is None
