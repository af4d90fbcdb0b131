"""Samplers with fields of their config changed, by name: `sampler_with_options` and `SamplingSettings`."""

import numpy as np
import pytest

from nextstep.config import ComponentSpec
from nextstep.evaluation.sampling import SamplingSettings, generate_images
from nextstep.generation import decode_tokens, generate_tokens, sampler_with_options
from nextstep.images import to_pil
from nextstep.samplers.euler_maruyama import EulerMaruyamaSampler, EulerMaruyamaSamplerConfig

OWN = ComponentSpec("sampler", "euler_maruyama", EulerMaruyamaSamplerConfig(last_step_size=0.1, to_one=True))


def test_without_options_the_sampler_is_the_name_itself():
    assert sampler_with_options(OWN, None, {}) is None
    assert sampler_with_options(OWN, "heun", {}) == "heun"


def test_the_model_s_own_sampler_keeps_its_other_settings_and_another_starts_from_its_defaults():
    own = sampler_with_options(OWN, None, {"to_one": False})
    assert isinstance(own, EulerMaruyamaSampler)
    assert (own.config.last_step_size, own.config.to_one) == (0.1, False)
    assert sampler_with_options(OWN, "euler_maruyama", {"to_one": False}).config.last_step_size == 0.1
    other = ComponentSpec.named("sampler", "euler")
    assert sampler_with_options(other, "euler_maruyama", {"to_one": True}).config == \
        EulerMaruyamaSamplerConfig(to_one=True)


@pytest.mark.parametrize(("sampler", "options", "message"), [
    (None, {"nope": 1}, "sampler options for euler_maruyama: EulerMaruyamaSamplerConfig got unknown key(s) ['nope']"),
    (None, {"last_step_size": 2.0}, "EulerMaruyamaSamplerConfig: last_step_size must be in [0, 1), found 2.0"),
    ("no_such_sampler", {"a": 1}, "no_such_sampler"),
    (None, ["to_one"], "sampler options must be a mapping of config field -> value, found list"),
])
def test_options_a_sampler_does_not_take_are_refused_naming_it(sampler, options, message):
    with pytest.raises(ValueError) as error:
        sampler_with_options(OWN, sampler, options)
    assert message in str(error.value)


@pytest.mark.parametrize("options", [["to_one"], {1: True}, "to_one=true"])
def test_settings_refuse_options_that_are_not_a_dict_of_names(options):
    with pytest.raises(ValueError, match="sampler_options must be None or a dict of config field name -> value"):
        SamplingSettings(sampler_options=options)


def test_evaluation_images_are_drawn_with_the_sampler_the_options_make(trained_like_model):
    settings = SamplingSettings(height=32, width=32, num_steps=3, batch_size=2, sampler="euler_maruyama",
                                sampler_options={"last_step_size": 0.5})
    prompts = ["a red circle", "two squares"]
    drawn = generate_images(trained_like_model, prompts, settings)
    sampler = EulerMaruyamaSampler(EulerMaruyamaSamplerConfig(last_step_size=0.5))
    tokens, grid_h, grid_w = generate_tokens(trained_like_model, prompts, height=32, width=32, cfg=settings.cfg,
                                             num_steps=3, seed=0, sampler=sampler)
    expected = to_pil(decode_tokens(trained_like_model, tokens, grid_h, grid_w))
    plain = generate_images(trained_like_model, prompts, SamplingSettings(
        height=32, width=32, num_steps=3, batch_size=2, sampler="euler_maruyama"))
    assert np.array_equal(_pixels(drawn), _pixels(expected))
    assert not np.array_equal(_pixels(drawn), _pixels(plain))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])
