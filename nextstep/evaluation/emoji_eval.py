"""Real-data evaluation on held-out emoji: Frechet distance and caption-to-image retrieval.

The held-out emoji are the ``test`` split of `nextstep.training.data.emoji`
(split by base emoji, so no skin-tone variant of a test emoji is trained on).
The model draws one image per held-out caption; then

* **Frechet distance** on EfficientNet-Lite0 features between the generated and
  the real held-out images, beside the same distance between an equally large
  random set of real *training* emoji and the real held-out ones (real vs real);
  their ratio is 1 for a model as close to the held-out emoji as other real emoji are;
* **retrieval**: a ridge map from image features to MiniLM caption embeddings,
  fitted on the real training pairs (its penalty chosen on a held-aside tenth of
  the training emoji), ranks the held-out images for each held-out caption;
  recall@1 and @10 are reported for the real held-out images and for the
  generated ones, which makes "the generated image shows its caption" a number
  on the scale of the real data.

Both are also reported for the real held-out images passed through the model's
image tokenizer (encode, decode): the **tokenizer ceiling**, what a generator
that produced exactly the latents of the real emoji would score.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from nextstep.evaluation.distribution_metrics import RidgeMap, frechet_distance, retrieval_ranks, retrieval_recall
from nextstep.evaluation.report_files import write_report_files
from nextstep.evaluation.sampling import SamplingSettings, generate_images

if TYPE_CHECKING:
    from nextstep.model import NextStep

#: Ridge penalties tried on the validation tenth of the training emoji.
RIDGE_ALPHAS = (10.0, 100.0, 1000.0, 10000.0)


@dataclass
class EmojiReport:
    """Scores of one held-out emoji run.

    Attributes:
        count: held-out emoji (generated images, real images, captions).
        frechet_generated: FD(generated, real held-out).
        frechet_real: FD(real training sample of the same size, real held-out).
        frechet_ratio: ``frechet_generated / frechet_real``.
        retrieval_real: recall@k of the real held-out images.
        retrieval_generated: recall@k of the generated images.
        retrieval_ratio: generated R@10 / real R@10.
        frechet_reconstructed: FD(real held-out through the image tokenizer, real held-out).
        retrieval_reconstructed: recall@k of the real held-out images through the image tokenizer.
        ridge_alpha: the penalty the validation chose.
        settings: the sampling settings.
        by_vocabulary: for a model with a word vocabulary, R@10 of the real and
            the generated images over the captions whose words the vocabulary
            all has (``"known"``) and over the rest (``"unknown"``), each with
            its ``count`` (the candidates are always all held-out images);
            empty for other text tokenizers.
    """

    count: int
    frechet_generated: float
    frechet_real: float
    frechet_ratio: float
    retrieval_real: dict[str, float]
    retrieval_generated: dict[str, float]
    retrieval_ratio: float
    frechet_reconstructed: float
    retrieval_reconstructed: dict[str, float]
    ridge_alpha: float
    settings: dict = field(default_factory=dict)
    by_vocabulary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        r, g, t = self.retrieval_real, self.retrieval_generated, self.retrieval_reconstructed
        return "\n".join([
            f"Held-out emoji: {self.count} captions "
            f"(chance R@1 {1 / self.count:.4f}, R@10 {min(1.0, 10 / self.count):.4f}).",
            "",
            "| images | Frechet distance to real held-out | R@1 | R@10 |",
            "|---|---|---|---|",
            f"| real held-out | {self.frechet_real:.2f} (real training sample) | {r['R@1']:.3f} | {r['R@10']:.3f} |",
            f"| generated | {self.frechet_generated:.2f} | {g['R@1']:.3f} | {g['R@10']:.3f} |",
            f"| real held-out through the tokenizer (ceiling) | {self.frechet_reconstructed:.2f} "
            f"| {t['R@1']:.3f} | {t['R@10']:.3f} |",
            "",
            f"Frechet ratio (generated / real vs real): **{self.frechet_ratio:.2f}**; "
            f"R@10 ratio (generated / real): **{self.retrieval_ratio:.2f}** "
            f"(tokenizer ceiling {_ratio(t['R@10'], r['R@10']):.2f}).",
        ] + self._vocabulary_markdown())

    def _vocabulary_markdown(self) -> list[str]:
        if not self.by_vocabulary:
            return []
        lines = ["", "| captions | count | R@10 real | R@10 generated | ratio |", "|---|---|---|---|---|"]
        for name, what in (("known", "every word in the vocabulary"), ("unknown", "some word not in it")):
            part = self.by_vocabulary[name]
            lines.append(f"| {what} | {part['count']} | {part['real']:.3f} | {part['generated']:.3f} "
                         f"| {_ratio(part['generated'], part['real']):.2f} |")
        return lines


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def _validation_mask(bases: list[str], fraction: float = 0.1) -> torch.Tensor:
    from nextstep.training.data.emoji import split_of

    return torch.tensor([split_of(b, fraction, seed=1) == "test" for b in bases])


def fit_caption_map(features: torch.Tensor, embeddings: torch.Tensor, bases: list[str],
                    alphas: tuple[float, ...] = RIDGE_ALPHAS) -> tuple[RidgeMap, float]:
    """The ridge map image features -> caption embeddings, its penalty picked by validation R@10."""
    val = _validation_mask(bases)
    if val.all() or not val.any():
        raise ValueError("the training emoji must split into a fitting part and a validation part")
    best_alpha, best_score = alphas[0], -1.0
    for alpha in alphas:
        ridge = RidgeMap.fit(features[~val], embeddings[~val], alpha)
        score = retrieval_recall(embeddings[val], ridge(features[val]))["R@10"]
        if score > best_score:
            best_alpha, best_score = alpha, score
    return RidgeMap.fit(features, embeddings, best_alpha), best_alpha


def known_word_captions(model: "NextStep", captions: list[str]) -> torch.Tensor | None:
    """(N,) bool: whether the model's word vocabulary has every word of each caption as it is
    (aliases and word vectors do not count); None for a text tokenizer without a word vocabulary."""
    from nextstep.tokenizers.word_text import WordTextTokenizer, split_pieces

    tokenizer = model.text_tokenizer
    if not isinstance(tokenizer, WordTextTokenizer):
        return None
    words = set(tokenizer.words)
    return torch.tensor([all(p in words for p in split_pieces(c) if p.strip().isalpha()) for c in captions],
                        dtype=torch.bool)


def _by_vocabulary(known: torch.Tensor | None, real_ranks: torch.Tensor, generated_ranks: torch.Tensor) -> dict:
    if known is None:
        return {}
    out = {}
    for name, mask in (("known", known), ("unknown", ~known)):
        count = int(mask.sum())
        out[name] = {"count": count,
                     "real": float((real_ranks[mask] < 10).double().mean()) if count else float("nan"),
                     "generated": float((generated_ranks[mask] < 10).double().mean()) if count else float("nan")}
    return out


def _through_tokenizer(model: "NextStep", images: list, batch_size: int) -> list:
    """``images`` (PIL) encoded and decoded by the model's image tokenizer."""
    from nextstep.evaluation.tokenizer_eval import reconstruct
    from nextstep.images import from_pil, to_pil

    reference = next(model.image_tokenizer.parameters())
    batch = from_pil(images).to(device=reference.device, dtype=reference.dtype)
    decoded, _ = reconstruct(model.image_tokenizer, batch, batch_size=batch_size)
    return to_pil(decoded.cpu())


def run_emoji_eval(model: "NextStep", output: Path | None = None, *, settings: SamplingSettings | None = None,
                   limit: int | None = None, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> EmojiReport:
    """Generate every held-out emoji (or the first ``limit``) and score them, with ``settings`` (default: the
    model's own, `SamplingSettings.from_defaults` of its generation block, as `nextstep eval` draws).

    With ``output`` it writes ``report.json``, ``report.md`` and ``samples.png``
    (real held-out emoji over the generated ones, eight prompts). To score
    several models or settings, prepare `HeldOutEmoji` once and call it for each.
    """
    settings = settings or SamplingSettings.from_defaults(model.config.generation)
    _require_square(settings)
    return HeldOutEmoji(size=settings.height, limit=limit, seed=seed)(model, settings, output, progress=progress)


def _require_square(settings: SamplingSettings) -> None:
    if settings.width != settings.height:
        raise ValueError(f"emoji are square: expected width == height, found {settings.width}x{settings.height}")


class HeldOutEmoji:
    """The held-out emoji suite with its data side prepared once.

    Preparing reads every training and held-out emoji, computes their image
    features and caption embeddings and fits the ridge map (about two minutes
    on a 2-core CPU at 64x64, whatever the model); each call then generates the
    held-out emoji with one model and settings and scores them, the same
    numbers `run_emoji_eval` gives for that model, settings, ``limit`` and ``seed``.

    Args:
        size: image side in pixels (the settings of every call must match it).
        limit: score the first ``limit`` held-out emoji (None: all; at least 10).
        seed: which training emoji form the real-vs-real reference sample.
    """

    def __init__(self, size: int = 64, limit: int | None = None, seed: int = 0):
        from nextstep.evaluation.feature_spaces import CaptionEmbeddings, ImageFeatures
        from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

        train = EmojiDataset(EmojiConfig(split="train", size=size))
        test = EmojiDataset(EmojiConfig(split="test", size=size))
        count = len(test) if limit is None else min(limit, len(test))
        if count < 10:
            raise ValueError(f"the emoji evaluation needs at least 10 held-out emoji, found {count}")
        self.size = size
        self.image_features, caption_embeddings = ImageFeatures(), CaptionEmbeddings()
        train_samples = [train.load(i) for i in range(len(train))]
        train_features = self.image_features([s.image for s in train_samples])
        self.ridge, self.ridge_alpha = fit_caption_map(
            train_features, caption_embeddings([s.caption for s in train_samples]),
            [e.base for e in train.entries])
        test_samples = [test.load(i) for i in range(count)]
        self.captions = [s.caption for s in test_samples]
        self.real_images = [s.image for s in test_samples]
        self.real_features = self.image_features(self.real_images)
        self.caption_embeddings = caption_embeddings(self.captions)
        reference = random.Random(seed).sample(range(len(train_samples)), count)
        self.frechet_real = frechet_distance(train_features[reference], self.real_features)
        self.real_mapped = self.ridge(self.real_features)
        self.retrieval_real = retrieval_recall(self.caption_embeddings, self.real_mapped)

    @property
    def count(self) -> int:
        """Held-out emoji scored."""
        return len(self.captions)

    def __call__(self, model: "NextStep", settings: SamplingSettings | None = None, output: Path | None = None, *,
                 progress: Callable[[int, int], None] | None = None) -> EmojiReport:
        """Generate the held-out emoji with ``model`` and ``settings`` (default: the model's own, as
        `SamplingSettings.from_defaults` reads its generation block) and
        score them; with ``output``, write the report files as `run_emoji_eval` does."""
        from nextstep.images import image_grid
        from nextstep.io import atomic_path, atomic_write_text

        settings = settings or SamplingSettings.from_defaults(model.config.generation, height=self.size,
                                                                  width=self.size)
        _require_square(settings)
        if settings.height != self.size:
            raise ValueError(f"expected {self.size}x{self.size} settings for emoji prepared at that size, "
                             f"found {settings.width}x{settings.height}")
        reconstructed = _through_tokenizer(model, self.real_images, settings.batch_size)
        generated = generate_images(model, self.captions, settings, progress)
        generated_features = self.image_features(generated)
        reconstructed_features = self.image_features(reconstructed)
        fd_generated = frechet_distance(generated_features, self.real_features)
        generated_mapped = self.ridge(generated_features)
        generated_recall = retrieval_recall(self.caption_embeddings, generated_mapped)
        report = EmojiReport(
            count=self.count, frechet_generated=fd_generated, frechet_real=self.frechet_real,
            frechet_ratio=_ratio(fd_generated, self.frechet_real),
            retrieval_real=dict(self.retrieval_real), retrieval_generated=generated_recall,
            retrieval_ratio=_ratio(generated_recall["R@10"], self.retrieval_real["R@10"]),
            frechet_reconstructed=frechet_distance(reconstructed_features, self.real_features),
            retrieval_reconstructed=retrieval_recall(self.caption_embeddings, self.ridge(reconstructed_features)),
            ridge_alpha=self.ridge_alpha, settings=settings.to_dict(),
            by_vocabulary=_by_vocabulary(known_word_captions(model, self.captions),
                                         retrieval_ranks(self.caption_embeddings, self.real_mapped),
                                         retrieval_ranks(self.caption_embeddings, generated_mapped)),
        )
        if output is not None:
            output = write_report_files(output, report)
            atomic_write_text(output / "captions.json", json.dumps(self.captions, indent=0) + "\n")
            shown = [round(i * (self.count - 1) / 7) for i in range(8)]
            grid = image_grid([self.real_images[i] for i in shown] + [generated[i] for i in shown], columns=8)
            with atomic_path(output / "samples.png") as tmp:
                grid.save(tmp, format="PNG")
        return report


class SeenEmojiRetrieval:
    """Caption-to-image retrieval on emoji the model trained on, for choosing sampling settings.

    Settings must not be tuned on the held-out emoji they are judged on, so this
    scores ``count`` training emoji (drawn with ``seed``) instead: the ridge map
    is fitted on the other training emoji (no base emoji on both sides), and
    ``ratio`` divides the generated images' R@10 by the real ones'. The data
    side is prepared once; each call generates and scores one setting.

    Args:
        size: image side in pixels.
        count: training emoji scored (at least 10).
        fit_count: training emoji the ridge map is fitted on (0: all the others).
        seed: which emoji are scored.
    """

    def __init__(self, size: int = 64, count: int = 400, fit_count: int = 0, seed: int = 0):
        from nextstep.evaluation.feature_spaces import CaptionEmbeddings, ImageFeatures
        from nextstep.training.data.emoji import EmojiConfig, EmojiDataset

        train = EmojiDataset(EmojiConfig(split="train", size=size))
        bases = [entry.base for entry in train.entries]
        if not 10 <= count < len(train):
            raise ValueError(f"count must be in [10, {len(train)}), found {count}")
        scored = random.Random(seed).sample(range(len(train)), count)
        scored_bases = {bases[i] for i in scored}
        fitted = [i for i in range(len(train)) if bases[i] not in scored_bases]
        if fit_count:
            fitted = random.Random(seed + 1).sample(fitted, min(fit_count, len(fitted)))
        self.image_features, caption_embeddings = ImageFeatures(), CaptionEmbeddings()
        self.size = size
        fit_samples = [train.load(i) for i in fitted]
        self.ridge, self.ridge_alpha = fit_caption_map(
            self.image_features([s.image for s in fit_samples]),
            caption_embeddings([s.caption for s in fit_samples]), [bases[i] for i in fitted])
        samples = [train.load(i) for i in scored]
        self.captions = [s.caption for s in samples]
        self.caption_embeddings = caption_embeddings(self.captions)
        real_features = self.image_features([s.image for s in samples])
        self.real = retrieval_recall(self.caption_embeddings, self.ridge(real_features))

    def __call__(self, model: "NextStep", settings: SamplingSettings) -> dict[str, float]:
        """``{"R@1", "R@10"}`` of the generated images and ``ratio`` (generated / real R@10)."""
        if (settings.height, settings.width) != (self.size, self.size):
            raise ValueError(f"expected {self.size}x{self.size} settings, found {settings.width}x{settings.height}")
        generated = self.image_features(generate_images(model, self.captions, settings))
        recall = retrieval_recall(self.caption_embeddings, self.ridge(generated))
        return {**recall, "ratio": _ratio(recall["R@10"], self.real["R@10"])}
