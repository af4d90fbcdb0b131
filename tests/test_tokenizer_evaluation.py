import math

import pytest
import torch

from nextstep.evaluation.image_metrics import psnr, ssim
from nextstep.evaluation.photo_bank import Photo, random_crops, split_photos
from nextstep.evaluation.tokenizer_eval import bicubic_baseline, evaluate_tokenizer, jpeg_baseline, jpeg_coded_bytes
from nextstep.tokenizers import FluxVAE, FluxVAEConfig
from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[1] += 0.2  # MSE 0.04 on a peak-to-peak range of 2 -> 10 log10(4 / 0.04) = 20 dB
    values = psnr(y, x)
    assert math.isinf(values[0]) and values[1].item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_identity_and_ordering():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    badly = (x + 0.5 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    assert (ssim(slightly, x) > ssim(badly, x)).all()
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:, :, :16])


def test_baselines_keep_shape_and_range():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert bicubic_baseline(x, 4).shape == x.shape
    decoded, bpp = jpeg_baseline(x, 50)
    assert decoded.shape == x.shape and 0 < bpp < 24
    assert jpeg_baseline(x.double(), 50)[0].dtype == torch.float64  # the images' dtype (and device)


def test_photo_split_never_mixes_photos():
    from PIL import Image

    photos = [Photo(name, Image.new("RGB", (80, 90), (i * 20, 0, 0)))
              for i, name in enumerate(["astronaut", "coffee", "rocket", "wallpaper_a", "wallpaper_b"])]
    train, held = split_photos(photos)
    assert {p.name for p in train}.isdisjoint({p.name for p in held})
    assert "astronaut" in {p.name for p in held} and "rocket" in {p.name for p in train}
    crops = random_crops(train, 5, 32, seed=3)
    assert crops.shape == (5, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    assert torch.equal(crops, random_crops(train, 5, 32, seed=3))


def test_evaluation_report_has_every_section():
    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4))
    report = evaluate_tokenizer(vae, torch.rand(4, 3, 32, 32) * 2 - 1)
    assert set(report.robustness) == {"0.1", "0.2", "0.5"}
    assert any(name.startswith("bicubic") for name in report.baselines)
    assert any(name.startswith("JPEG") for name in report.baselines)
    assert report.dispersion["channels"] == 16
    assert "| tokenizer |" in report.to_markdown()


def test_tokenizer_loss_trains_every_parameter_and_needs_a_perceptual_net():
    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4))
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0))
    out = loss(vae, torch.rand(2, 3, 16, 16) * 2 - 1, torch.Generator().manual_seed(0))
    out.total.backward()
    assert all(p.grad is not None for p in vae.parameters())
    torch.testing.assert_close(out.total, out.l1 + out.mse)
    with pytest.raises(ValueError, match="perceptual"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.5))


def test_perceptual_loss_with_efficientnet_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    from nextstep.tokenizers.perceptual import EfficientNetLiteFeatures, PerceptualLoss

    loss = PerceptualLoss(EfficientNetLiteFeatures())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(loss(x, x), torch.zeros(2))
    near = loss((x + 0.05 * torch.randn_like(x)).clamp(-1, 1), x)
    far = loss((x + 0.5 * torch.randn_like(x)).clamp(-1, 1), x)
    assert (far > near).all()
    assert all(not p.requires_grad for p in loss.parameters())


def test_a_sampling_tokenizer_reconstructs_each_image_alike_in_any_batch():
    from nextstep.evaluation.tokenizer_eval import reconstruct

    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, deterministic=False)).eval()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    alone, alone_latents = reconstruct(vae, images, batch_size=1, latent_noise=0.2, seed=3)
    together, together_latents = reconstruct(vae, images, batch_size=3, latent_noise=0.2, seed=3)
    torch.testing.assert_close(together_latents, alone_latents)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_a_bfloat16_tokenizer_is_evaluated_in_its_own_dtype():
    from nextstep.evaluation.tokenizer_eval import reconstruct

    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)).eval().to(torch.bfloat16)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstructions, latents = reconstruct(vae, images)
    assert reconstructions.dtype == latents.dtype == torch.float32 and reconstructions.shape == images.shape


def test_the_evaluation_job_writes_into_a_folder_given_as_a_string(tmp_path, monkeypatch):
    from nextstep.evaluation import tokenizer_report

    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    monkeypatch.setattr(tokenizer_report, "held_out_crops",
                        lambda count, size, seed: torch.rand(count, 3, size, size) * 2 - 1)
    output = tmp_path / "eval"
    report = tokenizer_report.run_tokenizer_evaluation(vae, str(output), count=2, size=16)
    assert report.num_images == 2
    assert {p.name for p in output.iterdir()} == {"report.json", "report.md", "reconstructions.png"}


def test_no_crops_and_no_images_are_refused():
    from PIL import Image

    photos = [Photo("rocket", Image.new("RGB", (40, 40)))]
    with pytest.raises(ValueError, match="count must be an integer >= 1, found 0"):
        random_crops(photos, 0, 16)
    with pytest.raises(ValueError, match="size must be an integer >= 1, found 0"):
        random_crops(photos, 2, 0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\) with B >= 1, found shape \(0, 3, 16, 16\)"):
        evaluate_tokenizer(vae, torch.zeros(0, 3, 16, 16))


def test_the_mean_pairwise_distance_leaves_out_each_vector_s_distance_to_itself():
    from nextstep.evaluation.tokenizer_eval import latent_dispersion, mean_pairwise_distance

    vectors = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4 and 5
    assert mean_pairwise_distance(vectors) == pytest.approx(4.0)
    latents = vectors[:, :, None, None]  # (3 images, 2 channels, 1, 1): one latent vector per image
    assert latent_dispersion(latents)["mean_pairwise_distance"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"N >= 2, found shape \(1, 2\)"):
        mean_pairwise_distance(vectors[:1])


def test_the_dispersion_of_one_channel_latents():
    from nextstep.evaluation.tokenizer_eval import latent_dispersion

    latents = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    dispersion = latent_dispersion(latents)
    assert dispersion["channels"] == 1 and dispersion["effective_rank"] == pytest.approx(1.0)
    assert dispersion["mean_channel_std"] == pytest.approx(float(latents.double().std()))


def test_two_uncorrelated_channels_of_equal_variance_have_effective_rank_2():
    from nextstep.evaluation.tokenizer_eval import latent_dispersion

    channels = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])  # (C, positions)
    latents = channels.T[:, :, None, None]  # 4 images of one position
    assert latent_dispersion(latents)["effective_rank"] == pytest.approx(2.0, abs=1e-6)


def test_opposite_channel_means_do_not_cancel():
    from nextstep.evaluation.tokenizer_eval import latent_dispersion

    latents = torch.tensor([[1.0, -1.0], [3.0, -3.0]])[:, :, None, None]  # channel means 2 and -2
    assert latent_dispersion(latents)["mean_abs_channel_mean"] == pytest.approx(2.0)


def test_psnr_scores_the_reconstruction_clamped_to_the_image_range_as_it_is_saved():
    reference = torch.ones(2, 3, 8, 8)
    assert torch.isinf(psnr(reference * 1.5, reference)).all()  # 1.5 saves as 1: identical
    # 3 saves as 1: an error of 1 everywhere against 0, 10 log10(4 / 1) dB.
    values = psnr(torch.full((1, 3, 8, 8), 3.0), torch.zeros(1, 3, 8, 8))
    assert values.item() == pytest.approx(10 * math.log10(4.0), abs=1e-4)


def test_ssim_of_two_flat_images_is_the_published_luminance_term():
    """Wang et al. (2004): SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2; on [0, 1] values L = 1. Flat images have no variance, so only the
    luminance term is left."""
    a, b = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), -0.5)  # 0.5 and 0.25 on [0, 1]
    mu_x, mu_y, c1 = 0.5, 0.25, (0.01 * 1) ** 2
    expected = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-4)


def test_the_jpeg_baseline_reports_the_coded_bits_per_pixel_without_the_file_s_headers():
    """bpp = 8 * (bytes of each image's JPEG scans at that quality), summed, over B * H * W pixels; the scans
    are what follows the start-of-scan header up to the end-of-image marker of a baseline file."""
    import io

    from nextstep.images import to_pil

    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    decoded, bpp = jpeg_baseline(images, 50)
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=50)
        data = buffer.getvalue()
        start_of_scan = data.index(b"\xff\xda")
        header = int.from_bytes(data[start_of_scan + 2:start_of_scan + 4], "big")
        assert data.endswith(b"\xff\xd9")
        sizes.append(len(data) - (start_of_scan + 2 + header) - 2)
        assert jpeg_coded_bytes(data) == sizes[-1]
    assert bpp == pytest.approx(8 * sum(sizes) / (2 * 16 * 24))
    assert decoded.shape == images.shape


@pytest.mark.parametrize("progressive", [False, True])
def test_coded_bytes_leave_out_the_headers_a_blank_image_is_almost_made_of(progressive):
    import io

    from PIL import Image

    def coded(image):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=25, progressive=progressive)
        return len(buffer.getvalue()), jpeg_coded_bytes(buffer.getvalue())

    blank_file, blank_coded = coded(Image.new("RGB", (64, 64), "white"))
    noise_file, noise_coded = coded(Image.effect_noise((64, 64), 60).convert("RGB"))
    assert blank_coded < 0.2 * blank_file and noise_coded > 5 * blank_coded
    assert noise_file - noise_coded >= blank_file - blank_coded - 200  # the same kind of tables in both
    with pytest.raises(ValueError, match="expected a JPEG file"):
        jpeg_coded_bytes(b"\x89PNG")


def test_an_image_reproduced_exactly_does_not_make_the_mean_psnr_infinite():
    from nextstep.evaluation.image_metrics import PSNR_CEILING, mean_psnr, psnr

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = images.clone()
    noisy[1:] += 0.1
    each = psnr(noisy, images)
    assert each[0] == float("inf")
    assert mean_psnr(noisy, images) == pytest.approx((PSNR_CEILING + float(each[1:].sum())) / 3)


def test_latent_noise_in_the_robustness_check_has_standard_deviation_sigma():
    """reconstruct(..., latent_noise=sigma) adds N(0, sigma^2) noise: the latents move by sigma * eps."""
    from nextstep.evaluation.tokenizer_eval import reconstruct

    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _, clean = reconstruct(vae, images)
    _, noisy = reconstruct(vae, images, latent_noise=0.5, seed=4)
    moved = noisy - clean  # 2 x 16 x 16 x 16 values
    assert float(moved.std()) == pytest.approx(0.5, rel=0.05)
    assert abs(float(moved.mean())) < 0.05


def test_the_mean_channel_std_averages_each_channel_s_own_spread():
    """mean_channel_std is the mean over channels of each channel's (unbiased) std over all positions."""
    from nextstep.evaluation.tokenizer_eval import latent_dispersion

    latents = torch.tensor([[0.0, 3.0], [0.0, 4.0]])[None, :, None, :]  # (1, 2 channels, 1, 2 positions)
    # channel 0 holds (0, 3), channel 1 holds (0, 4): stds 3 / sqrt(2) and 4 / sqrt(2)
    assert latent_dispersion(latents)["mean_channel_std"] == pytest.approx(3.5 / math.sqrt(2))
    # pairwise distance between the two positions (0, 0) and (3, 4)
    assert latent_dispersion(latents)["mean_pairwise_distance"] == pytest.approx(5.0)
