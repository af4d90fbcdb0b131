"""Interface contracts (`nextstep.testing`), run over every registered implementation of each interface.

Adding an implementation to the registry requires adding a small config for it
below: the ``test_every_registered_*_has_a_contract_config`` tests fail otherwise.
"""

import math

import pytest
import torch

from nextstep.backbones import HFBackboneConfig, Qwen2BackboneConfig
from nextstep.heads import FlowMatchingHeadConfig
from nextstep.registry import component_class, component_names
from nextstep.testing import (
    check_backbone,
    check_guidance,
    check_image_head,
    check_image_tokenizer,
    check_sampler,
    check_text_tokenizer,
)
from nextstep.tokenizers import ByteTextTokenizerConfig, FluxVAEConfig, HFTextTokenizerConfig, WordTextTokenizerConfig
from nextstep.tokenizers.special_tokens import NEXTSTEP_SPECIAL_TOKENS

IMAGE_TOKENIZERS = {
    "flux_vae": FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
}
BACKBONES = {
    "qwen2": Qwen2BackboneConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                                 num_heads=4, num_kv_heads=2),
    "huggingface": HFBackboneConfig(model_config={
        "model_type": "qwen2", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}),
}
IMAGE_HEADS = {
    "flow_matching": FlowMatchingHeadConfig(token_dim=16, condition_dim=32, width=32, depth=2),
}


def library_names(kind):
    """Registered names whose class is the library's (documentation examples register their own)."""
    return {n for n in component_names(kind) if component_class(kind, n).__module__.startswith("nextstep.")}


def build(kind, name, config):
    torch.manual_seed(0)
    return component_class(kind, name)(config)


@pytest.mark.parametrize("kind, table", [
    ("image_tokenizer", IMAGE_TOKENIZERS), ("backbone", BACKBONES), ("image_head", IMAGE_HEADS),
])
def test_every_registered_module_has_a_contract_config(kind, table):
    assert library_names(kind) <= set(table), f"add contract configs for {kind}"


# --------------------------------------------------------------- image tokenizers
@pytest.mark.parametrize("name", sorted(IMAGE_TOKENIZERS))
def test_image_tokenizer_contract(name):
    check_image_tokenizer(build("image_tokenizer", name, IMAGE_TOKENIZERS[name]))


def test_a_tokenizer_that_samples_its_latents_meets_the_contract():
    """Its draws for a batch need not be those of each image alone (one draw for the whole batch)."""
    check_image_tokenizer(build("image_tokenizer", "flux_vae", IMAGE_TOKENIZERS["flux_vae"].replace(
        deterministic=False)))


def test_a_half_precision_backbone_meets_the_contract_at_its_own_tolerance():
    check_backbone(build("backbone", "qwen2", BACKBONES["qwen2"]).to(torch.bfloat16))


@pytest.mark.parametrize("name", sorted(IMAGE_TOKENIZERS))
def test_image_tokenizer_rejects_bad_images(name):
    tokenizer = build("image_tokenizer", name, IMAGE_TOKENIZERS[name])
    f = tokenizer.downsample
    with pytest.raises(ValueError, match="multiples of"):
        tokenizer.encode(torch.zeros(1, 3, f + 1, f))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tokenizer.encode(torch.full((1, 3, f, f), 3.0))
    with pytest.raises(ValueError, match="shape"):
        tokenizer.encode(torch.zeros(3, f, f))
    with pytest.raises(ValueError, match="multiple of 16"):
        tokenizer.grid_size(72, 64)


# ---------------------------------------------------------------- text tokenizers
def text_tokenizers(hf_dir):
    return {
        "byte": component_class("text_tokenizer", "byte")(ByteTextTokenizerConfig()),
        "huggingface": component_class("text_tokenizer", "huggingface")(
            HFTextTokenizerConfig(path=str(hf_dir))),
        "word": component_class("text_tokenizer", "word")(WordTextTokenizerConfig(min_count=1)).fit(
            ["a red circle to the left of a blue square", "16*16"]),
    }


def test_text_tokenizer_contract(hf_tokenizer_dir):
    tokenizers = text_tokenizers(hf_tokenizer_dir)
    assert library_names("text_tokenizer") <= set(tokenizers)
    for name, tokenizer in tokenizers.items():
        check_text_tokenizer(tokenizer)
        # Fitting gives a tokenizer of the same kind.
        assert isinstance(tokenizer.fit(["a red circle"]), type(tokenizer)), name
    # Bytes read any string back, a lone surrogate too.
    byte = tokenizers["byte"]
    assert byte.decode(byte.encode("a\ud800b")) == "a\ud800b" and byte.decode([0xFF, 0x61]) == "\ufffda"


# ----------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_contract(name):
    check_backbone(build("backbone", name, BACKBONES[name]))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_names_a_step_past_its_cache(name):
    backbone = build("backbone", name, BACKBONES[name]).eval()
    cache = backbone.new_cache(1, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="does not fit the cache"):
        backbone(torch.randn(1, 3, backbone.hidden_size), torch.arange(3)[None], cache=cache)


# --------------------------------------------------------------------------- heads
@pytest.mark.parametrize("name", sorted(IMAGE_HEADS))
def test_image_head_contract(name):
    check_image_head(build("image_head", name, IMAGE_HEADS[name]))


def test_image_head_contract_in_bfloat16():
    check_image_head(build("image_head", "flow_matching", IMAGE_HEADS["flow_matching"]).to(torch.bfloat16))


# ------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name", component_names("sampler"))
def test_sampler_contract(name):
    cls = component_class("sampler", name)
    sampler = cls(cls.config_class())
    check_sampler(sampler)
    assert not math.isnan(sampler.order)


def library_guidance():
    from nextstep.samplers import ClassifierFreeGuidance, ImageEditingGuidance, NoGuidance

    return [NoGuidance(), ClassifierFreeGuidance(1.0), ClassifierFreeGuidance(7.5),
            ClassifierFreeGuidance(3.0, schedule="linear", interval=(0.2, 0.8), renorm=1.5),
            ImageEditingGuidance(7.5, 2.0), ImageEditingGuidance(3.0, 1.5, schedule="linear_increasing")]


@pytest.mark.parametrize("guidance", library_guidance(), ids=lambda guidance: type(guidance).__name__)
def test_guidance_contract(guidance):
    check_guidance(guidance)


def test_nextstep_tokens_a_tokenizer_holds_as_plain_tokens_become_special(tmp_path):
    from interop_synthetic import write_tokenizer
    from transformers import AutoTokenizer

    from nextstep.tokenizers import HFTextTokenizer

    write_tokenizer(tmp_path / "base", vocabulary="small", nextstep_tokens=False)
    prepared = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    prepared.add_tokens(["[PAD]", *NEXTSTEP_SPECIAL_TOKENS])  # added, but not as special tokens
    prepared.save_pretrained(str(tmp_path / "prepared"))
    begin = prepared.convert_tokens_to_ids("<|begin_of_image|>")
    tokenizer = HFTextTokenizer(HFTextTokenizerConfig(path=str(tmp_path / "prepared")))
    assert tokenizer.begin_of_image_id == begin  # the same id
    assert begin not in tokenizer.encode("x <|begin_of_image|>")  # a prompt cannot write it
    assert tokenizer.decode(tokenizer.encode("x <|begin_of_image|>")) == "x <|begin_of_image|>"
