"""Convert a model directory between layouts (what ``nextstep convert`` runs).

Sources: this library's layout, the NextStep-1 release layout, or a plain
Qwen2 / Qwen2.5 checkpoint (which becomes a new NextStep model, see
`nextstep.interop.qwen_init.nextstep_from_qwen`). Targets: ``native`` or ``release``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nextstep.interop.layout import NATIVE, QWEN2, RELEASE, detect_model_layout
from nextstep.interop.release_checkpoint import DEFAULT_MAX_SHARD_SIZE
from nextstep.io import check_replaceable

TARGETS = (NATIVE, RELEASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2,
               "GIB": 1024**3}


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"200MB"``, ``"512KiB"`` or a plain integer.

    Raises:
        ValueError: naming the text and the accepted units.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"size must be a number with an optional unit {sorted(u for u in _SIZE_UNITS if u)}, "
                             f"found {text!r}")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, found {text!r}")
    return value


@dataclass
class ConversionResult:
    """What `convert_checkpoint` did.

    Args:
        source_layout: the detected layout of the source.
        target_layout: the layout written.
        parameters: parameter count of the converted model.
    """

    source_layout: str
    target_layout: str
    parameters: int


def convert_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    vae: str | os.PathLike | None = None,
    head: str = "base",
    seed: int = 0,
) -> ConversionResult:
    """Read ``source`` in whatever layout it has and write ``output`` in layout ``to``.

    Args:
        source: a native, release or Qwen2 model directory.
        output: the directory to write (replaced atomically).
        to: ``native`` or ``release``; None converts release -> native,
            native -> release and Qwen2 -> native.
        dtype: parameter dtype of the written model; None keeps the source's.
        max_shard_size: byte limit of one shard in the release layout.
        vae: the image tokenizer for a Qwen2 source (required there), or for a
            release directory (in place of its ``vae/`` folder or ``vae_name_or_path``).
        head: flow-head size for a Qwen2 source.
        seed: initialisation seed for a Qwen2 source.

    Raises:
        ValueError: for an unknown target, a Qwen2 source without ``vae``, or
            ``vae`` with a native source.
        FileExistsError, NotADirectoryError: an ``output`` that cannot be replaced
            (`nextstep.io.check_replaceable`), before anything loads.
    """
    from nextstep.interop.qwen_init import nextstep_from_qwen
    from nextstep.interop.release_checkpoint import load_release_checkpoint, save_release_checkpoint
    from nextstep.model import NextStep

    source = Path(source)
    layout = detect_model_layout(source)
    target = to or (RELEASE if layout == NATIVE else NATIVE)
    if target not in TARGETS:
        raise ValueError(f"target layout must be one of {list(TARGETS)}, found {target!r}")
    check_replaceable(Path(output))  # before the model loads
    if layout == QWEN2:
        if vae is None:
            raise ValueError(f"{source} is a plain Qwen2 checkpoint: pass the image tokenizer (--vae DIR) to build "
                             "a NextStep model from it")
        model = nextstep_from_qwen(source, image_tokenizer=vae, head=head, dtype=dtype, seed=seed)
    elif layout == RELEASE:
        model = load_release_checkpoint(source, dtype=dtype, vae_path=vae)
    else:
        if vae is not None:
            raise ValueError(f"--vae applies to Qwen2 sources and release directories only; {source} is a "
                             f"{layout} NextStep directory, which holds its image tokenizer")
        model = NextStep.from_pretrained(source, dtype=dtype)
    if target == RELEASE:
        save_release_checkpoint(model, output, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(output)
    return ConversionResult(layout, target, model.parameter_counts()["total"])
