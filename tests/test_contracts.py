"""Interface contracts, run over every registered implementation of each interface.

Adding an implementation to the registry requires adding a small config for it
below: the ``test_every_registered_*_has_a_contract_config`` tests fail otherwise.
"""

import math

import pytest
import torch

from nextstep.backbones import HFBackboneConfig, Qwen2BackboneConfig, positions_from_mask
from nextstep.heads import FlowMatchingHeadConfig
from nextstep.registry import component_class, component_names
from nextstep.samplers import time_grid
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


def randomize(module):
    """Re-draw zero-initialised weights so every parameter influences the output."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.1)


def assert_every_parameter_gets_a_gradient(module):
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    zero = [n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not zero, f"zero gradient for {zero}"


# --------------------------------------------------------------- image tokenizers
@pytest.mark.parametrize("name", sorted(IMAGE_TOKENIZERS))
def test_image_tokenizer_contract(name):
    tokenizer = build("image_tokenizer", name, IMAGE_TOKENIZERS[name])
    f = tokenizer.downsample
    images = torch.rand(2, 3, 4 * f, 6 * f) * 2 - 1
    latents = tokenizer.encode(images)
    assert latents.shape == (2, tokenizer.latent_channels, 4, 6)
    assert latents.dtype == images.dtype and torch.isfinite(latents).all()
    decoded = tokenizer.decode(latents)
    assert decoded.shape == images.shape and torch.isfinite(decoded).all()
    tokens = tokenizer.patchify(latents)
    assert tokens.shape == (2, 2 * 3, tokenizer.token_dim)
    assert tokenizer.token_dim == tokenizer.latent_channels * tokenizer.patch_size**2
    assert torch.equal(tokenizer.unpatchify(tokens, 2, 3), latents)
    # Gradients reach every parameter through decode(encode(x)).
    randomize(tokenizer)
    tokenizer.decode(tokenizer.encode(images)).square().mean().backward()
    assert_every_parameter_gets_a_gradient(tokenizer)


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
        ids = [tokenizer.special_token_id(t) for t in NEXTSTEP_SPECIAL_TOKENS]
        assert len(set(ids)) == len(ids), name
        assert all(0 <= i < tokenizer.vocab_size for i in ids), name
        assert tokenizer.pad_id != tokenizer.eos_id
        text = "a red circle 16*16 ünïcode"
        encoded = tokenizer.encode(text)
        assert all(isinstance(i, int) for i in encoded)
        assert tokenizer.decode(encoded) == text, name
        # A special token's string in user text stays plain text.
        assert tokenizer.begin_of_image_id not in tokenizer.encode("<|begin_of_image|>"), name
        with pytest.raises(ValueError):
            tokenizer.special_token_id("<|no_such_token|>")
        # Fitting gives a tokenizer of the same kind; a raw byte id, where there is one, decodes to it.
        assert isinstance(tokenizer.fit([text]), type(tokenizer)), name
        if tokenizer.byte_id(ord("a")) is not None:
            assert tokenizer.decode([tokenizer.byte_id(ord("a"))]) == "a", name
    # Bytes read any string back, a lone surrogate too.
    byte = tokenizers["byte"]
    assert byte.decode(byte.encode("a\ud800b")) == "a\ud800b" and byte.decode([0xFF, 0x61]) == "\ufffda"


# ----------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_contract(name):
    backbone = build("backbone", name, BACKBONES[name])
    ids = torch.randint(0, backbone.vocab_size, (2, 7))
    embeds = backbone.embed(ids)
    assert embeds.shape == (2, 7, backbone.hidden_size)
    positions = torch.arange(7).expand(2, 7)
    hidden = backbone(embeds, positions)
    assert hidden.shape == (2, 7, backbone.hidden_size) and torch.isfinite(hidden).all()
    hidden.square().mean().backward()
    assert_every_parameter_gets_a_gradient(backbone)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_cached_decode_equals_full_forward(name):
    backbone = build("backbone", name, BACKBONES[name]).eval()
    embeds = torch.randn(2, 10, backbone.hidden_size)
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        full = backbone(embeds, positions)
        cache = backbone.new_cache(2, 10)
        steps = [backbone(embeds[:, :4], positions[:, :4], cache=cache)]
        for i in range(4, 10):
            steps.append(backbone(embeds[:, i:i + 1], positions[:, i:i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit the cache"):
        backbone(embeds[:, :1], positions[:, :1], cache=cache)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_left_padding_equals_rows_alone(name):
    backbone = build("backbone", name, BACKBONES[name]).eval()
    long, short = torch.randn(1, 6, backbone.hidden_size), torch.randn(1, 3, backbone.hidden_size)
    padded = torch.cat([long, torch.cat([torch.zeros(1, 3, backbone.hidden_size), short], 1)])
    mask = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        batch = backbone(padded, positions_from_mask(mask), mask)
        alone_long = backbone(long, torch.arange(6)[None])
        alone_short = backbone(short, torch.arange(3)[None])
    torch.testing.assert_close(batch[0], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1, 3:], alone_short[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_packed_documents_equal_rows_alone(name):
    backbone = build("backbone", name, BACKBONES[name]).eval()
    first, second = torch.randn(1, 4, backbone.hidden_size), torch.randn(1, 3, backbone.hidden_size)
    packed = torch.cat([first, second, torch.zeros(1, 2, backbone.hidden_size)], 1)
    documents = torch.tensor([[1] * 4 + [2] * 3 + [0] * 2])
    with torch.no_grad():
        batch = backbone(packed, positions_from_mask(documents), documents)
        alone_first = backbone(first, torch.arange(4)[None])
        alone_second = backbone(second, torch.arange(3)[None])
    torch.testing.assert_close(batch[:, :4], alone_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[:, 4:7], alone_second, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- heads
@pytest.mark.parametrize("name", sorted(IMAGE_HEADS))
def test_image_head_contract(name):
    head = build("image_head", name, IMAGE_HEADS[name])
    x = torch.randn(5, head.token_dim)
    t = torch.rand(5)
    condition = torch.randn(5, head.condition_dim)
    velocity = head.velocity(x, t, condition)
    assert velocity.shape == (5, head.token_dim) and torch.isfinite(velocity).all()
    loss = head.loss(x, condition, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (5,) and loss.dtype == torch.float32 and (loss >= 0).all()
    randomize(head)
    head.loss(x, condition).mean().backward()
    assert_every_parameter_gets_a_gradient(head)
    with pytest.raises(ValueError, match="shape"):
        head.loss(torch.randn(5, head.token_dim + 1), condition)


# ------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name", component_names("sampler"))
def test_sampler_is_exact_on_constant_velocity(name):
    sampler = component_class("sampler", name)(component_class("sampler", name).config_class())
    noise = torch.randn(4, 8)
    target = torch.randn(4, 8)

    def velocity(x, t):
        assert x.shape == (4, 8) and t.shape == (4,)
        return target - noise

    for steps in (1, 3, 10):
        out = sampler.sample(velocity, noise, time_grid(steps, shift=2.0))
        torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    assert sampler.order >= 1 and not math.isnan(sampler.order)


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
