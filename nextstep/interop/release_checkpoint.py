"""The published NextStep-1 model directory: read it into a `NextStep`, write one back.

A release directory holds::

    config.json                        Llama-style config, model_type "nextstep" (see release_config)
    model.safetensors.index.json       {"metadata": {"total_size": ...}, "weight_map": {key: shard}}
    model-00001-of-000NN.safetensors   transformer, projectors and flow head; keys without "model."
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json
                                       Qwen2.5 tokenizer with NextStep's special tokens (see release_tokenizer)
    vae/config.json, vae/checkpoint.pt           the image tokenizer (a pickled state dict)

Weights stream shard by shard into a model built on the meta device, so
loading needs about the model's size plus one shard of memory. The VAE pickle is
read with ``torch.load(weights_only=True)``: a file that needs code execution is
refused. No code from the directory is ever imported.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from nextstep.config import ComponentSpec
from nextstep.interop.release_config import (
    check_release_config,
    check_special_token_ids,
    image_tokenizer_config_for_release,
    model_config_from_release,
    read_release_config,
    release_config_from_model,
    release_integer,
)
from nextstep.interop.release_tokenizer import save_release_tokenizer
from nextstep.io import atomic_directory
from nextstep.serialization import check_state_dict
from nextstep.weights import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    TensorInfo,
    load_safetensors,
    read_checkpoint_index,
    tensor_to_save,
)

if TYPE_CHECKING:
    from nextstep.model import NextStep

VAE_DIRECTORY = "vae"
VAE_WEIGHTS = "checkpoint.pt"
#: Tokenizer files of a release directory: ``tokenizer_config.json`` and either of the vocabularies.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt")
#: Release tensors derived from the config, never loaded (the 2-D position table, rotary frequencies).
DERIVED_KEYS = ("gen_pos_embed",)
#: Submodules of `NextStep` whose weights the release shards hold (the VAE lives in ``vae/``).
SHARDED_PARTS = ("backbone", "lm_head", "image_in_projector", "image_out_projector", "image_head")
#: Largest shard `save_release_checkpoint` writes by default (bytes).
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


# ------------------------------------------------------------------ key names
def release_key_to_model_key(name: str) -> str | None:
    """Release checkpoint key -> `NextStep` state-dict key; None for derived tensors.

    ``layers.0.mlp.up_proj.weight`` -> ``backbone.layers.0.mlp.up_proj.weight``;
    ``lm_head.weight``, ``image_in_projector.*``, ``image_out_projector.*`` and
    ``image_head.net.*`` keep their names. A ``model.`` prefix is accepted.

    Args:
        name: a key of the release shards.
    """
    name = name.removeprefix("model.")
    if name in DERIVED_KEYS or name.endswith("rotary_emb.inv_freq"):
        return None
    if name.split(".", 1)[0] in SHARDED_PARTS[1:]:
        return name
    return "backbone." + name


def model_key_to_release_key(key: str) -> str | None:
    """`NextStep` state-dict key -> release checkpoint key; None for VAE keys (they go to ``vae/``).

    Args:
        key: a key of ``model.state_dict()``.
    """
    part, _, rest = key.partition(".")
    if part == "image_tokenizer":
        return None
    if part == "backbone":
        return rest
    if part in SHARDED_PARTS:
        return key
    raise ValueError(f"state-dict key {key!r} belongs to no part the release layout stores")


class _ShardedParts(nn.Module):
    """The parts of a `NextStep` stored in the release shards, under the model's own names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in SHARDED_PARTS:
            self.add_module(name, getattr(model, name))


# ---------------------------------------------------------------- file checks
def _has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() and (
        (directory / "tokenizer.json").is_file()
        or ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())
    )


def _has_weights(directory: Path) -> bool:
    return (directory / INDEX_NAME).is_file() or (directory / SINGLE_FILE_NAME).is_file() or any(
        directory.glob("*.safetensors")
    )


def find_release_vae(directory: Path, release: dict, vae_path: str | os.PathLike | None = None) -> Path:
    """The directory holding the image tokenizer (``config.json`` + ``checkpoint.pt``).

    Looked for in order: ``vae_path`` (or its ``vae`` folder: another release
    model's directory); ``directory / "vae"``; the config's ``vae_name_or_path``
    as given and relative to ``directory``.

    Raises:
        FileNotFoundError: listing every place that was tried.
    """
    candidates = []
    if vae_path is not None:
        candidates += [Path(vae_path), Path(vae_path) / VAE_DIRECTORY]
    else:
        candidates.append(directory / VAE_DIRECTORY)
        named = release.get("vae_name_or_path")
        if isinstance(named, str) and named:
            candidates += [Path(named), directory / named]
    for candidate in candidates:
        if (candidate / VAE_WEIGHTS).is_file() and (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise FileNotFoundError(
        f"expected the image tokenizer as config.json + {VAE_WEIGHTS} in one of [{tried}], found none; "
        "pass the NextStep-1 f8ch16 tokenizer directory as vae_path= (--vae DIR with nextstep convert)"
    )


def check_release_files(directory: Path) -> None:
    """Raise ``FileNotFoundError`` naming every missing part of a release directory (the VAE excepted)."""
    missing = []
    if not _has_weights(directory):
        missing.append(f"weights ({INDEX_NAME} with model-*.safetensors shards, or {SINGLE_FILE_NAME})")
    if not _has_tokenizer_files(directory):
        missing.append("tokenizer files (tokenizer_config.json with tokenizer.json, or vocab.json + merges.txt)")
    if missing:
        raise FileNotFoundError(f"{directory} has a NextStep release config.json but lacks " + " and ".join(missing))


def checkpoint_dtype(infos: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype of the floating-point tensors of a checkpoint: the most common one, with a warning naming
    each dtype and its count when they mix (a model takes one dtype for all its weights)."""
    counts: dict[str, int] = {}
    for info in infos.values():
        if info.dtype in _SAFETENSORS_DTYPES:
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    if not counts:
        return torch.float32
    chosen = max(counts, key=counts.get)
    if len(counts) > 1:
        warnings.warn(f"the checkpoint's floating-point tensors mix dtypes (tensors per dtype: {counts}); all load "
                      f"as the most common one, {_SAFETENSORS_DTYPES[chosen]}: pass dtype= to choose another",
                      stacklevel=3)
    return _SAFETENSORS_DTYPES[chosen]


def _is_lm_head(name: str) -> bool:
    """Whether a release key (with or without the ``model.`` prefix) is the LM head's weight, which a
    model with tied embeddings does not read."""
    return name.removeprefix("model.") == "lm_head.weight"


def _check_release_keys(model: nn.Module, loaded: dict[str, TensorInfo], source: Path) -> None:
    """Compare the headers of the tensors that load (``loaded``) with the model, in release
    key names; raise naming every problem (a float tensor stored as integers, or the reverse, among them)."""
    expected, floating = {}, {}
    for key, tensor in _ShardedParts(model).state_dict(keep_vars=True).items():
        expected[model_key_to_release_key(key)] = tuple(tensor.shape)
        floating[model_key_to_release_key(key)] = tensor.is_floating_point()
    read = {name.removeprefix("model."): info for name, info in loaded.items()}
    check_state_dict(expected, {name: info.shape for name, info in read.items()}, source,
                     "the model its config.json describes")
    kinds = [f"{name}: expected {'floating-point' if floating[name] else 'integer'} values, found {info.dtype}"
             for name, info in sorted(read.items())
             if name in floating and floating[name] != info.is_floating_point]
    if kinds:
        raise ValueError(f"weights in {source} do not match the model its config.json describes: tensors of "
                         f"another kind [{'; '.join(kinds)}]")


# --------------------------------------------------------------------- loading
def load_release_checkpoint(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    vae_path: str | os.PathLike | None = None,
    sampler: ComponentSpec | str | None = None,
    use_norm: bool = True,
) -> "NextStep":
    """Load a published NextStep-1 model directory (NextStep-1-Large, -Edit, 1.1 ...).

    Args:
        directory: the release directory (see the module docstring).
        device: where the parameters are allocated.
        dtype: parameter dtype of the whole model (VAE included, as the release
            pipeline does); None keeps the dtype of the safetensors shards
            (bfloat16 for the published weights) for the transformer and the
            dtype of ``vae/checkpoint.pt`` for the VAE, so that saving the
            model again writes each as it was.
        vae_path: the image tokenizer directory when it is not ``directory / "vae"``.
        sampler: default sampler: a spec or a registered sampler's name (``flow_sde`` for
            NextStep-1.1's ``sde`` mode, ``euler`` for its ``ode`` mode); None selects the first
            release's Euler-Maruyama sampler.
        use_norm: LayerNorm each sampled token before it is fed back and decoded.

    Returns:
        the model; its text tokenizer reads the directory's tokenizer files.

    Raises:
        FileNotFoundError: naming the missing files.
        ValueError: for a config this library cannot run, special-token ids
            that disagree with the tokenizer, or weights whose names or shapes
            differ from the config (naming every key), or a VAE pickle that
            needs code execution.
    """
    from nextstep.builders import build_component
    from nextstep.model import NextStep
    from nextstep.tokenizers.vae_checkpoints import load_flux_vae

    directory = Path(directory)
    release = read_release_config(directory)
    check_release_config(release)
    check_release_files(directory)
    vae_directory = find_release_vae(directory, release, vae_path)
    vae = load_flux_vae(vae_directory, layout="nextstep", keep_dtype=dtype is None,
                        patch_size=release_integer(release, "latent_patch_size"))
    image_tokenizer_config_for_release(release, vae.config)
    config = model_config_from_release(release, vae.config, str(directory), sampler=sampler, use_norm=use_norm)
    text_tokenizer = build_component(config.text_tokenizer, base_dir=directory)
    check_special_token_ids(release, text_tokenizer)

    tied = config.tie_word_embeddings

    def rename(name: str) -> str | None:  # the model key a release tensor loads into; None: it does not load
        if tied and _is_lm_head(name):
            return None
        return release_key_to_model_key(name)

    loaded = {name: info for name, info in read_checkpoint_index(directory).items() if rename(name) is not None}
    vae_dtype = dtype
    dtype = dtype if dtype is not None else checkpoint_dtype(loaded)
    with torch.device("meta"):
        model = NextStep(
            image_tokenizer=vae,
            text_tokenizer=text_tokenizer,
            backbone=build_component(config.backbone),
            image_head=build_component(config.image_head),
            sampler=build_component(config.sampler),
            config=config,
        )
    _check_release_keys(model, loaded, directory)
    load_safetensors(_ShardedParts(model), directory, rename=rename, dtype=dtype, device=device)
    vae.to(device=device, dtype=vae_dtype)
    leftovers = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors left uninitialised after loading {directory}: {leftovers}")
    return model


# --------------------------------------------------------------------- saving
def _release_state(model: "NextStep") -> Iterator[tuple[str, torch.Tensor]]:
    """(release key, tensor) in the release's order: decoder, LM head, projectors, flow head."""
    state = _ShardedParts(model).state_dict()
    order = {part: index for index, part in enumerate(SHARDED_PARTS)}
    for key in sorted(state, key=lambda k: order[k.split(".", 1)[0]]):
        yield model_key_to_release_key(key), state[key]


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group names into consecutive shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own.

    Args:
        sizes: (name, bytes) in writing order.
        max_shard_size: the byte limit.
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, found {max_shard_size}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def save_release_checkpoint(
    model: "NextStep",
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Write ``model`` in the published NextStep-1 layout, atomically.

    Shards are written one at a time (at most ``max_shard_size`` bytes each,
    ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``;
    one ``model.safetensors`` when everything fits in one).

    Args:
        model: a model with a Qwen2 backbone, a flow-matching head, a FLUX VAE
            and a Hugging Face text tokenizer.
        directory: the output directory (replaced if it exists).
        dtype: dtype of the written transformer weights; None keeps the model's.
            The VAE is written in its own dtype.
        max_shard_size: byte limit of one shard.

    Raises:
        ValueError: when a component has no place in the release layout.
    """
    from nextstep.tokenizers.flux_vae import FluxVAE, FluxVAEConfig
    from nextstep.tokenizers.hf_text import HFTextTokenizer
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae_state

    tokenizer = model.text_tokenizer
    if not isinstance(tokenizer, HFTextTokenizer):
        raise ValueError(f"the release layout stores a Hugging Face tokenizer, found "
                         f"{type(tokenizer).__name__}; save this model with save_pretrained instead")
    if not isinstance(model.image_tokenizer, FluxVAE):
        raise ValueError(f"the release layout stores a FLUX VAE, found {type(model.image_tokenizer).__name__}")
    tensors = dict(_release_state(model))
    written_dtype = dtype or model.backbone.input_embeddings().weight.dtype
    release = release_config_from_model(model.current_config(), tokenizer,
                                        torch_dtype=_DTYPE_NAMES.get(written_dtype, str(written_dtype)))

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor_to_save(tensor, dtype if tensor.is_floating_point() else None)

    element = {name: (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for name, t in tensors.items()}
    sizes = [(name, tensor.numel() * element[name]) for name, tensor in tensors.items()]
    shards = plan_shards(sizes, max_shard_size)
    with atomic_directory(directory) as staging:
        weight_map = {}
        for index, names in enumerate(shards, start=1):
            file = SINGLE_FILE_NAME if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: cast(tensors[name]) for name in names}, str(staging / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        if len(shards) > 1:
            index_data = {"metadata": {"total_size": sum(size for _, size in sizes)},
                          "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(release, indent=2) + "\n")
        save_release_tokenizer(tokenizer.tokenizer, staging)
        # The patch size lives in config.json (latent_patch_size); vae/config.json has no field for it.
        vae = model.image_tokenizer
        save_flux_vae_state(vae.state_dict(), vae.config.replace(patch_size=FluxVAEConfig().patch_size),
                            staging / VAE_DIRECTORY, layout="nextstep")
