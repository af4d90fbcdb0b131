"""A new NextStep model from a plain Qwen2 / Qwen2.5 checkpoint, as NextStep-1 was initialised.

The language model keeps its weights. Its tokenizer gains NextStep's special
tokens (``[PAD]``, ``<|image_area|>``, ``<|begin_of_image|>`` ...; on Qwen2.5
they land at the release's ids 151665-151673). Embedding and LM-head rows of
the new tokens start at the mean of the trained rows plus a little noise (so
the new tokens neither dominate the softmax nor look identical), and the
tables grow only when the tokenizer outgrows them. The image projectors and
the flow-matching head are new.

Legend: V vocabulary rows, H hidden size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from nextstep.backbones.qwen2 import Qwen2Backbone
from nextstep.backbones.qwen2_checkpoint import LM_HEAD_KEY, config_flag, qwen2_config_from_hf, read_hf_config
from nextstep.config import ComponentSpec
from nextstep.heads.flow_matching import FlowMatchingHead, FlowMatchingHeadConfig
from nextstep.heads.lm_head import LMHead
from nextstep.interop.release_checkpoint import checkpoint_dtype
from nextstep.interop.release_config import RELEASE_GENERATION, release_sampler
from nextstep.model_config import ModelConfig
from nextstep.tokenizers.flux_vae import FluxVAE
from nextstep.tokenizers.hf_text import HFTextTokenizer, HFTextTokenizerConfig
from nextstep.tokenizers.special_tokens import END_OF_TEXT, NEXTSTEP_SPECIAL_TOKENS
from nextstep.weights import load_safetensors, read_checkpoint_index

if TYPE_CHECKING:
    from nextstep.model import NextStep

EMBEDDING_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight")


def padded_vocab_size(num_tokens: int, multiple: int) -> int:
    """``num_tokens`` rounded up to a multiple of ``multiple`` (1 leaves it unchanged)."""
    if multiple < 1:
        raise ValueError(f"pad_vocab_to_multiple_of must be >= 1, found {multiple}")
    return -(-num_tokens // multiple) * multiple


@torch.no_grad()
def row_statistics(weight: torch.Tensor, rows: int, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (float32, shape (H,)) of ``weight[:rows]``, computed in chunks.

    Chunking keeps the float32 copy small for bfloat16 tables of billions of values.

    Args:
        weight: (V, H) table.
        rows: how many leading rows to summarise (>= 1).
        chunk: rows per chunk.
    """
    if rows < 1:
        raise ValueError(f"need at least one trained row to initialise new ones from, found {rows}")
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    squares = torch.zeros_like(total)
    for start in range(0, rows, chunk):
        block = weight[start:min(rows, start + chunk)].double()
        total += block.sum(0)
        squares += block.square().sum(0)
    mean = total / rows
    variance = (squares / rows - mean.square()).clamp_min(0)
    return mean.float(), variance.float()


@torch.no_grad()
def initialize_rows_from_mean(
    weight: torch.Tensor,
    rows: list[int],
    trained_rows: int,
    *,
    noise_variance_scale: float = 1e-5,
    generator: torch.Generator | None = None,
) -> None:
    """Set ``weight[rows]`` to the mean of ``weight[:trained_rows]`` plus small Gaussian noise.

    The noise has per-feature variance ``noise_variance_scale`` times that of the
    trained rows, so new rows start apart from each other but close to the mean.

    Args:
        weight: (V, H) embedding or LM-head table, changed in place.
        rows: indices to initialise.
        trained_rows: the leading rows that hold trained vectors.
        noise_variance_scale: variance of the noise relative to the trained rows'.
        generator: source of the noise.
    """
    if not rows:
        return
    mean, variance = row_statistics(weight, trained_rows)
    noise = torch.randn(len(rows), weight.shape[1], generator=generator, dtype=torch.float32)
    values = mean.cpu() + noise * (variance.cpu() * noise_variance_scale).sqrt()
    weight[torch.tensor(rows, device=weight.device)] = values.to(device=weight.device, dtype=weight.dtype)


def _read_tensor(infos: dict, names: tuple[str, ...]) -> tuple[str, torch.Tensor] | None:
    """The first of ``names`` found in the checkpoint, read alone from its shard."""
    for name in names:
        if name in infos:
            with safe_open(str(infos[name].shard), framework="pt", device="cpu") as handle:
                return name, handle.get_tensor(name)
    return None


def _copy_rows(target: torch.Tensor, source: torch.Tensor, name: str, path: Path, rows: int) -> None:
    """Copy the checkpoint's table ``source`` of ``name`` into the first ``rows`` rows of ``target``;
    ``ValueError`` unless it is (rows, hidden size), as its ``config.json`` says."""
    if tuple(source.shape) != (rows, target.shape[1]):
        raise ValueError(
            f"{name} in {path} has shape {tuple(source.shape)}; expected ({rows}, {target.shape[1]}), the "
            "vocab_size and hidden_size of its config.json"
        )
    with torch.no_grad():
        target[:rows].copy_(source)


class _LanguageModel(nn.Module):
    def __init__(self, backbone: Qwen2Backbone, lm_head: LMHead):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head


#: Fields of a Qwen2 ``config.json`` that a release ``config.json`` keeps as they were in its base model.
QWEN_RELEASE_FIELDS = ("max_position_embeddings", "initializer_range", "bos_token_id")


def nextstep_from_qwen(
    path: str | os.PathLike,
    *,
    image_tokenizer: FluxVAE | str | os.PathLike,
    head: str | FlowMatchingHeadConfig = "base",
    sampler: ComponentSpec | str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    pad_vocab_to_multiple_of: int = 64,
    noise_variance_scale: float = 1e-5,
) -> "NextStep":
    """Build a NextStep model whose backbone and LM head come from a Qwen2 / Qwen2.5 directory.

    Args:
        path: a Hugging Face Qwen2 checkpoint directory (``config.json`` with
            ``model_type`` ``qwen2``, safetensors weights, tokenizer files).
        image_tokenizer: a `FluxVAE`, or a VAE checkpoint path in any layout
            `nextstep.tokenizers.vae_checkpoints.load_flux_vae` reads (the
            NextStep-1 f8ch16 tokenizer directory, FLUX.1 ``ae.safetensors`` ...).
        head: a flow-head size (``tiny``, ``small``, ``base`` (the release's),
            ``large``) or a full `FlowMatchingHeadConfig`.
        sampler: default sampler: a spec or a registered sampler's name; None selects the release's
            Euler-Maruyama sampler.
        dtype: parameter dtype of the whole model, the image tokenizer included; None gives the
            transformer and the new parts the checkpoint's dtype and leaves the image tokenizer in its
            own (a `FluxVAE` given is used as it is, not copied: a ``dtype`` or ``device`` moves it).
        device: where the parameters are allocated.
        seed: seeds the new head, projectors and new embedding rows.
        pad_vocab_to_multiple_of: when the tokenizer outgrows the embedding
            table, the table grows to a multiple of this.
        noise_variance_scale: noise of the new rows relative to the trained rows' variance.

    Returns:
        a `NextStep` with a Hugging Face text tokenizer that includes the special tokens.

    Raises:
        ValueError: for a directory that is not a Qwen2 checkpoint, or weights
            that do not match its config (naming the keys).
    """
    from transformers import AutoTokenizer

    from nextstep.builders import build_component
    from nextstep.model import NextStep
    from nextstep.presets import flow_head_config
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae

    path = Path(path)
    hf_config = read_hf_config(path)
    if hf_config.get("model_type") != "qwen2":
        raise ValueError(
            f"{path} has model_type {hf_config.get('model_type')!r}; nextstep_from_qwen expects a plain "
            "Qwen2 / Qwen2.5 checkpoint (model_type 'qwen2'). Load NextStep directories with NextStep.from_pretrained"
        )
    base_length = len(AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False))
    text_tokenizer = HFTextTokenizer(HFTextTokenizerConfig(path=str(path)))
    added_ids = sorted(i for i in {text_tokenizer.special_token_id(token)
                                   for token in (END_OF_TEXT, *NEXTSTEP_SPECIAL_TOKENS)} if i >= base_length)
    try:
        base_config = qwen2_config_from_hf(hf_config)  # every field checked, before the weights
    except ValueError as error:
        raise ValueError(f"{path / 'config.json'}: {error}") from None
    old_vocab = base_config.vocab_size
    new_vocab = old_vocab
    if text_tokenizer.vocab_size > old_vocab:
        new_vocab = padded_vocab_size(text_tokenizer.vocab_size, pad_vocab_to_multiple_of)
    tied = config_flag(hf_config, "tie_word_embeddings", False)

    infos = read_checkpoint_index(path)
    language_dtype = dtype if dtype is not None else checkpoint_dtype(infos)
    backbone_config = base_config.replace(vocab_size=new_vocab)
    with torch.device("meta"):
        backbone = Qwen2Backbone(backbone_config)
        lm_head = LMHead(backbone_config.hidden_size, new_vocab,
                         tied_embedding=backbone.embed_tokens if tied else None)
    language_model = _LanguageModel(backbone, lm_head)

    def rename(name: str) -> str | None:
        if name in EMBEDDING_KEYS or name == LM_HEAD_KEY:
            return None
        return "backbone." + name.removeprefix("model.")

    report = load_safetensors(language_model, path, rename=rename, dtype=language_dtype, device=device,
                              strict=False)
    # The two tables are copied row by row below; everything else must have loaded.
    report.missing = sorted(set(report.missing) - {"backbone.embed_tokens.weight", "lm_head.weight"})
    if not report.complete:
        raise ValueError(f"weights in {path} do not match its config.json: {report.describe()}")

    generator = torch.Generator().manual_seed(seed)
    tables = [("embedding", EMBEDDING_KEYS, backbone.embed_tokens.weight)]
    if not tied:
        tables.append(("LM head", (LM_HEAD_KEY,), lm_head.weight))
    for label, names, weight in tables:
        found = _read_tensor(infos, names)
        if found is None:
            raise ValueError(f"{path} has no {label} weights: expected one of {list(names)}")
        name, tensor = found
        _copy_rows(weight, tensor, name, path, old_vocab)
        trained = min(base_length, old_vocab)
        del tensor
        fresh = sorted(set(added_ids) | set(range(old_vocab, new_vocab)))
        initialize_rows_from_mean(weight, fresh, trained, noise_variance_scale=noise_variance_scale,
                                  generator=generator)

    vae = (image_tokenizer if isinstance(image_tokenizer, FluxVAE) else
           load_flux_vae(Path(image_tokenizer), keep_dtype=dtype is None))
    if isinstance(head, str):
        head = flow_head_config(head, backbone_config.hidden_size, vae.token_dim)
    sampler = release_sampler(sampler)
    config = ModelConfig(
        image_tokenizer=ComponentSpec("image_tokenizer", "flux_vae", vae.config),
        text_tokenizer=ComponentSpec("text_tokenizer", "huggingface", text_tokenizer.config),
        backbone=ComponentSpec("backbone", "qwen2", backbone_config),
        image_head=ComponentSpec("image_head", "flow_matching", head),
        sampler=sampler,
        tie_word_embeddings=tied,
        use_norm=vae.config.normalization == "layer_norm",  # as the release's examples, for its standardised tokens
        generation=RELEASE_GENERATION,
        # What the release's config.json carries over from its base model's (written when saved in that layout).
        release_fields={name: hf_config[name] for name in QWEN_RELEASE_FIELDS if hf_config.get(name) is not None},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NextStep(
            image_tokenizer=vae,
            text_tokenizer=text_tokenizer,
            backbone=backbone,
            image_head=FlowMatchingHead(head),
            sampler=build_component(sampler),
            config=config,
            lm_head=lm_head,
        )
        std = float(hf_config.get("initializer_range", 0.02))
        for projector in (model.image_in_projector, model.image_out_projector):
            nn.init.normal_(projector.weight, std=std)
            nn.init.zeros_(projector.bias)
    # The image tokenizer keeps its own dtype unless one is asked for (as a loaded release's does).
    for part in model.children():
        part.to(device=device, dtype=dtype if part is vae else language_dtype)
    return model


__all__ = ["initialize_rows_from_mean", "nextstep_from_qwen", "padded_vocab_size", "row_statistics"]
