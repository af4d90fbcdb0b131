"""HFBackbone: any transformers decoder behind the Backbone interface."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from nextstep import build_model, generate_tokens
from nextstep.backbones import HFBackbone, HFBackboneConfig, HFCache, Qwen2Backbone, positions_from_mask
from nextstep.backbones.qwen2_checkpoint import qwen2_config_from_hf
from nextstep.config import ComponentSpec
from nextstep.presets import tiny

FIELDS = {"model_type": "qwen2", "vocab_size": 90, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6}


def hf_adapter(seed=0):
    """The adapter over a random Qwen2 of ``FIELDS``, drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return HFBackbone(HFBackboneConfig(model_config=FIELDS)).eval()


def adapter_and_native(seed=0):
    adapter = hf_adapter(seed)
    native = Qwen2Backbone(qwen2_config_from_hf(FIELDS)).eval()
    native.load_state_dict(adapter.model.state_dict())
    return adapter, native


def test_adapter_matches_the_native_backbone_with_padding_and_cache():
    adapter, native = adapter_and_native()
    assert (adapter.hidden_size, adapter.vocab_size) == (32, 90)
    ids = torch.randint(0, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    positions = positions_from_mask(mask)
    steps = torch.randn(2, 3, 32)
    outputs = {}
    with torch.no_grad():
        for name, backbone in (("adapter", adapter), ("native", native)):
            cache = backbone.new_cache(2, 9)
            hidden = [backbone(backbone.embed(ids), positions, mask, cache)]
            for i in range(3):
                hidden.append(backbone(steps[:, i:i + 1], positions[:, -1:] + 1 + i,
                                       torch.ones(2, 1, dtype=torch.bool), cache))
            outputs[name] = torch.cat(hidden, 1)
            assert cache.length == 9
        uncached = adapter(adapter.embed(ids), positions, mask)
    real = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(outputs["adapter"][real], outputs["native"][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncached[mask], outputs["native"][:, :6][mask], atol=1e-5, rtol=1e-5)


def test_adapter_loads_a_local_causal_lm_directory(tmp_path):
    torch.manual_seed(1)
    fields = {k: v for k, v in FIELDS.items() if k != "model_type"}
    reference = Qwen2ForCausalLM(Qwen2Config(**fields)).eval()
    reference.save_pretrained(str(tmp_path))
    adapter = HFBackbone(HFBackboneConfig(path=str(tmp_path))).eval()
    wrapped = HFBackbone.from_model(reference)
    ids = torch.randint(0, 90, (1, 5))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True).hidden_states[-1]
        for backbone in (adapter, wrapped):
            hidden = backbone(backbone.embed(ids), torch.arange(5)[None])
            torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    assert not any("lm_head" in name for name, _ in adapter.named_parameters())
    assert wrapped.config.model_config["model_type"] == "qwen2"


def test_adapter_cache_crops_and_fans_out():
    adapter, _ = adapter_and_native()
    prompt, first, second = torch.randn(1, 4, 32), torch.randn(1, 2, 32), torch.randn(2, 2, 32)
    with torch.no_grad():
        cache = adapter.new_cache(1, 6)
        assert isinstance(cache, HFCache)
        adapter(prompt, torch.arange(4)[None], None, cache)
        adapter(first, torch.arange(4, 6)[None], None, cache)
        cache.crop(4)
        branches = cache.select_rows([0, 0])
        fanned = adapter(second, torch.arange(4, 6).expand(2, 2), None, branches)
        for row in range(2):
            full = adapter(torch.cat([prompt, second[row:row + 1]], 1), torch.arange(6)[None])[:, 4:]
            torch.testing.assert_close(fanned[row], full[0], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="does not fit the cache of 6"):
            adapter(torch.randn(2, 1, 32), torch.full((2, 1), 6), None, branches)
        with pytest.raises(TypeError, match="HFCache"):
            adapter(prompt, torch.arange(4)[None], None, object())
    with pytest.raises(ValueError, match="crop to an integer in 0..4"):
        cache.crop(5)


def test_an_emptied_adapter_cache_fans_out_to_other_rows():
    adapter, _ = adapter_and_native()
    prompts = torch.randn(2, 3, 32)
    with torch.no_grad():
        cache = adapter.new_cache(2, 6)
        adapter(prompts, torch.arange(3).expand(2, 3), None, cache)
        cache.crop(0)
        rows = cache.select_rows([0, 1, 1])
        assert (rows.batch_size, rows.length) == (3, 0)
        fanned = adapter(torch.cat([prompts, prompts[1:]]), torch.arange(3).expand(3, 3), None, rows)
        torch.testing.assert_close(fanned, adapter(torch.cat([prompts, prompts[1:]]), torch.arange(3).expand(3, 3)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({}, "path must be set when model_config is empty"),
    ({"path": "x", "model_config": FIELDS}, "path must be set when model_config is empty"),
    ({"model_config": {"hidden_size": 8}}, "model_type"),
    ({"model_config": FIELDS, "dtype": "float64"}, "dtype must be one of"),
])
def test_adapter_config_is_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        HFBackboneConfig(**fields)


def test_adapter_config_round_trips_through_json():
    config = HFBackboneConfig(model_config=FIELDS, attn_implementation="eager")
    assert HFBackboneConfig.from_json(config.to_json()) == config


def test_a_nextstep_model_runs_and_round_trips_with_the_adapter(tmp_path):
    preset = tiny()
    native = preset.backbone.config
    hf_fields = {"model_type": "qwen2", **{k: v for k, v in native.to_hf_config().items()
                                          if k not in ("model_type", "architectures")}}
    spec = ComponentSpec("backbone", "huggingface", HFBackboneConfig(model_config=hf_fields))
    model = build_model(preset.replace(backbone=spec), seed=0).eval()
    tokens, _, _ = generate_tokens(model, ["a red circle"], height=32, width=32, num_steps=2, cfg=2.0)
    assert tokens.shape == (1, 4, model.token_dim) and torch.isfinite(tokens).all()
    model.save_pretrained(tmp_path / "saved")
    again = type(model).from_pretrained(tmp_path / "saved")
    assert isinstance(again.backbone, HFBackbone)
    tokens_again, _, _ = generate_tokens(again, ["a red circle"], height=32, width=32, num_steps=2, cfg=2.0)
    torch.testing.assert_close(tokens_again, tokens)


def test_a_model_whose_backbone_came_from_a_directory_saves_without_it(tmp_path):
    """The saved model holds the backbone's architecture and weights: it loads after the directory is gone."""
    import shutil

    preset = tiny()
    hf_fields = {k: v for k, v in preset.backbone.config.to_hf_config().items()
                 if k not in ("model_type", "architectures")}
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2Config(**hf_fields)).save_pretrained(str(tmp_path / "qwen"))
    spec = ComponentSpec("backbone", "huggingface", HFBackboneConfig(path=str(tmp_path / "qwen")))
    model = build_model(preset.replace(backbone=spec), seed=0).eval()
    assert model.backbone.config.path == "" and model.backbone.config.model_config["model_type"] == "qwen2"
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "qwen")
    again = type(model).from_pretrained(tmp_path / "saved")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_the_adapters_rotary_frequencies_stay_fp32_however_it_reaches_bf16(tmp_path):
    from safetensors.torch import save_file

    from nextstep.weights import load_safetensors

    fields = {**FIELDS, "rope_theta": 1e6}
    reference = HFBackbone(HFBackboneConfig(model_config=fields)).model.rotary_emb.inv_freq
    built = HFBackbone(HFBackboneConfig(model_config=fields, dtype="bfloat16"))
    cast = HFBackbone(HFBackboneConfig(model_config=fields)).to(torch.bfloat16)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in cast.state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    with torch.device("meta"):
        loaded = HFBackbone(HFBackboneConfig(model_config=fields))
    load_safetensors(loaded, tmp_path / "w.safetensors", dtype=torch.bfloat16)
    for backbone in (built, cast, loaded):
        assert backbone.model.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.equal(backbone.model.rotary_emb.inv_freq, reference)


def test_an_adapter_cache_made_in_inference_mode_is_reused_outside_it():
    adapter, _ = adapter_and_native()
    with torch.inference_mode():
        cache = adapter.new_cache(1, 8)
        adapter(torch.randn(1, 4, 32), torch.arange(4)[None], None, cache)
        branches = cache.select_rows([0, 0])
    with torch.no_grad():
        cache.crop(2)
        adapter(torch.randn(1, 1, 32), torch.tensor([[2]]), None, cache)
        branches.crop(3)
    assert (cache.length, branches.length) == (3, 3)


def test_an_adapter_that_checkpoints_gradients_refuses_a_cache_it_would_drop():
    adapter = HFBackbone(HFBackboneConfig(model_config=FIELDS, gradient_checkpointing=True)).train()
    cache = adapter.new_cache(1, 8)
    with pytest.raises(ValueError, match="drops the cache of layers that checkpoint their gradients"):
        adapter(torch.randn(1, 3, 32), torch.arange(3)[None], None, cache)
    assert cache.length == 0
    with torch.no_grad():  # without gradients nothing is checkpointed and the cache fills
        adapter(torch.randn(1, 3, 32), torch.arange(3)[None], None, cache)
    assert cache.length == 3 and cache.hf_cache.get_seq_length() == 3


def test_an_adapter_step_that_fails_midway_leaves_every_layer_as_it_was():
    adapter, _ = adapter_and_native()
    prompt, step = torch.randn(1, 4, 32), torch.randn(1, 1, 32)
    with torch.no_grad():
        cache = adapter.new_cache(1, 8)
        adapter(prompt, torch.arange(4)[None], None, cache)

        def fail(*args):
            raise RuntimeError("out of memory")

        hook = adapter.model.layers[-1].register_forward_pre_hook(fail)  # the first layer has appended by then
        with pytest.raises(RuntimeError, match="out of memory"):
            adapter(step, torch.tensor([[4]]), None, cache)
        hook.remove()
        assert cache.length == 4 and [cache.hf_cache.get_seq_length(i) for i in range(2)] == [4, 4]
        fresh = adapter.new_cache(1, 8)
        adapter(prompt, torch.arange(4)[None], None, fresh)
        torch.testing.assert_close(adapter(step, torch.tensor([[4]]), None, cache),
                                   adapter(step, torch.tensor([[4]]), None, fresh))


def test_training_with_gradient_checkpointing_recomputes_the_adapters_layers():
    """The trainer's switch reaches transformers' own checkpointing, and the config says what runs."""
    from nextstep.training.text_to_image import TextToImageTask

    preset = tiny()
    hf_fields = {"model_type": "qwen2", **{k: v for k, v in preset.backbone.config.to_hf_config().items()
                                          if k not in ("model_type", "architectures")}}
    spec = ComponentSpec("backbone", "huggingface", HFBackboneConfig(model_config=hf_fields))
    model = build_model(preset.replace(backbone=spec), seed=0).train()
    task = TextToImageTask(model)
    task.enable_gradient_checkpointing()
    backbone = model.backbone
    assert backbone.config.gradient_checkpointing and backbone.model.is_gradient_checkpointing
    calls = []
    backbone.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    embeds = torch.randn(1, 4, backbone.hidden_size, requires_grad=True)
    backbone(embeds, torch.arange(4)[None]).sum().backward()
    assert len(calls) == 2  # the forward, and its recomputation in the backward pass
    backbone.set_gradient_checkpointing(False)
    assert not backbone.config.gradient_checkpointing and not backbone.model.is_gradient_checkpointing
    # FSDP shards the adapter's decoder layers as their own units.
    assert task.shard_units() == list(backbone.model.layers)


def test_an_adapter_path_without_a_model_says_what_it_found(tmp_path):
    import re

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(f"expected a Hugging Face model directory (with "
                                                          f"config.json) at '{missing}', found nothing")):
        HFBackbone(HFBackboneConfig(path=str(missing)))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"at '.*', found a folder without config.json "
                                                r"\(holding model.safetensors\)"):
        HFBackbone(HFBackboneConfig(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="found a file"):
        HFBackbone(HFBackboneConfig(path=str(tmp_path / "model.safetensors")))


def test_a_cropped_adapter_cache_marks_no_slot_past_its_length_as_real_as_the_native_cache_does():
    adapter, native = adapter_and_native()
    mask = torch.tensor([[False, True, True, True, True]])
    with torch.no_grad():
        for backbone in (adapter, native):
            cache = backbone.new_cache(1, 8)
            backbone(torch.randn(1, 5, 32), positions_from_mask(mask), mask, cache)
            cache.crop(3)
            assert cache.length == 3
            assert cache.key_mask[0].tolist() == [False, True, True] + [False] * 5, type(backbone).__name__


def test_a_new_embedding_table_sets_the_wrapped_models_vocabulary_size():
    adapter, _ = adapter_and_native()
    adapter.set_input_embeddings(torch.nn.Embedding(120, 32))
    assert adapter.vocab_size == adapter.model.config.vocab_size == 120
    assert adapter.config.model_config["vocab_size"] == 120
    assert HFBackbone.from_model(adapter.model).config.model_config["vocab_size"] == 120
