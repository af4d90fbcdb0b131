"""Qwen2Backbone options: config validation, gradient checkpointing, compiled decode."""

import warnings

import pytest
import torch

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig, positions_from_mask
from nextstep.backbones.ahead_of_time import ahead_of_time_available

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("changes, message", [
    ({"num_kv_heads": 3}, "num_kv_heads must be a divisor of num_heads=4, found 3"),
    ({"num_heads": 5, "num_kv_heads": 1}, "hidden_size must be a multiple of num_heads=5"),
    ({"head_dim": 7}, "head_dim must be a positive even integer, found 7"),
    ({"num_layers": 0}, "num_layers must be a positive integer, found 0"),
    ({"rope_theta": 0.0}, "rope_theta must be positive"),
    ({"hidden_size": 12, "num_heads": 4, "num_kv_heads": 4}, "hidden_size / num_heads is even"),
])
def test_bad_shapes_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        Qwen2BackboneConfig(**{**SMALL, **changes})


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match="unknown key"):
        Qwen2BackboneConfig.from_dict({**SMALL, "num_hidden_layers": 2})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).train()
    recomputed = Qwen2Backbone(Qwen2BackboneConfig(**SMALL, gradient_checkpointing=True)).train()
    recomputed.load_state_dict(plain.state_dict())
    embeds = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    for model in (plain, recomputed):
        model(embeds, positions_from_mask(mask), mask)[mask].square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def decode(model, steps=5, batch=2, prompt=4):
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, prompt + steps, 32, generator=generator)
    mask = torch.ones(batch, prompt, dtype=torch.bool)
    mask[-1, :2] = False  # the last row is left-padded
    positions = positions_from_mask(mask)
    with torch.no_grad():
        cache = model.new_cache(batch, prompt + steps + 3)
        out = [model(embeds[:, :prompt], positions, mask, cache)]
        for i in range(steps):
            out.append(model(embeds[:, prompt + i:prompt + i + 1], positions[:, -1:] + 1 + i,
                             torch.ones(batch, 1, dtype=torch.bool), cache))
    return torch.cat(out, 1)[:, prompt - 1:]


def test_compiled_decode_traces_as_one_graph_and_matches_eager():
    """``fullgraph=True`` fails on any graph break; the eager backend keeps this check fast."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).eval()
    expected = decode(model)
    model.compile_decode(backend="eager")
    torch.testing.assert_close(decode(model), expected, atol=1e-5, rtol=1e-5)
    model.disable_compiled_decode()
    torch.testing.assert_close(decode(model), expected)


@pytest.mark.slow
def test_compiled_decode_with_inductor_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).eval()
    expected = decode(model)
    model.compile_decode()
    torch.testing.assert_close(decode(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_sees_weights_updated_in_place():
    """The CPU default skips module guards; parameters are still graph inputs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).eval()
    model.compile_decode()
    decode(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    compiled = decode(model)
    model.disable_compiled_decode()
    torch.testing.assert_close(compiled, decode(model), atol=1e-5, rtol=1e-5)


def test_compiled_decode_falls_back_to_eager_at_the_recompile_limit():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).eval()
    model.compile_decode(backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        outputs = []
        for capacity in (5, 6):
            cache = model.new_cache(1, capacity)
            model(torch.ones(1, 2, 32), torch.arange(2)[None], None, cache)
            if capacity == 6:
                with pytest.warns(RuntimeWarning, match="recompile limit"):
                    outputs.append(model(torch.ones(1, 1, 32), torch.tensor([[2]]), None, cache))
            else:
                outputs.append(model(torch.ones(1, 1, 32), torch.tensor([[2]]), None, cache))
    assert model._compiled_decode is None
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def ahead_of_time_model():
    """One AOTInductor compile (about 20 s on two cores) shared by the tests below."""
    torch.manual_seed(0)
    model = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).eval()
    expected = decode(model)
    if not ahead_of_time_available():
        pytest.skip("this PyTorch lacks AOTInductor packaging")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.compile_decode(ahead_of_time=True)
    return model, expected


def test_ahead_of_time_decode_matches_eager_for_every_batch_and_cache_length(ahead_of_time_model):
    model, expected = ahead_of_time_model
    torch.testing.assert_close(decode(model), expected, atol=1e-5, rtol=1e-5)
    # The exported step has a dynamic batch and cache length: no recompilation for these.
    compiled = model._compiled_decode
    for batch, steps in ((1, 3), (3, 9)):
        fast = decode(model, steps=steps, batch=batch)
        assert model._compiled_decode is compiled
        model._compiled_decode = None
        torch.testing.assert_close(fast, decode(model, steps=steps, batch=batch), atol=1e-5, rtol=1e-5)
        model._compiled_decode = compiled


def test_ahead_of_time_decode_reads_weights_in_place_and_leaves_other_calls_to_eager(ahead_of_time_model):
    model, _ = ahead_of_time_model
    compiled = model._compiled_decode
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    try:
        fast = decode(model)
        model._compiled_decode = None
        torch.testing.assert_close(fast, decode(model), atol=1e-5, rtol=1e-5)
    finally:
        model._compiled_decode = compiled
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(2.0)
    # Calls that want gradients, or bring other dtypes, run eagerly.
    embeds, positions = torch.ones(1, 1, 32), torch.tensor([[2]])
    assert not compiled.accepts(embeds, positions, 8)
    with torch.no_grad():
        assert compiled.accepts(embeds, positions, 8)
        assert not compiled.accepts(embeds.double(), positions, 8)
        assert not compiled.accepts(embeds, positions.int(), 8)
        assert not compiled.accepts(embeds, positions, 1)  # below the shapes it was exported for


def test_moving_or_casting_drops_a_compiled_step():
    model = Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).eval()
    model.compile_decode(backend="eager")
    model.to(torch.float64)
    assert model._compiled_decode is None
    model.compile_decode(backend="eager")
    model.load_state_dict(Qwen2Backbone(Qwen2BackboneConfig(**SMALL)).double().state_dict(), assign=True)
    assert model._compiled_decode is None
    with pytest.raises(ValueError, match="no torch.compile options"):
        model.compile_decode(ahead_of_time=True, dynamic=False)


def test_ids_outside_the_embedding_table_are_named_with_its_range():
    import re

    backbone = Qwen2Backbone(Qwen2BackboneConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, num_kv_heads=1))
    assert backbone.embed(torch.tensor([[0, 49]])).shape == (1, 2, 16)
    for ids, found in (([[3, 50]], "from 3 to 50"), ([[-1, 4]], "from -1 to 4")):
        with pytest.raises(ValueError, match=re.escape(f"input_ids must lie in [0, 50) (the embedding table's rows), "
                                                       f"found ids {found}")):
            backbone.embed(torch.tensor(ids))
