"""The component registry: names belong to classes, and a model saves only what loads back as itself."""

from dataclasses import dataclass

import pytest
import torch

from nextstep import build_model, generate_tokens
from nextstep.config import ComponentSpec, Config
from nextstep.heads import FlowMatchingHead
from nextstep.presets import tiny
from nextstep.registry import component_class, component_names, register_component, registered_name
from nextstep.samplers import EulerSampler, HeunSampler


def test_a_subclass_of_a_registered_class_is_not_saved_under_its_parents_name(tiny_model, tmp_path):
    class UniformTimeHead(FlowMatchingHead):
        pass

    assert registered_name("image_head", FlowMatchingHead) == "flow_matching"
    assert registered_name("image_head", UniformTimeHead) is None
    tiny_model.image_head = UniformTimeHead(tiny_model.image_head.config)
    with pytest.raises(ValueError, match="image_head UniformTimeHead is not registered"):
        tiny_model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_replace_gives_a_name_to_a_class_defined_again():
    def define():
        @register_component("sampler", "test_redefined_heun", replace=True)
        class RedefinedHeun(HeunSampler):
            pass

        return RedefinedHeun

    first, second = define(), define()
    assert first is not second and component_class("sampler", "test_redefined_heun") is second
    assert registered_name("sampler", second) == "test_redefined_heun" and registered_name("sampler", first) is None
    with pytest.raises(ValueError, match=r"already registered to RedefinedHeun \(replace=True gives the name"):
        register_component("sampler", "test_redefined_heun")(type("Other", (HeunSampler,), {}))


@dataclass
class NeedsConfig(Config):
    scale: float = 1.0


@register_component("sampler", "test_needs_config")
class NeedsConfigSampler(EulerSampler):
    config_class = NeedsConfig

    def __init__(self, config: NeedsConfig):  # the documented rule: the config is the only argument
        super().__init__()
        self.config = config


def test_a_sampler_named_in_generate_is_built_from_its_default_config(tiny_model):
    tokens, _, _ = generate_tokens(tiny_model, ["a"], height=32, width=32, num_steps=2, cfg=1.0,
                                   sampler="test_needs_config")
    assert torch.isfinite(tokens).all()


def test_a_component_built_from_another_classes_config_is_refused():
    preset = tiny()
    wrong = ComponentSpec("sampler", "test_needs_config", preset.sampler.config)
    with pytest.raises(ValueError, match=r"sampler\.config must be a NeedsConfig \(the config of sampler "
                                         r"'test_needs_config'\), found EulerSamplerConfig"):
        preset.replace(sampler=wrong)
    config = preset.replace(sampler=ComponentSpec("sampler", "test_needs_config", NeedsConfig()))
    config.sampler.config = preset.sampler.config  # changed after the config was checked
    with pytest.raises(ValueError, match=r"sampler 'test_needs_config' \(NeedsConfigSampler\) takes a NeedsConfig, "
                                         r"found EulerSamplerConfig"):
        build_model(config)


def test_an_unknown_name_says_how_a_component_of_your_own_becomes_known():
    with pytest.raises(ValueError, match=r"unknown image_head 'mode_time'; known: .* --import MODULE"):
        component_class("image_head", "mode_time")


def test_a_class_without_a_config_class_is_refused_by_name():
    from nextstep.samplers.base import Sampler

    class Plain(Sampler):  # inherits config_class = None
        def sample(self, velocity_fn, noise, time_grid, step_noise=None):
            return noise

    for cls in (Plain, type("Bare", (), {})):
        with pytest.raises(TypeError, match=rf"{cls.__name__} needs a 'config_class' attribute \(a Config dataclass\)"):
            register_component("sampler", "test_without_config")(cls)
    assert "test_without_config" not in component_names("sampler")


def test_a_class_is_registered_only_under_the_kind_it_was_registered_as():
    assert registered_name("image_head", FlowMatchingHead) == "flow_matching"
    for kind in ("image_tokenizer", "text_tokenizer", "backbone", "sampler"):
        assert registered_name(kind, FlowMatchingHead) is None, kind
    assert registered_name("image_head", EulerSampler) is None


def test_a_preset_name_belongs_to_one_function_unless_replaced():
    from nextstep.presets import tiny
    from nextstep.registry import _MODELS, model_preset, register_model

    def other():
        return tiny()

    register_model("tiny")(tiny)  # the same function again: nothing changes
    with pytest.raises(ValueError, match=r"model preset 'tiny' is already registered to nextstep\.presets\.tiny"):
        register_model("tiny")(other)
    assert model_preset("tiny") is tiny
    try:
        register_model("preset_replaced_for_test")(tiny)
        register_model("preset_replaced_for_test", replace=True)(other)
        assert model_preset("preset_replaced_for_test") is other
    finally:
        _MODELS.pop("preset_replaced_for_test", None)
    with pytest.raises(ValueError, match="non-empty string, found ''"):
        register_model("")
    with pytest.raises(TypeError, match="found str"):
        register_model("preset_of_a_string_for_test")("tiny")
