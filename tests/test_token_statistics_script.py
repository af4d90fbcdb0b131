"""benchmarks/token_statistics.py measures a model and the two models of its normalisation ablation."""

import json

import pytest
import torch
from benchmark_helpers import load_benchmark


def test_the_script_measures_the_model_and_each_ablation_model(tmp_path, monkeypatch):
    from nextstep import build_model

    build_model("tiny", seed=0).save_pretrained(tmp_path / "tiny")
    script = load_benchmark("token_statistics")
    trained = []
    monkeypatch.setattr(script, "ablation_model", lambda variant, steps, size, work: trained.append(
        (variant, steps, size, work)) or tmp_path / "tiny")
    assert script.main(["--model", str(tmp_path / "tiny"), "--emoji", "0", "--shapes", "3", "--scales", "1,2",
                        "--batch-size", "2", "--ablation-steps", "5", "--ablation-sizes", "64",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    assert trained == [("layer_norm", 5, 64, tmp_path / "work"), ("scale_shift", 5, 64, tmp_path / "work")]
    result = json.loads((tmp_path / "out" / "token_statistics.json").read_text())
    assert [row["name"] for row in result["models"]] == [str(tmp_path / "tiny"), "tiny, layer_norm, 64 px",
                                                         "tiny, scale_shift, 64 px"]
    assert all([g["cfg"] for g in row["report"]["generated"]] == [1.0, 2.0] for row in result["models"])
    table = (tmp_path / "out" / "token_statistics.md").read_text()
    assert table.count("| tiny, scale_shift, 64 px |") == 2 and "spread - real, last quarter" in table
    assert (tmp_path / "work" / "report-tiny-scale_shift-64" / "positions.csv").is_file()


def test_the_global_normalisation_gives_the_latents_unit_variance_and_zero_mean():
    """Over the images it was fitted to (eight emoji spread over the training split, eight shapes scenes)."""
    from nextstep.images import from_pil
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae
    from nextstep.training.data.emoji import EmojiConfig, EmojiDataset
    from nextstep.training.data.shapes.world import ShapesConfig, ShapesDataset

    script = load_benchmark("token_statistics")
    scale, shift = script.global_scale_shift(script.ABLATION_TOKENIZER, images=16, size=32)
    vae = load_flux_vae(script.ABLATION_TOKENIZER, normalization="scale_shift", scaling_factor=scale,
                        shift_factor=shift).eval()
    emoji = EmojiDataset(EmojiConfig(split="train", size=32))
    shapes = ShapesDataset(ShapesConfig(num_samples=8, size=32))
    images = [emoji.load(i * len(emoji) // 8).image for i in range(8)] + [shapes.load(i).image for i in range(8)]
    with torch.no_grad():
        latents = torch.cat([vae.encode(from_pil(images[:8])), vae.encode(from_pil(images[8:]))])
    assert float(latents.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(latents.std()) == pytest.approx(1.0, abs=1e-4)
