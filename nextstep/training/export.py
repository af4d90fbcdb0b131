"""Turn a training checkpoint into a model directory: the weight average, one dtype, no optimiser state."""

from __future__ import annotations

from pathlib import Path

import torch

from nextstep.training.checkpointing import EMA_FILE, MODEL_FILE


def export_model(checkpoint: str | Path, output: str | Path, *, use_ema: bool = True,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``output`` (``config.json`` + ``model.safetensors`` + tokenizer files) from a checkpoint.

    Args:
        checkpoint: a checkpoint directory of a `NextStep` run (``checkpoints/step-XXXXXXXX``),
            or a run folder (its latest checkpoint is used).
        output: the model directory to write (replaced atomically).
        use_ema: load the checkpoint's weight average into the trainable
            parameters (an error if it has none); False keeps the raw weights.
        dtype: cast floating-point weights (default: keep them).

    Returns:
        ``output``.
    """
    from nextstep.model import NextStep
    from nextstep.serialization import read_safetensors
    from nextstep.training.checkpointing import CheckpointManager

    checkpoint = Path(checkpoint)
    if not (checkpoint / MODEL_FILE).is_file():
        latest = CheckpointManager(checkpoint / "checkpoints").latest() if checkpoint.is_dir() else None
        if latest is None:
            raise FileNotFoundError(f"expected a checkpoint directory or a run folder at {checkpoint}, "
                                    f"found no {MODEL_FILE} and no checkpoints/")
        checkpoint = latest
    model = NextStep.from_pretrained(checkpoint)
    if use_ema:
        if not (checkpoint / EMA_FILE).is_file():
            raise FileNotFoundError(f"use_ema=True but {checkpoint} has no {EMA_FILE} (the run kept no average)")
        average = read_safetensors(checkpoint / EMA_FILE)
        parameters = dict(model.named_parameters())
        unknown = sorted(set(average) - set(parameters))
        if unknown:
            raise ValueError(f"{checkpoint / EMA_FILE} names parameters the model lacks: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in average.items():
                if tuple(tensor.shape) != tuple(parameters[name].shape):
                    raise ValueError(f"EMA tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"the model's is {tuple(parameters[name].shape)}")
                parameters[name].copy_(tensor)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(output)
    return Path(output)
