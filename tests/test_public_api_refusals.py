"""Wrong input to the public API is refused with a message that names what was expected and what was found."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nextstep import build_model
from nextstep.cli import main


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate("x", images=torch.zeros(0, 3, 32, 32)),
     "image tensors must hold at least one image, found shape (0, 3, 32, 32)"),
    (lambda m: m.caption(torch.zeros(0, 3, 32, 32)),
     "image tensors must hold at least one image, found shape (0, 3, 32, 32)"),
    (lambda m: m.caption(torch.zeros(1, 3, 32, 32), stop_ids=5),
     "stop_ids must be a list of ids in [0, 266), found int 5"),
    (lambda m: m.caption(torch.zeros(1, 3, 32, 32), banned_ids="ab"),
     "banned_ids must be a list of ids in [0, 266), found str"),
    (lambda m: m.generate({"a", "b"}, height=32, width=32, num_steps=1),
     "prompts must be a str or a list of them, found set"),
    (lambda m: m.generate({"a": 1}, height=32, width=32, num_steps=1), "found dict"),
    (lambda m: m.generate("a", height=32, width=32, num_steps=1, progress="yes"),
     "progress must be True (a progress bar), False or None (none) or a callable progress(done, total), "
     "found str 'yes'"),
    (lambda m: m.generate("a", height=32, width=32, num_steps=1, token_sampler="fast"),
     "token_sampler must be a FastTokenSampler (FastTokenSampler(model), or "
     "nextstep.fast.token_sampler.token_sampler_named(model, name)), found str 'fast'"),
])
def test_generation_and_captioning_refuse_wrong_arguments(model, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(model)


def test_a_guidance_object_takes_no_separate_schedule(model):
    from nextstep.samplers import ClassifierFreeGuidance

    with pytest.raises(ValueError, match=r"cfg_schedule schedules a guidance scale; a Guidance object carries its own "
                                         r"schedule \(give it when building the object\), found "
                                         r"cfg=ClassifierFreeGuidance and cfg_schedule='linear_increasing'"):
        model.generate("a", height=32, width=32, num_steps=1, cfg=ClassifierFreeGuidance(3.0),
                       cfg_schedule="linear_increasing")
    assert model.generate("a", height=32, width=32, num_steps=1, cfg=ClassifierFreeGuidance(3.0))[0].size == (32, 32)


def test_sampling_refuses_what_is_not_a_model():
    from nextstep.generation import generate_tokens

    with pytest.raises(ValueError, match=r"model must be a NextStep model \(nextstep.load_model or build_model\), "
                                         r"found NoneType"):
        generate_tokens(None, "a")


@pytest.mark.parametrize("seed", [1.5, "0", 2**64, -1])
def test_building_refuses_a_seed_generation_would_refuse(seed):
    from nextstep import load_model

    with pytest.raises(ValueError, match=r"seed must be"):
        build_model("tiny", seed=seed)
    with pytest.raises(ValueError, match=r"seed must be"):
        load_model("tiny", seed=seed)


def test_a_component_of_another_kind_is_named_as_such(model):
    from nextstep.model_config import ModelConfig

    data = model.config.to_dict()
    data["backbone"] = {**data["backbone"], "kind": "sampler"}
    with pytest.raises(ValueError, match=r"^ModelConfig.backbone must be a component of kind 'backbone', found kind "
                                         r"'sampler'$"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"^ModelConfig expects JSON text, found 'nope' \(Expecting value"):
        ModelConfig.from_json("nope")


def test_a_recipe_s_sample_guidance_is_checked_when_it_loads():
    from nextstep.training.recipe import load_recipe

    for value in ("-1", "-0.5", "NaN"):
        with pytest.raises(ValueError, match=r"sample_cfg must be a finite number( >= 0)?, found"):
            load_recipe("tiny_emoji_shapes", [f"train.sample_cfg={value}"])


def test_long_lists_of_mismatched_keys_are_cut_to_the_first_five_and_counted():
    from nextstep.weights import key_problems

    assert key_problems(["a"], [], []) == "missing keys ['a']"
    unexpected = [f"layers.{i}.weight" for i in range(45)]
    shapes = [f"w{i}: expected (2,), found (3,)" for i in range(7)]
    assert key_problems([], unexpected, shapes) == (
        "unexpected keys ['layers.0.weight', 'layers.1.weight', 'layers.2.weight', 'layers.3.weight', "
        "'layers.4.weight'] and 40 more, mis-shaped keys [w0: expected (2,), found (3,); "
        "w1: expected (2,), found (3,); w2: expected (2,), found (3,); w3: expected (2,), found (3,); "
        "w4: expected (2,), found (3,)] and 2 more")


def test_loading_a_config_with_another_model_s_weights_says_so_briefly(tmp_path, model):
    model.save_pretrained(tmp_path / "a")
    other = model.config.to_dict()
    other["backbone"]["num_layers"] = other["backbone"]["num_layers"] + 3
    (tmp_path / "a" / "config.json").write_text(json.dumps(other))
    from nextstep.model import NextStep

    with pytest.raises(ValueError, match=r"missing keys \[.*\] and \d+ more") as error:
        NextStep.from_pretrained(tmp_path / "a")
    assert len(str(error.value)) < 1000


def test_the_head_names_wrong_dtypes_shapes_and_types(model):
    head = model.image_head
    tokens, conditions = torch.randn(3, head.token_dim), torch.randn(3, head.condition_dim)
    with pytest.raises(ValueError, match=r"x_t and condition must be in the head's dtype torch.float32 \(or under "
                                         r"autocast\), found torch.float64 and torch.float32"):
        head.velocity(tokens.double(), torch.rand(3), conditions)
    with pytest.raises(ValueError, match="condition must be a torch.Tensor, found ndarray"):
        head.velocity(tokens, torch.rand(3), conditions.numpy())
    with pytest.raises(ValueError, match=r"flow_error needs t of shape \(3,\) and noise of shape \(3, 64\) for a "
                                         r"target of that shape, found \(4,\) and \(3, 64\)"):
        head.flow_error(tokens, conditions, torch.rand(4), tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own mixed dtypes are not refused
        assert head.velocity(tokens, torch.rand(3), conditions.bfloat16()).shape == (3, head.token_dim)


def test_samplers_refuse_noise_that_is_not_a_batch_of_tokens():
    from nextstep.samplers import EulerMaruyamaSampler
    from nextstep.samplers.time_grid import time_grid

    sampler = EulerMaruyamaSampler(EulerMaruyamaSampler.config_class())
    with pytest.raises(ValueError, match=r"EulerMaruyamaSampler needs noise of shape \(N, D\), found \(64,\)"):
        sampler.sample(lambda x, t: -x, torch.randn(64), time_grid(4), torch.randn(4, 1, 64))


@pytest.mark.parametrize("noise", [-1.0, float("nan"), float("inf")])
def test_a_forward_pass_refuses_context_noise_that_is_not_a_scale(model, noise):
    from nextstep.images import from_pil
    from nextstep.training.data.shapes.world import ShapesConfig, ShapesDataset

    sample = ShapesDataset(ShapesConfig(num_samples=1, size=32)).load(0)
    batch = model.prepare_batch(from_pil([sample.image]), [sample.caption])
    with pytest.raises(ValueError, match=r"context_noise must be a finite number >= 0 \(0: clean context\), found"):
        model(batch, context_noise=noise)


def test_generate_checks_the_request_before_the_folder_of_another_one(tmp_path, capsys):
    common = ["generate", "p", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32", "--quiet"]
    out = tmp_path / "out"
    assert main(common + ["-o", str(out)]) == 0
    with pytest.raises(SystemExit):
        main(common + ["-o", str(out), "--cfg", "nan"])
    assert "argument --cfg: expected a finite number >= 0 (at most 3.403e+38), found nan" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # finite in float64, but not as the float32 it is applied in
        main(common + ["-o", str(out), "--cfg", "1e39"])
    assert "argument --cfg: expected a finite number >= 0 (at most 3.403e+38), found 1e39" in capsys.readouterr().err
    assert main(common + ["-o", str(out), "--sampler", "ralston"]) == 2  # not "already holds ... --overwrite"
    assert "unknown sampler 'ralston'" in capsys.readouterr().err
    assert main(common + ["-o", str(out), "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(common + ["-o", "/proc/nextstep-out"]) == 2  # a folder no one can create, refused before sampling
    assert "cannot create the output folder /proc/nextstep-out: No such file or directory" in capsys.readouterr().err
