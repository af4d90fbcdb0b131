"""Loading Hugging Face Qwen2 checkpoints: single or sharded, tied or untied, any dtype; config translation."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig, load_qwen2_lm_head
from nextstep.backbones.qwen2_checkpoint import backbone_key, qwen2_config_from_hf
from nextstep.weights import INDEX_NAME, checkpoint_shards

HF_FIELDS = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6)


def hf_checkpoint(directory, *, tied=False, shard_size=None, model_class=Qwen2ForCausalLM, seed=0):
    """Save a random tiny transformers model the way transformers does; returns it."""
    torch.manual_seed(seed)
    model = model_class(Qwen2Config(**HF_FIELDS, tie_word_embeddings=tied)).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return model


def base(model):
    return model.model if hasattr(model, "model") else model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_causal_lm_checkpoint_loads_and_matches(tmp_path, tied, shard_size):
    reference = hf_checkpoint(tmp_path, tied=tied, shard_size=shard_size)
    if shard_size:
        assert (tmp_path / INDEX_NAME).is_file() and len(checkpoint_shards(tmp_path)) > 1
    backbone = Qwen2Backbone.from_pretrained(tmp_path)
    head = load_qwen2_lm_head(tmp_path, backbone)
    assert head.tied == tied
    assert not backbone.training and backbone.config.rope_theta == 5000.0
    ids = torch.randint(0, 80, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        hidden = backbone(backbone.embed(ids), torch.arange(7).expand(2, 7))
    torch.testing.assert_close(hidden, expected.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(hidden), expected.logits, atol=1e-5, rtol=1e-5)


def test_base_model_checkpoint_without_prefix_loads(tmp_path):
    reference = hf_checkpoint(tmp_path, model_class=Qwen2Model)
    backbone = Qwen2Backbone.from_pretrained(tmp_path, attention_backend="eager")
    assert backbone.config.attention_backend == "eager"
    ids = torch.randint(0, 80, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(backbone(backbone.embed(ids), torch.arange(5)[None]),
                                   reference(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_in_any_dtype(tmp_path, dtype):
    reference = hf_checkpoint(tmp_path, shard_size="20KB")
    backbone = Qwen2Backbone.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in backbone.parameters()} == {dtype}
    assert backbone.rotary.signed_frequencies.dtype == torch.float32
    expected = base(reference).layers[1].mlp.up_proj.weight.to(dtype)
    assert torch.equal(backbone.layers[1].mlp.up_proj.weight, expected)


def test_checkpoint_in_bf16_loads_into_fp32(tmp_path):
    reference = hf_checkpoint(tmp_path)
    state = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    for name in ("model.safetensors",):
        (tmp_path / name).unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    backbone = Qwen2Backbone.from_pretrained(tmp_path)
    assert backbone.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(backbone.norm.weight, state["model.norm.weight"].float())


def test_mismatched_checkpoint_names_key_and_both_shapes(tmp_path):
    hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight: expected \(40, 32\), found \(48, 32\)"):
        Qwen2Backbone.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    reference = hf_checkpoint(tmp_path)
    state = {k: v for k, v in reference.state_dict().items() if k != "model.norm.weight"}
    state["model.extra.weight"] = torch.zeros(2)
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\], unexpected keys \['extra.weight'\]"):
        Qwen2Backbone.from_pretrained(tmp_path)


def test_untied_checkpoint_without_lm_head_is_refused(tmp_path):
    reference = hf_checkpoint(tmp_path, tied=False)
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    backbone = Qwen2Backbone.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has no 'lm_head.weight', which its config.json asks for "
                                         r"\(tie_word_embeddings is false or absent"):
        load_qwen2_lm_head(tmp_path, backbone)


def test_config_translation_round_trips():
    config = Qwen2BackboneConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                 num_kv_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6)
    assert qwen2_config_from_hf(config.to_hf_config()) == config
    hf = Qwen2Config(**HF_FIELDS).to_dict()  # transformers' own layout (rope_parameters in 5.x)
    assert Qwen2BackboneConfig.from_hf_config(hf) == config
    nextstep = dict(hf, model_type="nextstep", attention_bias=True)
    assert qwen2_config_from_hf(nextstep).output_attention_bias is True
    nextstep["o_attention_bias"] = False
    assert qwen2_config_from_hf(nextstep).output_attention_bias is False
    nextstep["o_attention_bias"] = None  # null follows q/k/v, as the release's config class reads it
    assert qwen2_config_from_hf(nextstep).output_attention_bias is True
    # Left out, as in a Llama config: no biases (the release's config class is a LlamaConfig)
    unbiased = qwen2_config_from_hf({k: v for k, v in nextstep.items() if "attention_bias" not in k})
    assert (unbiased.attention_bias, unbiased.output_attention_bias) == (False, False)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type must be one of"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"use_sliding_window": True, "max_window_layers": 1}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"attention_dropout": 0.1}, "attention_dropout must be 0 for Qwen2Backbone .* found 0.1"),
    ({"rope_theta": "big"}, "rope_theta must be a positive number, found 'big'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"num_key_value_heads": 3}, "num_kv_heads must be a divisor of num_heads=4, found 3"),
])
def test_unsupported_configs_are_named(change, message):
    hf = dict(HF_FIELDS, model_type="qwen2", hidden_act="silu")
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        qwen2_config_from_hf(hf)


def test_fields_that_change_nothing_in_transformers_are_accepted():
    # transformers' Qwen2 slides no layer below max_window_layers, and reads a null rope_theta as absent.
    hf = dict(HF_FIELDS, model_type="qwen2", use_sliding_window=True, max_window_layers=2, attention_dropout=0.0)
    assert qwen2_config_from_hf(hf).rope_theta == 5000.0
    hf.update(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    assert qwen2_config_from_hf(hf).rope_theta == 20000.0
    del hf["rope_parameters"]
    assert qwen2_config_from_hf(hf).rope_theta == 10000.0


def test_missing_config_and_weights_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2Backbone.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(HF_FIELDS, model_type="qwen2")))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Qwen2Backbone.from_pretrained(tmp_path)


def test_key_renaming():
    assert backbone_key("model.layers.3.self_attn.q_proj.bias") == "layers.3.self_attn.q_proj.bias"
    assert backbone_key("layers.3.mlp.down_proj.weight") == "layers.3.mlp.down_proj.weight"
    assert backbone_key("lm_head.weight") is None


def test_a_config_without_tie_word_embeddings_loads_its_own_lm_head(tmp_path):
    """tie_word_embeddings absent reads as false (Hugging Face's default): the head is lm_head.weight (V, H)."""
    reference = hf_checkpoint(tmp_path, tied=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    backbone = Qwen2Backbone.from_pretrained(tmp_path)
    head = load_qwen2_lm_head(tmp_path, backbone)
    assert not head.tied
    assert torch.equal(head.weight, reference.lm_head.weight)


def test_only_the_leading_model_prefix_is_removed_from_a_key():
    """backbone_key strips a leading ``model.`` only, so unexpected keys are named as the checkpoint has them."""
    assert backbone_key("model.vision_model.proj.weight") == "vision_model.proj.weight"
    assert backbone_key("vision_model.proj.weight") == "vision_model.proj.weight"


def test_an_explicit_head_dim_other_than_hidden_over_heads_is_kept():
    """head_dim wider than hidden_size / num_heads is kept; one equal to it is the default (None)."""
    hf = dict(HF_FIELDS, model_type="qwen2", head_dim=16)  # 4 heads x 16 = 64 != hidden 32
    assert qwen2_config_from_hf(hf).resolved_head_dim == 16
    assert qwen2_config_from_hf(dict(hf, head_dim=8)).head_dim is None  # 4 x 8 = 32: the default


def test_the_lm_head_follows_the_backbone_s_dtype_by_default(tmp_path):
    """With dtype None the untied head (V, H) loads in the backbone embeddings' dtype and on their device."""
    reference = hf_checkpoint(tmp_path, tied=False)
    backbone = Qwen2Backbone.from_pretrained(tmp_path, dtype=torch.bfloat16)
    head = load_qwen2_lm_head(tmp_path, backbone)
    assert head.weight.dtype == torch.bfloat16
    assert torch.equal(head.weight, reference.lm_head.weight.to(torch.bfloat16))
    assert load_qwen2_lm_head(tmp_path, backbone, dtype=torch.float32).weight.dtype == torch.float32
