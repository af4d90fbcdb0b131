"""Distribution metrics: Frechet distance against closed forms, ridge maps, retrieval recall."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_emoji import pytestmark as needs_emoji_data

from nextstep.evaluation.distribution_metrics import RidgeMap, frechet_distance, retrieval_recall


def _gaussian(n, mean, std, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) * torch.tensor(std) + torch.tensor(mean)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_symmetric():
    a, b = _gaussian(400, [0.0, 1.0, 2.0], [1.0, 2.0, 0.5], 0), _gaussian(300, [1.0, 0.0, 2.0], [1.0, 1.0, 1.0], 1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=3, max_size=3), st.lists(st.floats(0.2, 3), min_size=3, max_size=3))
def test_frechet_distance_matches_the_diagonal_closed_form(mean, std):
    # Sample statistics, so the closed form uses the samples' own means and (diagonal-dominant) covariances.
    a = _gaussian(20_000, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 2)
    b = a * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)
    cov_a = torch.cov(a.T)
    expected = (a.mean(0) - b.mean(0)).pow(2).sum() + sum(
        cov_a[i, i] * (1 - std[i]) ** 2 for i in range(3))
    # b is a diagonal rescaling of a: the cross term is exact up to a's small off-diagonal covariance.
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=2e-2, abs=2e-3)


def test_frechet_distance_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="width"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(torch.zeros(5), torch.zeros(5, 4))


def test_ridge_map_recovers_a_linear_map_and_retrieval_finds_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 20, generator=g, dtype=torch.float64)
    true = torch.randn(20, 8, generator=g, dtype=torch.float64)
    y = x @ true + 0.5
    ridge = RidgeMap.fit(x, y, alpha=1e-3)
    assert torch.allclose(ridge(x), y, atol=1e-4)
    assert retrieval_recall(y, ridge(x)) == {"R@1": 1.0, "R@10": 1.0}
    shuffled = ridge(x)[torch.roll(torch.arange(500), 1)]
    assert retrieval_recall(y, shuffled)["R@1"] < 0.05
    with pytest.raises(ValueError, match="row by row"):
        RidgeMap.fit(x, y[:10], alpha=1.0)


def test_retrieval_recall_counts_ranks():
    queries = torch.eye(4, dtype=torch.float64)
    # Candidate 0 matches query 0; candidates 1..3 are swapped so their matches rank second.
    candidates = torch.tensor([[1, 0, 0, 0], [0, 0.5, 1, 0], [0, 1, 0.5, 0], [0, 0, 0, 1]], dtype=torch.float64)
    recall = retrieval_recall(queries, candidates, ks=(1, 2))
    assert recall == {"R@1": 0.5, "R@2": 1.0}


@pytest.mark.slow
def test_emoji_evaluation_writes_its_report(tmp_path):
    import json

    from nextstep.builders import build_model
    from nextstep.evaluation.emoji_eval import run_emoji_eval
    from nextstep.evaluation.sampling import SamplingSettings

    report = run_emoji_eval(build_model("tiny", seed=0), tmp_path, limit=12,
                            settings=SamplingSettings(num_steps=2, batch_size=12))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["count"] == 12 and report.frechet_real > 0
    assert 0 <= saved["retrieval_real"]["R@10"] <= 1 and saved["retrieval_ratio"] >= 0
    assert 0 <= saved["retrieval_reconstructed"]["R@10"] <= 1 and saved["frechet_reconstructed"] >= 0
    markdown = (tmp_path / "report.md").read_text()
    assert "R@10 ratio" in markdown and "through the tokenizer (ceiling)" in markdown


def test_the_tokenizer_ceiling_images_do_not_depend_on_the_batch_size():
    import numpy as np
    from PIL import Image

    from nextstep.builders import build_model
    from nextstep.evaluation.emoji_eval import _through_tokenizer

    model = build_model("tiny", seed=0).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    one_by_one = _through_tokenizer(model, images, batch_size=1)
    together = _through_tokenizer(model, images, batch_size=5)
    assert [image.size for image in together] == [(32, 32)] * 5
    for a, b in zip(one_by_one, together):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_the_emoji_report_puts_the_tokenizer_ceiling_beside_the_generated_images():
    from nextstep.evaluation.emoji_eval import EmojiReport

    report = EmojiReport(count=400, frechet_generated=180.0, frechet_real=70.0, frechet_ratio=180.0 / 70.0,
                         retrieval_real={"R@1": 0.4, "R@10": 0.8}, retrieval_generated={"R@1": 0.05, "R@10": 0.2},
                         retrieval_ratio=0.25, frechet_reconstructed=120.0,
                         retrieval_reconstructed={"R@1": 0.1, "R@10": 0.4}, ridge_alpha=100.0)
    markdown = report.to_markdown()
    assert "| real held-out through the tokenizer (ceiling) | 120.00 | 0.100 | 0.400 |" in markdown
    assert "R@10 ratio (generated / real): **0.25** (tokenizer ceiling 0.50)." in markdown
    assert "every word in the vocabulary" not in markdown  # no split without a word vocabulary
    split = {"known": {"count": 300, "real": 0.9, "generated": 0.3},
             "unknown": {"count": 100, "real": 0.5, "generated": 0.1}}
    markdown = EmojiReport(**{**report.to_dict(), "by_vocabulary": split}).to_markdown()
    assert "| every word in the vocabulary | 300 | 0.900 | 0.300 | 0.33 |" in markdown
    assert "| some word not in it | 100 | 0.500 | 0.100 | 0.20 |" in markdown


def test_retrieval_ranks_count_the_candidates_ranked_above_the_match():
    from nextstep.evaluation.distribution_metrics import retrieval_ranks

    queries = torch.eye(3, dtype=torch.float64)
    candidates = torch.tensor([[1, 0, 0], [0.9, 0.1, 0], [0, 0.2, 1.0]], dtype=torch.float64)
    assert retrieval_ranks(queries, candidates).tolist() == [0, 1, 0]  # candidate 2 beats 1 for query 1
    # Images all alike tie with every candidate: each match ranks last, not first.
    assert retrieval_ranks(queries, torch.ones(3, 3, dtype=torch.float64)).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="one shape"):
        retrieval_ranks(queries, candidates[:2])


def test_captions_split_by_whether_the_vocabulary_has_every_word():
    from nextstep.builders import build_model
    from nextstep.evaluation.emoji_eval import known_word_captions
    from nextstep.retokenize import replace_text_tokenizer
    from nextstep.tokenizers import WordTextTokenizer, WordTextTokenizerConfig

    model = build_model("tiny", seed=0)
    assert known_word_captions(model, ["red heart"]) is None  # bytes: no vocabulary to ask
    words = WordTextTokenizer(WordTextTokenizerConfig(words=("red", " heart", " face"), aliases={"blue": "red"}))
    replace_text_tokenizer(model, words)
    known = known_word_captions(model, ["red heart", "red-heart face", "blue heart", "red heart 2", "Red heart"])
    assert known.tolist() == [True, False, False, True, False]  # "-heart" splits as "-" + "heart", not " heart"


def test_frechet_distance_of_one_dimensional_features_is_the_closed_form():
    a, b = _gaussian(50, [0.0], [1.0], 3), _gaussian(60, [1.0], [2.0], 4)
    mean_a, mean_b, std_a, std_b = a.mean(), b.mean(), a.std(), b.std()
    expected = (mean_a - mean_b) ** 2 + (std_a - std_b) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)


def test_non_finite_features_are_refused_naming_the_argument_and_the_rows():
    from nextstep.evaluation.distribution_metrics import retrieval_ranks

    queries = torch.eye(3, dtype=torch.float64)
    candidates = queries.clone()
    candidates[0, 0] = float("nan")
    with pytest.raises(ValueError, match="candidates must hold finite features, found 1 of its 3 rows"):
        retrieval_ranks(queries, candidates)  # a NaN row would otherwise rank -1, better than first
    features = _gaussian(10, [0.0, 0.0], [1.0, 1.0], 5)
    features[[2, 7], 1] = float("inf")
    with pytest.raises(ValueError, match="b must hold finite features, found 2 of its 10 rows"):
        frechet_distance(_gaussian(10, [0.0, 0.0], [1.0, 1.0], 6), features)
    with pytest.raises(ValueError, match="x must hold finite features"):
        RidgeMap.fit(features, features, alpha=1.0)


def test_identical_candidates_all_rank_last_whatever_the_rounding():
    from nextstep.evaluation.distribution_metrics import retrieval_ranks

    g = torch.Generator().manual_seed(0)
    count = 50
    queries = torch.randn(count, 17, generator=g)
    candidates = torch.randn(1, 17, generator=g).repeat(count, 1)  # one image drawn for every caption
    # The product gives identical candidates similarities a last bit apart; each is still a tie.
    assert retrieval_ranks(queries, candidates).tolist() == [count - 1] * count
    assert retrieval_recall(queries, candidates) == {"R@1": 0.0, "R@10": 0.0}
    # A real margin, however small next to the similarities, is no tie.
    close = torch.tensor([[1.0, 0.0], [1.0, 1e-6]], dtype=torch.float64)
    assert retrieval_ranks(close[:1].repeat(2, 1), close).tolist() == [0, 1]


def test_a_ridge_map_is_fitted_on_the_device_of_its_data():
    x, y = torch.randn(6, 3, device="meta"), torch.randn(6, 2, device="meta")
    ridge = RidgeMap.fit(x, y, alpha=1.0)
    assert ridge.weight.device.type == "meta" and ridge.weight.shape == (3, 2)
    assert ridge.weight.dtype == torch.float64
    assert ridge(x).shape == (6, 2) and ridge(x).device.type == "meta"


def test_recall_at_10_by_vocabulary_counts_ranks_below_10():
    from nextstep.evaluation.emoji_eval import _by_vocabulary

    out = _by_vocabulary(torch.tensor([True, False]), torch.tensor([10, 9]), torch.tensor([9, 10]))
    assert out["known"]["real"] == 0.0 and out["unknown"]["real"] == 1.0
    assert out["known"]["generated"] == 1.0 and out["unknown"]["generated"] == 0.0


def test_among_penalties_that_tie_the_first_is_kept():
    from nextstep.evaluation.emoji_eval import _validation_mask, fit_caption_map

    bases = [f"emoji-{i}" for i in range(40)]
    validation = int(_validation_mask(bases).sum())
    assert 1 <= validation <= 10  # every penalty then scores R@10 = 1
    generator = torch.Generator().manual_seed(0)
    features, embeddings = torch.randn(40, 6, generator=generator), torch.randn(40, 3, generator=generator)
    _, alpha = fit_caption_map(features, embeddings, bases, alphas=(10.0, 100.0, 1000.0))
    assert alpha == 10.0


def test_image_i_of_a_generation_is_the_same_whatever_the_batch_size(tiny_model):
    import numpy as np

    from nextstep.evaluation.sampling import SamplingSettings, generate_images

    prompts = ["a red circle"] * 3
    images = {batch: generate_images(tiny_model, prompts, SamplingSettings(height=32, width=32, num_steps=1,
                                                                         batch_size=batch, seed=5))
              for batch in (1, 2, 3)}
    pixels = {batch: [np.asarray(image, dtype=int) for image in found] for batch, found in images.items()}
    for batch in (2, 3):
        for a, b in zip(pixels[1], pixels[batch]):
            assert np.abs(a - b).max() <= 1  # image i is seeded seed + i in any batch
    assert not np.array_equal(pixels[1][0], pixels[1][2])  # and the seeds differ


def test_sampling_settings_from_a_model_s_defaults_keep_its_guidance_schedule():
    from nextstep.evaluation.sampling import SamplingSettings
    from nextstep.generation_defaults import GenerationDefaults

    defaults = GenerationDefaults(cfg=2.0, cfg_schedule="linear_increasing", num_steps=7, height=32, width=48)
    settings = SamplingSettings.from_defaults(defaults, batch_size=3)
    assert (settings.cfg, settings.cfg_schedule, settings.num_steps) == (2.0, "linear_increasing", 7)
    assert (settings.height, settings.width, settings.batch_size) == (32, 48, 3)


def test_photo_crops_span_minus_one_for_black_to_one_for_white():
    from PIL import Image

    from nextstep.evaluation.photo_bank import Photo, random_crops

    black = random_crops([Photo("black", Image.new("RGB", (64, 48), (0, 0, 0)))], 3, 16, seed=0)
    white = random_crops([Photo("white", Image.new("RGB", (64, 48), (255, 255, 255)))], 3, 16, seed=0)
    assert black.shape == white.shape == (3, 3, 16, 16)
    assert torch.all(black == -1.0) and torch.all(white == 1.0)


def test_the_tokenizer_is_evaluated_on_crops_of_held_out_photos_only(monkeypatch):
    from PIL import Image

    from nextstep.evaluation import tokenizer_report
    from nextstep.evaluation.photo_bank import HELD_OUT, Photo

    held = Photo(HELD_OUT[0], Image.new("RGB", (64, 64), (255, 0, 0)))  # a held-out name: red
    trained = Photo("rocket", Image.new("RGB", (64, 64), (0, 0, 255)))  # a training photo: blue
    monkeypatch.setattr(tokenizer_report, "load_photos", lambda: [held, trained])
    crops = tokenizer_report.held_out_crops(count=4, size=16, seed=0)
    assert crops.shape == (4, 3, 16, 16)
    assert torch.all(crops[:, 0] == 1.0) and torch.all(crops[:, 1:] == -1.0)  # every crop red


def test_generated_images_follow_the_temperature_of_the_settings(tiny_model, monkeypatch):
    import nextstep.generation as generation
    from nextstep.evaluation.sampling import SamplingSettings, generate_images

    seen, real = [], generation.generate_tokens

    def recording(*args, **kwargs):
        seen.append(kwargs["temperature"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_tokens", recording)
    generate_images(tiny_model, ["a red circle"] * 3, SamplingSettings(height=32, width=32, num_steps=1,
                                                                        batch_size=2, temperature=0.7))
    assert seen == [0.7, 0.7]


class _PixelFeatures:
    """A cheap stand-in for EfficientNet-Lite0: the mean colour of each image quarter (12-d)."""

    images_seen = 0

    def __call__(self, images):
        import numpy as np

        _PixelFeatures.images_seen += len(images)
        rows = []
        for image in images:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
            quarters = torch.nn.functional.adaptive_avg_pool2d(pixels.permute(2, 0, 1)[None], 2)
            rows.append(quarters.flatten())
        return torch.stack(rows).double()


class _LetterEmbeddings:
    """A cheap stand-in for MiniLM: each caption's letter counts, unit length (26-d)."""

    def __call__(self, captions):
        rows = torch.zeros(len(captions), 26, dtype=torch.float64)
        for row, caption in enumerate(captions):
            for letter in caption.lower():
                if "a" <= letter <= "z":
                    rows[row, ord(letter) - ord("a")] += 1
        return torch.nn.functional.normalize(rows + 1e-3, dim=1)


@needs_emoji_data
def test_a_prepared_held_out_emoji_suite_scores_as_the_one_shot_evaluation(monkeypatch, tmp_path):
    import json

    from nextstep.builders import build_model
    from nextstep.evaluation import feature_spaces
    from nextstep.evaluation.emoji_eval import HeldOutEmoji, run_emoji_eval
    from nextstep.evaluation.sampling import SamplingSettings

    monkeypatch.setattr(feature_spaces, "ImageFeatures", _PixelFeatures)
    monkeypatch.setattr(feature_spaces, "CaptionEmbeddings", _LetterEmbeddings)
    model = build_model("tiny", seed=0).eval()
    first = SamplingSettings(height=32, width=32, num_steps=1, batch_size=12)
    second = SamplingSettings(height=32, width=32, num_steps=2, cfg=1.5, batch_size=12)

    _PixelFeatures.images_seen = 0
    suite = HeldOutEmoji(size=32, limit=12, seed=3)
    prepared = _PixelFeatures.images_seen
    assert suite.count == 12 and prepared > 12  # every training emoji and the 12 held-out ones
    reports = [suite(model, first), suite(model, second, tmp_path / "second")]
    assert _PixelFeatures.images_seen == prepared + 2 * 2 * 12  # per call: generated and reconstructed only
    assert reports[0].to_dict() != reports[1].to_dict()
    for sampling, report in zip((first, second), reports):
        assert report.to_dict() == run_emoji_eval(model, settings=sampling, limit=12, seed=3).to_dict()
    saved = json.loads((tmp_path / "second" / "report.json").read_text())
    assert saved == json.loads(json.dumps(reports[1].to_dict()))
    assert (tmp_path / "second" / "samples.png").is_file()
    assert json.loads((tmp_path / "second" / "captions.json").read_text()) == suite.captions

    with pytest.raises(ValueError, match=r"^expected 32x32 settings for emoji prepared at that size, found 64x64$"):
        suite(model, SamplingSettings(height=64, width=64))
    with pytest.raises(ValueError, match=r"^emoji are square: expected width == height, found 64x32$"):
        suite(model, SamplingSettings(height=32, width=64))
