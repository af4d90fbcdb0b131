"""The configuration of a whole NextStep model: nested component specs plus model-level numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nextstep.config import OMITTED_WHEN_DEFAULT, ComponentSpec, Config, require
from nextstep.generation_defaults import GenerationDefaults
from nextstep.layers.word_vectors import WordVectorConfig


@dataclass
class ModelConfig(Config):
    """Everything needed to rebuild a `nextstep.model.NextStep`.

    Args:
        image_tokenizer: component spec (registry name + that component's config).
        text_tokenizer: component spec of the text tokenizer.
        backbone: component spec of the backbone.
        image_head: component spec of the image head.
        sampler: component spec of the default sampler.
        tie_word_embeddings: the LM head reuses the token embedding table.
        text_loss_weight: weight of the text cross-entropy (0.01 in NextStep-1).
        image_loss_weight: weight of the flow-matching loss (1.0).
        image_first_probability: chance that a training pair is ordered image-first
            (text dropout for classifier-free guidance; 0.3 in the release).
        use_norm: LayerNorm each sampled token before it is fed back and decoded.
        generation: the sampling settings generation uses when a call leaves them unset.
        word_vectors: pretrained word vectors added to the text embeddings
            (`nextstep.layers.word_vectors`); ``count == 0`` (the default): none.
        release_fields: values of the NextStep-1 release ``config.json`` a model was
            read from that change nothing here (``latent_size``, ``max_position_embeddings``
            ...: `nextstep.interop.release_config.KEPT_RELEASE_FIELDS`), written back when
            the model is saved in the release layout; empty (the default) for other models.
        distilled_head: for a model whose image head was distilled into a few-step student
            (`nextstep.training.head_distillation.install_distilled_head`): what it was fitted
            to sample, ``{"steps": K, "teacher_cfg": S}`` (K Euler steps on the unshifted grid,
            one branch holding the teacher's guidance S); generation warns when asked to sample it
            otherwise. Empty (the default) for other heads.
    """

    image_tokenizer: ComponentSpec
    text_tokenizer: ComponentSpec
    backbone: ComponentSpec
    image_head: ComponentSpec
    sampler: ComponentSpec
    tie_word_embeddings: bool = False
    text_loss_weight: float = 0.01
    image_loss_weight: float = 1.0
    image_first_probability: float = 0.3
    use_norm: bool = False
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    word_vectors: WordVectorConfig = field(default_factory=WordVectorConfig, metadata=OMITTED_WHEN_DEFAULT)
    release_fields: dict[str, Any] = field(default_factory=dict, metadata=OMITTED_WHEN_DEFAULT)
    distilled_head: dict[str, Any] = field(default_factory=dict, metadata=OMITTED_WHEN_DEFAULT)

    def validate(self) -> None:
        from nextstep.registry import component_class

        for kind in ComponentSpec.kinds:
            spec = getattr(self, kind)
            require(isinstance(spec, ComponentSpec) and spec.kind == kind, kind, spec,
                    f"a ComponentSpec of kind {kind!r}")
            expected = component_class(kind, spec.type).config_class  # an unknown type is named here
            require(isinstance(spec.config, expected), f"{kind}.config", spec.config,
                    f"a {expected.__name__} (the config of {kind} {spec.type!r})")
        require(self.text_loss_weight >= 0, "text_loss_weight", self.text_loss_weight, ">= 0")
        require(self.image_loss_weight >= 0, "image_loss_weight", self.image_loss_weight, ">= 0")
        require(0 <= self.image_first_probability <= 1, "image_first_probability",
                self.image_first_probability, "in [0, 1]")
        require(isinstance(self.generation, GenerationDefaults), "generation", self.generation,
                "a GenerationDefaults")
        require(isinstance(self.word_vectors, WordVectorConfig), "word_vectors", self.word_vectors,
                "a WordVectorConfig")
        require(isinstance(self.release_fields, dict) and all(isinstance(k, str) for k in self.release_fields),
                "release_fields", self.release_fields, "a mapping from field names to values")
        steps = self.distilled_head.get("steps") if isinstance(self.distilled_head, dict) else None
        require(self.distilled_head == {} or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1),
                "distilled_head", self.distilled_head,
                "{} or a mapping with the integer 'steps' >= 1 it was fitted for")


def describes_a_model(data: object) -> bool:
    """Whether a ``config.json``'s contents are a saved `ModelConfig` (its component sections), as this
    library writes a model directory."""
    return isinstance(data, dict) and "backbone" in data and "image_tokenizer" in data
