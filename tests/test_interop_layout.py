"""The published NextStep-1 layout: layout detection, release config checks and refusals, dtypes, VAE lookup."""

from __future__ import annotations

import json

import pytest

from nextstep.config import ComponentSpec
from nextstep.interop.layout import NATIVE, QWEN2, RELEASE, detect_model_layout
from nextstep.interop.release_config import (
    RELEASE_GENERATION,
    RELEASE_IMAGE_FIRST_PROBABILITY,
    check_special_token_ids,
    settings_the_release_drops,
)
from nextstep.samplers.euler_maruyama import EulerMaruyamaSamplerConfig
from nextstep.tokenizers.special_tokens import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER, PAD

#: The special-token ids of the published tokenizer.
RELEASE_TOKEN_IDS = {PAD: 151665, BEGIN_OF_IMAGE: 151667, END_OF_IMAGE: 151668, IMAGE_PLACEHOLDER: 151669}
#: Release config field -> the special token whose id it holds.
ID_FIELDS = {"boi": BEGIN_OF_IMAGE, "eoi": END_OF_IMAGE, "image_placeholder_id": IMAGE_PLACEHOLDER,
             "pad_token_id_added": PAD}


class _IdTokenizer:
    """A text tokenizer that only knows the published special-token ids."""

    def special_token_id(self, token: str) -> int:
        return RELEASE_TOKEN_IDS[token]


def _release_ids() -> dict[str, int]:
    return {field: RELEASE_TOKEN_IDS[token] for field, token in ID_FIELDS.items()}


@pytest.mark.parametrize("field", sorted(ID_FIELDS))
def test_each_special_token_id_of_the_release_config_is_checked_against_the_tokenizer(field):
    """``boi``, ``eoi``, ``image_placeholder_id`` and ``pad_token_id_added`` each must equal the tokenizer's id of
    their token; a wrong one is refused naming the field, both ids and the token."""
    check_special_token_ids(_release_ids(), _IdTokenizer())  # the published ids agree
    wrong = {**_release_ids(), field: 7}
    token = ID_FIELDS[field]
    with pytest.raises(ValueError) as error:
        check_special_token_ids(wrong, _IdTokenizer())
    message = str(error.value)
    assert message.startswith(f"{field} is 7 in the model config")
    assert f"gives {token} the id {RELEASE_TOKEN_IDS[token]}" in message


def _write_config(directory, data) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(data))


def test_each_layout_is_told_by_its_config_json(tmp_path):
    """Component sections mean this library's layout, ``model_type`` ``nextstep`` the release, ``qwen2`` a
    plain language model."""
    _write_config(tmp_path / "native", {"backbone": {}, "image_tokenizer": {}})
    _write_config(tmp_path / "release", {"model_type": "nextstep"})
    _write_config(tmp_path / "qwen", {"model_type": "qwen2"})
    assert [detect_model_layout(tmp_path / name) for name in ("native", "release", "qwen")] == \
        [NATIVE, RELEASE, QWEN2]


def _release_model_config():
    """The `ModelConfig` a small release config loads as."""
    from interop_synthetic import ReleaseShapes, release_config

    from nextstep.interop.release_config import model_config_from_release
    from nextstep.tokenizers import FluxVAEConfig

    shapes = ReleaseShapes(vocab_size=320)
    ids = {**RELEASE_TOKEN_IDS, "<|endoftext|>": 151643}
    vae = FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=shapes.latent_channels)
    return model_config_from_release(release_config(shapes, ids), vae, "")


def test_release_sampler_settings_other_than_the_published_ones_are_named_as_dropped():
    """A model keeping the release's Euler-Maruyama sampler but with other settings loses those settings in the
    release layout: each is named with the value it loads as; the published settings lose nothing."""
    config = _release_model_config()
    assert settings_the_release_drops(config) == []
    assert config.generation == RELEASE_GENERATION
    assert config.image_first_probability == RELEASE_IMAGE_FIRST_PROBABILITY
    changed = config.replace(sampler=ComponentSpec("sampler", "euler_maruyama",
                                                   EulerMaruyamaSamplerConfig(last_step_size=0.1, to_one=True)))
    assert settings_the_release_drops(changed) == [
        "sampler.last_step_size=0.1 (it loads as 0.04)", "sampler.to_one=True (it loads as False)"]
    assert settings_the_release_drops(config.replace(distilled_head={"steps": 4})) == [
        "distilled_head={'steps': 4} (it loads as none: generation no longer warns when the distilled head is "
        "sampled otherwise)"]


def test_release_tokenizer_config_drops_the_loading_calls_arguments_and_keeps_the_rest():
    """``backend``, ``is_local`` and ``local_files_only`` (arguments of the call that loaded the tokenizer) leave
    the 4.x-form tokenizer config; other entries, a mapping of named extra tokens among them, stay as they were."""
    from nextstep.interop.release_tokenizer import release_tokenizer_config

    kept = {"eos_token": "<|endoftext|>", "model_max_length": 131072, "extra_special_tokens": {"image": "<|x|>"}}
    config = release_tokenizer_config({**kept, "backend": "tokenizers", "is_local": True, "local_files_only": True})
    assert config == kept


def test_checkpoint_dtype_is_the_most_common_floating_point_dtype_integers_aside():
    """Integer tensors do not count towards a checkpoint's dtype: 2 BF16 and 1 F32 tensors beside 3 I64 ones load
    as bfloat16; a checkpoint with no floating-point tensor loads as float32."""
    from pathlib import Path

    import torch

    from nextstep.interop.release_checkpoint import checkpoint_dtype
    from nextstep.weights import TensorInfo

    def infos(*dtypes: str) -> dict[str, TensorInfo]:
        return {f"t{i}": TensorInfo(Path("model.safetensors"), (2,), dtype) for i, dtype in enumerate(dtypes)}

    assert checkpoint_dtype(infos("BF16", "BF16")) == torch.bfloat16
    with pytest.warns(UserWarning, match=r"'BF16': 2, 'F32': 1"):
        assert checkpoint_dtype(infos("I64", "BF16", "I64", "F32", "BF16", "I64")) == torch.bfloat16
    assert checkpoint_dtype(infos("I64", "I32")) == torch.float32
    assert checkpoint_dtype({}) == torch.float32


@pytest.mark.parametrize("change, match", [
    ({"frequency_dim": 128}, r"image_head.frequency_dim must be 256 for the release layout, found 128"),
    ({"mlp_ratio": 4.0}, r"image_head.mlp_ratio must be 1.0 for the release layout, found 4.0"),
])
def test_a_flow_head_of_another_shape_than_the_releases_is_not_written_in_its_layout(change, match):
    """The release fixes the flow head's time-code size (256) and MLP ratio (1): another is refused, naming it."""
    from nextstep.interop.release_config import release_config_from_model

    config = _release_model_config()
    head = config.image_head
    config = config.replace(image_head=ComponentSpec(head.kind, head.type, head.config.replace(**change)))
    with pytest.raises(ValueError, match=match):
        release_config_from_model(config, _IdTokenizer())


def test_a_vae_with_other_group_norm_groups_is_not_written_in_the_release_layout():
    """The release's vae/config.json has no field for GroupNorm groups (32 in the release): another count is
    refused, naming it."""
    from nextstep.interop.release_config import release_config_from_model

    config = _release_model_config()
    vae = config.image_tokenizer
    config = config.replace(image_tokenizer=ComponentSpec(vae.kind, vae.type, vae.config.replace(norm_groups=16)))
    with pytest.raises(ValueError, match="image_tokenizer.norm_groups must be 32 for the release layout.*found 16"):
        release_config_from_model(config, _IdTokenizer())


def test_the_vae_is_looked_for_in_order_and_a_folder_without_its_config_is_passed_over(tmp_path):
    """``vae/`` comes before ``vae_name_or_path`` (as given, then relative to the model directory); a folder
    holding ``checkpoint.pt`` without ``config.json`` is not the image tokenizer."""
    from nextstep.interop.release_checkpoint import find_release_vae

    def vae_folder(path, *files):
        path.mkdir(parents=True)
        for name in files:
            (path / name).write_bytes(b"")
        return path

    model = tmp_path / "model"
    named = vae_folder(model / "tokenizer", "config.json", "checkpoint.pt")
    release = {"vae_name_or_path": "tokenizer"}
    assert find_release_vae(model, release) == named
    own = vae_folder(model / "vae", "checkpoint.pt")
    assert find_release_vae(model, release) == named
    (own / "config.json").write_text("{}")
    assert find_release_vae(model, release) == own
    with pytest.raises(FileNotFoundError, match=r"config.json \+ checkpoint.pt in one of \[.*elsewhere"):
        find_release_vae(model, {}, tmp_path / "elsewhere")


def test_a_path_that_is_no_directory_is_refused_saying_a_model_directory_was_expected(tmp_path):
    """A missing path, or a file such as a single weights file, is not a model directory: `FileNotFoundError`
    saying a model directory was expected."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    for path in (tmp_path / "missing", weights):
        with pytest.raises(FileNotFoundError, match=f"expected a model directory at {path}"):
            detect_model_layout(path)
