import dataclasses
import json

import pytest

from nextstep import ModelConfig, model_names, model_preset
from nextstep.backbones import Qwen2BackboneConfig
from nextstep.config import ComponentSpec, Config
from nextstep.heads import FlowMatchingHeadConfig
from nextstep.registry import component_class, component_names
from nextstep.tokenizers import FluxVAEConfig


@pytest.mark.parametrize("name", model_names())
def test_presets_round_trip_through_json(name):
    config = model_preset(name)()
    text = config.to_json()
    again = ModelConfig.from_json(text)
    assert again == config
    assert json.loads(again.to_json()) == json.loads(text)


def test_unknown_key_is_an_error_naming_it():
    data = model_preset("tiny")().to_dict()
    data["backbone"]["num_layerz"] = 3
    with pytest.raises(ValueError, match="num_layerz"):
        ModelConfig.from_dict(data)
    data = model_preset("tiny")().to_dict()
    data["lambda_txt"] = 1.0
    with pytest.raises(ValueError, match="lambda_txt"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "factory, field, value",
    [
        (Qwen2BackboneConfig, "num_kv_heads", 3),
        (Qwen2BackboneConfig, "attention_backend", "flash9"),
        (Qwen2BackboneConfig, "hidden_size", 0),
        (FlowMatchingHeadConfig, "depth", 0),
        (FlowMatchingHeadConfig, "time_sampling", "cosine"),
        (FluxVAEConfig, "normalization", "batch_norm"),
        (FluxVAEConfig, "norm_groups", 7),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(factory, field, value):
    with pytest.raises(ValueError, match=field):
        factory(**{field: value})


def test_model_config_validates_loss_weights_and_dropout():
    config = model_preset("tiny")()
    with pytest.raises(ValueError, match="image_first_probability"):
        config.replace(image_first_probability=1.5)
    with pytest.raises(ValueError, match="text_loss_weight"):
        config.replace(text_loss_weight=-1.0)


def test_unknown_component_type_lists_known_names():
    with pytest.raises(ValueError, match="known"):
        ComponentSpec.from_dict({"kind": "sampler", "type": "no-such-solver"})
    with pytest.raises(ValueError, match="euler"):
        component_class("sampler", "no-such-solver")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        model_preset("huge-model")


def test_every_kind_has_a_registered_implementation():
    for kind in ComponentSpec.kinds:
        assert component_names(kind), kind


def test_config_save_and_load(tmp_path):
    config = model_preset("tiny")()
    path = tmp_path / "sub" / "config.json"
    config.save(path)
    assert ModelConfig.load(path) == config
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        ModelConfig.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ModelConfig.load(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"expected a config file at .*sub, found a directory"):
        ModelConfig.load(tmp_path / "sub")
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"latin1.json is not valid JSON text"):
        ModelConfig.load(tmp_path / "latin1.json")


def test_missing_keys_and_unknown_fields_are_value_errors_naming_them():
    from nextstep.generation_defaults import GenerationDefaults

    backbone = model_preset("tiny")().backbone.to_dict()
    with pytest.raises(ValueError, match=r"ModelConfig needs key\(s\) \['image_tokenizer', 'text_tokenizer', "
                                         r"'image_head', 'sampler'\], found \['backbone'\]"):
        ModelConfig.from_dict({"backbone": backbone})
    with pytest.raises(ValueError, match=r"GenerationDefaults has no field\(s\) \['num_step'\]; known fields are "
                                         r"\[.*'num_steps'"):
        GenerationDefaults().replace(num_step=10)


def test_a_component_spec_must_hold_its_types_config():
    from nextstep.samplers.euler import EulerSamplerConfig

    config = model_preset("tiny")()
    with pytest.raises(ValueError, match=r"sampler\.config must be a EulerSamplerConfig \(the config of sampler "
                                         r"'euler'\), found Qwen2BackboneConfig"):
        config.replace(sampler=ComponentSpec("sampler", "euler", Qwen2BackboneConfig()))
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; known: \["):
        config.replace(sampler=ComponentSpec("sampler", "nope", EulerSamplerConfig()))
    with pytest.raises(ValueError, match="a sampler's config must be a Config dataclass, found int"):
        ComponentSpec("sampler", "euler", 5)


@pytest.mark.parametrize("config_class, data, message", [
    (FluxVAEConfig, {"ch": "16"}, r"FluxVAEConfig\.ch must be an integer, found str '16'"),
    (FluxVAEConfig, {"ch": 16.5}, r"FluxVAEConfig\.ch must be an integer, found float 16\.5"),
    (FluxVAEConfig, {"ch": True}, r"FluxVAEConfig\.ch must be an integer, found bool True"),
    (FluxVAEConfig, {"ch_mult": 4}, r"FluxVAEConfig\.ch_mult must be a list, found int 4"),
    (FluxVAEConfig, {"ch_mult": [1, "2"]}, r"ch_mult must be a list whose items are each an integer"),
    (FluxVAEConfig, {"deterministic": "yes"}, r"deterministic must be true or false, found str 'yes'"),
    (Qwen2BackboneConfig, {"rope_theta": "1e6"}, r"Qwen2BackboneConfig\.rope_theta must be a finite number"),
    (ModelConfig, {"backbone": []}, r"ModelConfig\.backbone must be a mapping \(ComponentSpec\), found list"),
])
def test_fields_of_the_wrong_type_name_the_field_and_both_types(config_class, data, message):
    with pytest.raises(ValueError, match=message):
        config_class.from_dict(data)


def test_built_or_replaced_configs_are_checked_as_read_ones_are():
    import math

    from nextstep.compile import CompileConfig
    from nextstep.presets import tiny as tiny_config
    from nextstep.training import TrainConfig

    with pytest.raises(ValueError, match=r"ModelConfig\.use_norm must be true or false, found int 1"):
        tiny_config().replace(use_norm=1)
    with pytest.raises(ValueError, match=r"ModelConfig\.text_loss_weight must be a finite number, found str 'abc'"):
        tiny_config().replace(text_loss_weight="abc")
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match=r"FluxVAEConfig\.shift_factor must be a finite number"):
            FluxVAEConfig(shift_factor=value)
        with pytest.raises(ValueError, match=r"TrainConfig\.learning_rate must be a finite number"):
            TrainConfig.from_dict({"learning_rate": value})
    compiled = TrainConfig(compile={"mode": "default"})  # a nested config given as a mapping becomes one
    assert isinstance(compiled.compile, CompileConfig)
    assert TrainConfig.from_dict(json.loads(json.dumps(compiled.to_dict()))) == compiled


def test_numbers_read_as_floats_where_a_float_is_expected():
    assert Qwen2BackboneConfig.from_dict({"rope_theta": 10000}).rope_theta == 10000
    with pytest.raises(ValueError, match="rope_theta must be a finite number"):
        Qwen2BackboneConfig.from_dict({"rope_theta": 10**400})  # a JSON integer too large for a float


def test_a_component_config_cannot_use_the_names_of_a_saved_component():
    from dataclasses import dataclass

    from nextstep.config import Config
    from nextstep.registry import register_component
    from nextstep.samplers import EulerSampler

    @dataclass
    class TypedConfig(Config):
        type: str = "plain"

    class Typed(EulerSampler):
        config_class = TypedConfig

    with pytest.raises(ValueError, match=r"TypedConfig has field\(s\) \['type'\], which name the component"):
        register_component("sampler", "typed-sampler")(Typed)
    assert "typed-sampler" not in component_names("sampler")


@pytest.mark.parametrize("spec, message", [
    ({"kind": "sampler", "type": ["euler"]}, r"a sampler's type must be a registered name \(a string\), found list"),
    ({"kind": {"a": 1}, "type": "euler"}, r"kind must be one of .*, found \{'a': 1\}"),
])
def test_a_malformed_saved_component_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        ComponentSpec.from_dict(spec)


def test_dataset_specs_round_trip_and_repeat_counts_are_integers():
    from nextstep.training.data.source import DataConfig

    data = DataConfig(datasets=({"type": "shapes", "kinds": ("single_object", "counting"), "repeat": 2},))
    assert DataConfig.from_dict(json.loads(json.dumps(data.to_dict()))) == data
    with pytest.raises(ValueError, match=r"datasets\[0\]\.repeat must be an integer >= 1, found True"):
        DataConfig(datasets=({"type": "shapes", "repeat": True},))


def test_optional_nested_fields_and_configs_defined_in_a_function_build():
    namespace: dict = {}
    exec(  # a module with postponed annotations, whose config classes are defined inside a function
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from typing import Optional\n"
        "from nextstep.config import ComponentSpec, Config\n"
        "def make():\n"
        "    @dataclass\n"
        "    class Inner(Config):\n"
        "        x: int = 1\n"
        "    @dataclass\n"
        "    class Outer(Config):\n"
        "        inner: Inner | None = None\n"
        "        fallback: Optional[ComponentSpec] = None\n"
        "    return Inner, Outer\n"
        "@dataclass\n"
        "class Counted(Config):\n"
        "    count: int | None = None\n", namespace)
    inner, outer = namespace["make"]()
    assert outer().fallback is None and outer(inner=inner()).inner == inner()
    assert namespace["Counted"]().count is None
    with pytest.raises(ValueError, match=r"Counted\.count must be an integer or null, found str 'x'"):
        namespace["Counted"](count="x")  # an optional field is checked too


def test_a_refused_value_names_its_config():
    from nextstep.heads import FlowMatchingHeadConfig

    with pytest.raises(ValueError, match=r"^FlowMatchingHeadConfig: time_sampling must be"):
        FlowMatchingHeadConfig(time_sampling="gamma")


@dataclasses.dataclass
class _Stage(Config):
    steps: int = 1


@dataclasses.dataclass
class _Plan(Config):
    stages: tuple[_Stage, ...] = ()
    pair: tuple[_Stage, float] = (_Stage(), 1.0)
    named: dict[str, _Stage] = dataclasses.field(default_factory=dict)
    samplers: tuple[ComponentSpec, ...] = ()


def test_configs_nested_in_sequences_and_mappings_rebuild_from_plain_data():
    from nextstep.samplers import EulerSamplerConfig

    plan = _Plan(stages=(_Stage(2), _Stage(3)), pair=(_Stage(4), 0.5), named={"warm": _Stage(5)},
                 samplers=(ComponentSpec("sampler", "euler", EulerSamplerConfig()),))
    again = _Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and isinstance(again.stages[0], _Stage) and isinstance(again.named["warm"], _Stage)
    assert isinstance(again.samplers[0], ComponentSpec) and isinstance(again.pair[0], _Stage)
    with pytest.raises(ValueError, match=r"_Plan\.named must be a mapping whose values are each a mapping"):
        _Plan.from_dict({"named": {"warm": 5}})
    with pytest.raises(ValueError, match=r"_Plan\.stages must be a list whose items are each a mapping"):
        _Plan.from_dict({"stages": [5]})


@dataclasses.dataclass
class _Counts(Config):
    values: list[int] = dataclasses.field(default_factory=list)


def test_sequences_are_held_as_tuples_however_they_are_given():
    from hypothesis import given
    from hypothesis import strategies as st

    @given(values=st.lists(st.integers(-5, 5), max_size=5))
    def check(values):
        config = _Counts(values=values)
        assert isinstance(config.values, tuple) and config == _Counts(values=tuple(values))
        assert isinstance(config.replace(values=list(values)).values, tuple)
        assert _Counts.from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert config.to_dict() == {"values": list(values)}

    check()


def test_component_specs_are_equal_only_when_their_configs_are():
    config = model_preset("tiny")()
    deeper = config.backbone.config.replace(num_layers=3)
    assert ComponentSpec("backbone", "qwen2", deeper) != config.backbone
    assert config.replace(backbone=ComponentSpec("backbone", "qwen2", deeper)) != config
    assert ComponentSpec("backbone", "qwen2", config.backbone.config.replace()) == config.backbone


def test_a_count_is_an_integer_of_at_least_one():
    from hypothesis import given
    from hypothesis import strategies as st

    from nextstep.config import is_count, require_count

    @given(value=st.one_of(st.integers(-3, 3), st.booleans(), st.floats(-3, 3)))
    def check(value):
        counts = type(value) is int and value >= 1
        assert is_count(value) is counts
        if counts:
            require_count("batch_size", value)
        else:
            with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, found"):
                require_count("batch_size", value)

    check()


def test_model_config_refuses_a_negative_image_loss_weight():
    config = model_preset("tiny")()
    with pytest.raises(ValueError, match=r"image_loss_weight must be >= 0, found -0.5"):
        config.replace(image_loss_weight=-0.5)
    assert config.replace(image_loss_weight=0.0).image_loss_weight == 0.0


def test_the_compact_preset_has_the_shape_of_the_shipped_model():
    from nextstep.pretrained import bundled_model_path

    shipped = ModelConfig.load(bundled_model_path("emoji-shapes-64") / "config.json")
    compact = model_preset("compact")()
    differing = {key for key, value in compact.backbone.config.to_dict().items()
                 if shipped.backbone.config.to_dict()[key] != value}
    assert differing <= {"vocab_size"}  # the shipped model's text tokenizer knows words besides bytes
    assert compact.image_head == shipped.image_head


def test_the_tiny_preset_has_its_documented_shape():
    config = model_preset("tiny")()
    backbone, head = config.backbone.config, config.image_head.config
    assert (backbone.num_layers, backbone.hidden_size, backbone.intermediate_size) == (2, 64, 128)
    assert (backbone.num_heads, backbone.num_kv_heads) == (4, 2)  # grouped-query attention, as in Qwen2.5
    assert (head.depth, head.width, head.condition_dim) == (2, 64, 64)
    assert (config.text_tokenizer.type, config.image_tokenizer.config.ch) == ("byte", 32)


def test_every_difference_between_two_mappings_is_found_and_counted_in_words():
    from hypothesis import given
    from hypothesis import strategies as st

    from nextstep.config import differences_phrase, plain_differences

    values = st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 2), max_size=8)

    @given(there=values, here=values, most=st.integers(1, 4))
    def check(there, here, most):
        nested_there, nested_here = {"data": there}, {"data": here}
        differences = plain_differences("run", nested_there, nested_here)
        keys = sorted(key for key in set(there) | set(here) if there.get(key) != here.get(key))
        assert differences == [(f"run.data.{key}", there.get(key), here.get(key)) for key in keys]
        phrase = differences_phrase(differences, most=most)
        assert phrase.count(" there, ") == min(len(keys), most)
        more = len(keys) - most
        assert phrase.endswith(f"; and {more} more") if more > 0 else "more" not in phrase

    check()
    for count in range(6):
        differences = [(f"run.{index}", index, index + 1) for index in range(count)]
        phrase = differences_phrase(differences, most=3)
        assert phrase.count(" there, ") == min(count, 3)
        assert phrase.endswith(f"; and {count - 3} more") if count > 3 else "more" not in phrase


def test_only_a_saved_model_config_describes_a_model():
    from nextstep.model_config import describes_a_model

    assert describes_a_model(model_preset("tiny")().to_dict())
    assert not describes_a_model({"backbone": {"kind": "backbone", "type": "qwen2"}})  # a model's parts, not a model
    assert not describes_a_model({"model_type": "qwen2", "hidden_size": 64})  # a Hugging Face config.json
    assert not describes_a_model(["backbone", "image_tokenizer"])
