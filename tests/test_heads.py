"""Image heads: presets, the prepared fast path, the training loss and its time sampling; the LM head."""

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nextstep.heads import (
    FlowMatchingHead,
    FlowMatchingHeadConfig,
    ImageHead,
    LMHead,
    prepared_flow_matching,
    sample_times,
)
from nextstep.layers import AdaLNResBlock
from nextstep.presets import HEAD_SIZES, flow_head_config
from nextstep.samplers import EulerSampler, HeunSampler, MidpointSampler, time_grid
from nextstep.testing import check_image_head, randomize


@pytest.mark.parametrize("size, millions", [("small", 40.3), ("base", 157.2), ("large", 527.5)])
def test_head_presets_have_the_published_sizes(size, millions):
    with torch.device("meta"):
        head = FlowMatchingHead(flow_head_config(size, condition_dim=5120))
    count = sum(p.numel() for p in head.parameters())
    assert round(count / 1e6, 1) == millions
    depth, width = HEAD_SIZES[size]
    assert (len(head.net.res_blocks), head.net.input_proj.out_features) == (depth, width)


def test_unknown_head_size_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"known: \['base', 'large', 'small', 'tiny'\]"):
        flow_head_config("huge", 64)


def randomized_head(depth=3, width=48, token_dim=16, condition_dim=32, seed=0):
    torch.manual_seed(seed)
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=token_dim, condition_dim=condition_dim,
                                                   width=width, depth=depth))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # non-zero AdaLN outputs and LN affine
    return head


@given(st.integers(1, 9), st.integers(1, 12), st.floats(0.5, 4.0), st.integers(0, 100))
def test_prepared_velocity_equals_the_plain_velocity(rows, steps, shift, seed):
    head = randomized_head()
    generator = torch.Generator().manual_seed(seed)
    condition = torch.randn(rows, 32, generator=generator)
    x = torch.randn(rows, 16, generator=generator)
    for sampler in (EulerSampler(), HeunSampler(), MidpointSampler()):
        grid = time_grid(steps, shift)
        times = sampler.evaluation_times(grid)
        with torch.no_grad():
            tabulated = head.prepare(condition, times)
            per_call = head.prepare(condition)
            for t in times:
                t = t.expand(rows).contiguous()
                expected = head.velocity(x, t, condition)
                torch.testing.assert_close(tabulated(x, t), expected, atol=2e-5, rtol=2e-5)
                torch.testing.assert_close(per_call(x, t), expected, atol=2e-5, rtol=2e-5)


def test_prepared_velocity_handles_different_times_per_row():
    head = randomized_head()
    condition, x = torch.randn(4, 32), torch.randn(4, 16)
    grid = time_grid(6)
    with torch.no_grad():
        prepared = head.prepare(condition, grid)
        t = grid[torch.tensor([0, 3, 5, 2])]
        torch.testing.assert_close(prepared(x, t), head.velocity(x, t, condition), atol=2e-5, rtol=2e-5)


def test_prepared_velocity_falls_back_when_the_table_would_be_large(monkeypatch):
    monkeypatch.setattr(prepared_flow_matching, "MAX_TABLE_ELEMENTS", 10)
    head = randomized_head()
    condition, x, grid = torch.randn(3, 32), torch.randn(3, 16), time_grid(4)
    with torch.no_grad():
        prepared = head.prepare(condition, grid)
        assert prepared.times is None
        t = grid[1].expand(3)
        torch.testing.assert_close(prepared(x, t), head.velocity(x, t, condition), atol=2e-5, rtol=2e-5)


def test_prepare_rejects_bad_shapes():
    head = randomized_head()
    with pytest.raises(ValueError, match=r"condition must have shape \(N, 32\)"):
        head.prepare(torch.randn(3, 31))
    prepared = head.prepare(torch.randn(3, 32))
    with pytest.raises(ValueError, match="3 rows"):
        prepared(torch.randn(2, 16), torch.zeros(2))


def test_default_prepare_binds_the_condition():
    class Linear(ImageHead):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4 + 2, 4)

        token_dim = property(lambda self: 4)
        condition_dim = property(lambda self: 2)

        def velocity(self, x_t, t, condition):
            return self.proj(torch.cat([x_t, condition], -1)) * t[:, None]

        def loss(self, target, condition, generator=None):
            return target.new_zeros(target.shape[0])

    head = Linear()
    condition, x, t = torch.randn(3, 2), torch.randn(3, 4), torch.rand(3)
    torch.testing.assert_close(head.prepare(condition, time_grid(3))(x, t), head.velocity(x, t, condition))


def test_a_subclass_that_overrides_the_velocity_is_sampled_through_it():
    class HalfVelocity(FlowMatchingHead):
        def velocity(self, x_t, t, condition):
            return 0.5 * super().velocity(x_t, t, condition)

    plain = randomized_head()
    half = HalfVelocity(plain.config)
    half.load_state_dict(plain.state_dict())
    assert half.own_velocity_reason() == "HalfVelocity overrides the velocity of FlowMatchingHead"
    assert plain.own_velocity_reason() is None

    class HalfPrepared(FlowMatchingHead):  # the fast path fuses the velocity: it must not skip this
        def prepare(self, condition, times=None):
            fast = super().prepare(condition, times)
            return lambda x_t, t: 0.5 * fast(x_t, t)

    assert HalfPrepared(plain.config).own_velocity_reason() == "HalfPrepared overrides the prepare of FlowMatchingHead"
    times = time_grid(4)
    condition, x, t = torch.randn(3, 32), torch.randn(3, 16), times[1].expand(3)
    prepared = half.prepare(condition, half.prepare_times(times))
    torch.testing.assert_close(prepared(x, t), half.velocity(x, t, condition))
    torch.testing.assert_close(prepared(x, t), 0.5 * plain.prepare(condition, times)(x, t))

    class OtherNet(prepared_flow_matching.FlowMatchingMLP if hasattr(prepared_flow_matching, "FlowMatchingMLP")
                   else type(plain.net)):
        def forward(self, x_t, t, condition):
            return torch.zeros_like(x_t)

    zero = FlowMatchingHead(plain.config)
    zero.net = OtherNet(plain.config)
    assert zero.prepare(condition)(x, t).abs().max() == 0


@pytest.mark.parametrize("change, part", [
    (lambda net: net.res_blocks[0].mlp.__setitem__(1, nn.GELU()), "net.res_blocks.0.mlp"),
    (lambda net: net.res_blocks[1].adaLN_modulation.__setitem__(0, nn.Identity()), "net.res_blocks.1.adaLN_modulation"),
    (lambda net: net.res_blocks.__setitem__(1, ScaledBlock(net.res_blocks[1].in_ln.normalized_shape[0])),
     "net.res_blocks.1"),
    (lambda net: net.final_layer.adaLN_modulation.append(nn.Tanh()), "net.final_layer.adaLN_modulation"),
    (lambda net: setattr(net, "input_proj", nn.Sequential(net.input_proj)), "net.input_proj"),
])
def test_a_net_whose_parts_are_changed_is_sampled_through_its_velocity(change, part):
    """Prepared evaluation computes the stock blocks itself: a net with another activation, block or layout is
    evaluated as it is, not as the stock MLP it was."""
    head = randomized_head()
    change(head.net)
    randomize(head)
    assert head.own_velocity_reason() == (f"FlowMatchingHead's {part} is not the stock module of a FlowMatchingMLP "
                                          "(a subclass, another activation or layout), which prepared evaluation "
                                          "would compute in its place")
    times = time_grid(4)
    condition, x, t = torch.randn(3, 32), torch.randn(3, 16), times[1].expand(3)
    torch.testing.assert_close(head.prepare(condition, head.prepare_times(times))(x, t), head.velocity(x, t, condition))
    check_image_head(head)


class ScaledBlock(AdaLNResBlock):
    def forward(self, x, y):
        return 1.5 * super().forward(x, y)


def test_the_flow_error_is_that_of_the_straight_path_from_noise_to_the_target():
    """x_t = t x1 + (1 - t) x0 and the velocity x1 - x0: from noise 0 the velocity is x_t / t, towards a
    target 0 it is -x_t / (1 - t); a head answering those has no error, one answering the reverse has."""
    class Exact(FlowMatchingHead):
        def velocity(self, x_t, t, condition):
            return self.answer(x_t, t[:, None])

    head = Exact(randomized_head().config)
    condition, t = torch.randn(5, 32), torch.rand(5) * 0.8 + 0.1
    x, zero = torch.randn(5, 16), torch.zeros(5, 16)
    for target, noise, answer in ((x, zero, lambda x_t, t: x_t / t), (zero, x, lambda x_t, t: -x_t / (1 - t))):
        head.answer = answer
        assert head.flow_error(target, condition, t, noise).max() < 1e-10
        head.answer = lambda x_t, t, answer=answer: -answer(x_t, t)
        assert head.flow_error(target, condition, t, noise).min() > 1e-3


def test_loss_is_float32_and_averages_batch_mul_repeats():
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=16, depth=1,
                                                   batch_mul=4)).to(torch.bfloat16)
    loss = head.loss(torch.randn(5, 4), torch.randn(5, 8, dtype=torch.bfloat16),
                     generator=torch.Generator().manual_seed(0))
    assert loss.shape == (5,) and loss.dtype == torch.float32 and torch.isfinite(loss).all()



def test_a_bfloat16_head_trains_on_the_times_sampling_uses():
    """x_t goes in the head's dtype, the times in float32: sampling calls the head at float32 times, and a
    bfloat16 time near 1 would be rounded to a multiple of 1/256."""
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=16, depth=1)).to(torch.bfloat16)
    seen = []
    velocity = head.velocity
    head.velocity = lambda x_t, t, condition: seen.append((x_t.dtype, t.clone())) or velocity(x_t, t, condition)
    t = torch.tensor([0.9973, 0.5001])
    head.flow_error(torch.randn(2, 4), torch.randn(2, 8, dtype=torch.bfloat16), t, torch.randn(2, 4))
    ((x_dtype, times),) = seen
    assert x_dtype == torch.bfloat16 and times.dtype == torch.float32 and torch.equal(times, t)

def test_logit_normal_times_and_the_shift():
    generator = torch.Generator().manual_seed(0)
    t = sample_times(200_000, "logit_normal", generator=generator)
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1) < 0.01
    moved = sample_times(200_000, "logit_normal", mean=0.5, std=2.0, generator=generator)
    logits = torch.log(moved / (1 - moved))
    assert abs(logits.mean().item() - 0.5) < 0.02 and abs(logits.std().item() - 2) < 0.02
    uniform = sample_times(200_000, "uniform", generator=generator)
    assert abs(uniform.mean().item() - 0.5) < 0.01
    same = torch.Generator().manual_seed(1)
    plain = sample_times(100, generator=same)
    shifted = sample_times(100, shift=3.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, plain / (3.0 - 2.0 * plain))
    with pytest.raises(ValueError, match=r"known: \['logit_normal', 'uniform'\]"):
        sample_times(3, "beta")


def test_head_config_validates_the_time_sampling():
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatchingHeadConfig(time_sampling="cosine")
    with pytest.raises(ValueError, match="time_shift"):
        FlowMatchingHeadConfig(time_shift=0.0)
    seen = {}
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=16, depth=1,
                                                   time_sampling="uniform", time_shift=3.0, batch_mul=1))
    original = head.velocity

    def recording(x_t, t, condition):
        seen["t"] = t
        return original(x_t, t, condition)

    head.velocity = recording
    head.loss(torch.randn(4000, 4), torch.randn(4000, 8))
    assert seen["t"].mean() < 0.4  # shifted toward noise


def test_lm_head_tied_and_untied():
    embedding = nn.Embedding(10, 6)
    tied = LMHead(6, 10, tied_embedding=embedding)
    assert tied.tied and not list(tied.parameters())
    hidden = torch.randn(2, 3, 6)
    torch.testing.assert_close(tied(hidden), hidden @ embedding.weight.T)
    untied = LMHead(6, 10)
    assert not untied.tied and untied.weight.shape == (10, 6)
    assert untied(hidden).shape == (2, 3, 10)
    with pytest.raises(ValueError, match=r"tied embedding must have shape \(10, 7\)"):
        LMHead(7, 10, tied_embedding=embedding)


def test_prepared_times_are_shared_by_every_condition():
    head = randomized_head()
    grid = time_grid(5, 2.0)
    shared = head.prepare_times(grid[:-1])
    torch.testing.assert_close(shared.times, grid[:-1])
    with torch.no_grad():
        for seed in range(3):
            generator = torch.Generator().manual_seed(seed)
            condition, x = torch.randn(4, 32, generator=generator), torch.randn(4, 16, generator=generator)
            prepared = head.prepare(condition, shared)
            for t in grid[:-1]:
                t = t.expand(4).contiguous()
                expected = head.velocity(x, t, condition)
                torch.testing.assert_close(prepared(x, t), expected, atol=2e-5, rtol=2e-5)
    assert ImageHead.prepare_times(head, grid) is grid  # the interface's default keeps the tensor


def test_flow_head_starts_as_the_release_initialises_it():
    """Xavier-uniform Linears with zero biases, N(0, 0.02) time MLP, zero AdaLN outputs and output layer,
    so a new head predicts zero velocity."""
    torch.manual_seed(0)
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=64, condition_dim=192, width=256, depth=2))
    net = head.net
    time_mlp = {id(net.time_embed.mlp[0]), id(net.time_embed.mlp[2])}
    zeroed = {id(block.adaLN_modulation[-1]) for block in net.res_blocks}
    zeroed |= {id(net.final_layer.adaLN_modulation[-1]), id(net.final_layer.linear)}
    linears = [module for module in net.modules() if isinstance(module, nn.Linear)]
    assert len(linears) > len(time_mlp) + len(zeroed)
    for linear in linears:
        weight, bias = linear.weight.detach(), linear.bias.detach()
        assert not bias.any()
        if id(linear) in zeroed:
            assert not weight.any()
        elif id(linear) in time_mlp:
            assert float(weight.std()) == pytest.approx(0.02, rel=0.1)
        else:
            fan_out, fan_in = weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert float(weight.abs().max()) <= bound
            assert float(weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    velocity = head.velocity(torch.randn(5, 64), torch.rand(5), torch.randn(5, 192))
    assert not velocity.any()


def test_velocity_takes_one_time_per_token():
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=8, condition_dim=4, width=16, depth=1))
    x, c = torch.randn(3, 8), torch.randn(3, 4)
    assert head.velocity(x, torch.rand(3), c).shape == (3, 8)
    for t in (torch.rand(3, 1), torch.rand(())):  # a column would broadcast to (3, 3, 8)
        message = f"x_t must have shape (N, 8) and t shape (N,), one time per token, found (3, 8) and {tuple(t.shape)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            head.velocity(x, t, c)


def test_layer_inputs_and_sizes_are_checked():
    from nextstep.layers.rms_norm import RMSNorm
    from nextstep.layers.timestep import TimestepEmbedder

    embedder = TimestepEmbedder(8)
    for t in (torch.rand(3, 1), torch.rand(())):
        with pytest.raises(ValueError, match=re.escape(f"t must have shape (N,), one time per row, found "
                                                       f"{tuple(t.shape)}")):
            embedder(t)
    with pytest.raises(ValueError, match=r"mlp_ratio must be positive, with a hidden width int\(width \* mlp_ratio\) "
                                         r"of at least 1 \(width 8\)"):
        FlowMatchingHeadConfig(token_dim=4, condition_dim=4, width=8, depth=1, mlp_ratio=0.1)
    norm = RMSNorm(4)
    x = torch.randn(2, 4)
    before = norm(x)
    norm.eps = 10.0  # a changed eps takes effect on every device path
    assert not torch.allclose(norm(x), before)


def test_velocity_takes_one_condition_row_per_token_and_tokens_of_the_head_width():
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=8, condition_dim=4, width=16, depth=1))
    x, t = torch.randn(3, 8), torch.rand(3)
    for condition in (torch.randn(1, 4), torch.randn(4), torch.randn(2, 4), torch.randn(3, 5)):  # none broadcast
        message = f"condition must have shape (3, 4), one row per token of x_t, found {tuple(condition.shape)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            head.velocity(x, t, condition)
    with pytest.raises(ValueError, match=re.escape("x_t must have shape (N, 8) and t shape (N,), one time per token, "
                                                   "found (3, 6) and (3,)")):
        head.velocity(torch.randn(3, 6), t, torch.randn(3, 4))
    with pytest.raises(ValueError, match=re.escape("found (3, 8) and a float")):
        head.velocity(x, 0.5, torch.randn(3, 4))


def test_a_seed_given_as_the_generator_is_named():
    from nextstep.heads import sample_times

    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=8, condition_dim=4, width=16, depth=1))
    message = r"generator must be a torch\.Generator or None, found int 0 \(torch\.Generator\(\)\.manual_seed\(seed\)"
    with pytest.raises(TypeError, match=message):
        head.loss(torch.randn(3, 8), torch.randn(3, 4), generator=0)
    with pytest.raises(TypeError, match=message):
        sample_times(4, generator=0)


def test_a_shift_below_one_moves_the_times_toward_data():
    plain = sample_times(100, generator=torch.Generator().manual_seed(3))
    shifted = sample_times(100, shift=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(shifted, plain / (0.5 + 0.5 * plain))  # t / (shift - (shift - 1) t)
    assert (shifted >= plain).all() and (shifted > plain).any()


def test_the_time_code_is_cos_then_sin_of_the_raw_time_at_geometric_frequencies():
    """The release's timestep code: [cos(t f_k), sin(t f_k)] of t in [0, 1] itself (no x1000), with
    f_k = max_period ** (-k / half); the embedder codes with its own max_period."""
    from nextstep.layers.timestep import TimestepEmbedder, sinusoidal_embedding

    t = torch.tensor([0.0, 0.5, 1.0])
    for max_period, frequencies in ((10000.0, [1.0, 0.1, 0.01, 0.001]), (16.0, [1.0, 0.5, 0.25, 0.125])):
        args = t[:, None] * torch.tensor(frequencies)[None]
        expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        torch.testing.assert_close(sinusoidal_embedding(t, 8, max_period), expected)
    torch.testing.assert_close(sinusoidal_embedding(torch.zeros(1), 8), torch.tensor([[1.0] * 4 + [0.0] * 4]))
    embedder = TimestepEmbedder(4, frequency_dim=8, max_period=16.0)
    with torch.no_grad():
        torch.testing.assert_close(embedder(t), embedder.mlp(sinusoidal_embedding(t, 8, 16.0)))


def test_the_head_normalises_with_the_release_layer_norm_eps():
    """The release's SimpleMLPAdaLN: every LayerNorm of the head (blocks and final layer) has eps 1e-6, and
    the final one has no affine; a token of tiny spread is normalised accordingly."""
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=8, condition_dim=4, width=16, depth=2))
    norms = [module for module in head.modules() if isinstance(module, nn.LayerNorm)]
    assert len(norms) == 3 and all(norm.eps == 1e-6 for norm in norms)
    assert norms[-1].weight is None
    x = torch.tensor([[0.0, 2e-3] * 8])  # variance 1e-6: eps 1e-6 halves it, scaling by 1 / sqrt(2)
    torch.testing.assert_close(norms[0](x).abs(), torch.full((1, 16), 2 ** -0.5))


def test_the_flow_error_averages_the_squared_error_over_the_features():
    """flow_error (N,): a head answering zero velocity has error mean_d (x1 - x0)^2 for each token (N 3, D 16)."""
    class Still(FlowMatchingHead):
        def velocity(self, x_t, t, condition):
            return torch.zeros_like(x_t)

    head = Still(randomized_head().config)
    target, noise = torch.randn(3, 16), torch.randn(3, 16)
    error = head.flow_error(target, torch.randn(3, 32), torch.rand(3), noise)
    torch.testing.assert_close(error, (target - noise).pow(2).mean(-1))


def test_the_shape_check_wants_one_condition_row_per_target():
    """check_shapes(target (N, D), condition (M, C)) refuses M != N, naming the expected (N, C)."""
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=16, depth=1))
    with pytest.raises(ValueError, match=r"condition must have shape \(5, 8\), found \(4, 8\)"):
        head.check_shapes(target=torch.randn(5, 4), condition=torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"condition must have shape \(5, 8\), found \(4, 8\)"):
        head.loss(torch.randn(5, 4), torch.randn(4, 8))
    head.check_shapes(target=torch.randn(5, 4), condition=torch.randn(5, 8))


class _OffsetHead(FlowMatchingHead):
    """Reads the target x1 from the condition's first D columns and answers the exact velocity plus the
    condition's last column, so a token's flow error is that column squared whatever its (t, x0)."""

    def velocity(self, x_t, t, condition):
        d = self.token_dim
        return (condition[:, :d] - x_t) / (1 - t[:, None]) + condition[:, d:]


def test_each_token_s_loss_averages_its_own_repeats():
    """loss (N,): token i's value is the mean of its own batch_mul flow errors (N 5, batch_mul 4), with each
    token's error fixed at offset_i^2 by a head that knows the target."""
    head = _OffsetHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=5, width=8, depth=1, batch_mul=4))
    target = torch.randn(5, 4)
    offsets = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    condition = torch.cat([target, offsets[:, None]], dim=1)
    loss = head.loss(target, condition, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, offsets.pow(2), atol=1e-3, rtol=1e-4)


def test_the_head_trains_at_its_configured_logit_normal_times():
    """A head configured with time_mean 0.5 and time_std 2 draws its training times as sigmoid(N(0.5, 2))."""
    seen = {}
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=8, depth=1, batch_mul=2,
                                                   time_mean=0.5, time_std=2.0))
    original = head.velocity

    def recording(x_t, t, condition):
        seen["t"] = t
        return original(x_t, t, condition)

    head.velocity = recording
    head.loss(torch.randn(20_000, 4), torch.randn(20_000, 8), generator=torch.Generator().manual_seed(0))
    logits = torch.logit(seen["t"].double())
    assert abs(logits.mean().item() - 0.5) < 0.05 and abs(logits.std().item() - 2.0) < 0.05


def test_the_published_head_trains_with_the_released_loss_settings():
    """NextStep-1's head: each target repeated batch_mul 4 times, times logit-normal(0, 1), no training shift."""
    from nextstep import model_preset

    for config in (FlowMatchingHeadConfig(), model_preset("nextstep_1_large")().image_head.config):
        assert (config.batch_mul, config.time_sampling, config.time_mean, config.time_std, config.time_shift) == \
            (4, "logit_normal", 0.0, 1.0, 1.0)


def test_prepared_velocity_equals_the_plain_velocity_on_features_of_tiny_spread():
    """The prepared function normalises the output layer's input with the head's own eps (1e-6): with hidden
    features of variance about 1e-6, where eps matters, it still equals velocity (N 3, D 16)."""
    head = randomized_head(depth=1)
    with torch.no_grad():
        head.net.input_proj.weight.mul_(1e-3)
        head.net.input_proj.bias.mul_(1e-3)
        block = head.net.res_blocks[0]
        block.adaLN_modulation[-1].weight.zero_()
        block.adaLN_modulation[-1].bias.zero_()  # gate 0: the block adds nothing
        condition, x, t = torch.randn(3, 32), torch.randn(3, 16), torch.full((3,), 0.5)
        h = head.net.input_proj(x)
        assert h.var(-1, unbiased=False).max() < 1e-4
        expected = head.velocity(x, t, condition)
        for times in (None, t[:1]):
            torch.testing.assert_close(head.prepare(condition, times)(x, t), expected, atol=1e-5, rtol=1e-4)


def test_a_prepared_velocity_takes_times_broadcast_from_one_step_without_a_warning():
    """Samplers pass t (N,) expanded from one step's time (stride 0): the prepared table lookup takes it as is,
    without PyTorch's non-contiguous warning, and equals the velocity at those times."""
    import warnings

    head = randomized_head(depth=1)
    condition, x = torch.randn(3, 32), torch.randn(3, 16)
    grid = torch.tensor([0.0, 0.25, 0.5, 1.0])
    prepared = head.prepare(condition, grid[:-1])
    t = grid[1:2].expand(3)  # (N,), stride 0
    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = prepared(x, t)
    finally:
        torch.set_warn_always(previous)
    torch.testing.assert_close(out, head.velocity(x, t.contiguous(), condition), atol=1e-5, rtol=1e-4)
