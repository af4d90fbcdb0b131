"""Turn a training checkpoint into a model directory: the weight average, one dtype, no optimiser state."""

from __future__ import annotations

from pathlib import Path

import torch

from nextstep.training.checkpointing import EMA_FILE, MODEL_FILE


def export_model(checkpoint: str | Path, output: str | Path, *, use_ema: bool | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``output`` (``config.json`` + ``model.safetensors`` + tokenizer files) from a checkpoint.

    Args:
        checkpoint: a checkpoint directory of a `NextStep` run (``checkpoints/step-XXXXXXXX``),
            or a run folder (its latest checkpoint is used).
        output: the model directory to write (replaced atomically).
        use_ema: load the checkpoint's weight average into the trainable
            parameters (True: an error if it has none); False keeps the raw weights;
            None (the default) the average when the run kept one, else the raw weights, as a
            finished run writes its ``model/``.
        dtype: cast floating-point weights (default: keep them).

    Returns:
        ``output``.
    """
    from nextstep.model import NextStep
    from nextstep.training.checkpointing import CheckpointManager, read_checkpoint_average
    from nextstep.training.ema import ExponentialMovingAverage
    from nextstep.training.trainer import CHECKPOINTS_DIR

    checkpoint = Path(checkpoint)
    if not (checkpoint / MODEL_FILE).is_file():
        latest = CheckpointManager(checkpoint / CHECKPOINTS_DIR).latest() if checkpoint.is_dir() else None
        if latest is None:
            raise FileNotFoundError(f"expected a checkpoint directory or a run folder at {checkpoint}, "
                                    f"found no {MODEL_FILE} and no checkpoints/")
        checkpoint = latest
    _check_holds_a_model(checkpoint)
    if use_ema is None:
        use_ema = (checkpoint / EMA_FILE).is_file()
    averages = read_checkpoint_average(checkpoint) if use_ema else None  # before the model: fail fast
    model = NextStep.from_pretrained(checkpoint, dtype=dtype)  # with a dtype, every part stored in it
    if not use_ema:
        model.save_pretrained(output)
        return Path(output)
    with ExponentialMovingAverage.holding(model, averages).applied_to(model):  # names and shapes checked
        model.save_pretrained(output)
    return Path(output)


def _check_holds_a_model(checkpoint: Path) -> None:
    """Raise ``ValueError`` when ``checkpoint``'s ``config.json`` is an image tokenizer's (a tokenizer run's
    checkpoint), naming where its tokenizer loads from instead."""
    from nextstep.tokenizers.flux_vae import FluxVAEConfig

    try:
        FluxVAEConfig.load(checkpoint / "config.json")
    except (OSError, ValueError, TypeError):
        return
    raise ValueError(f"{checkpoint} is a checkpoint of an image tokenizer run, not of a NextStep model; load its "
                     "tokenizer with nextstep.tokenizers.vae_checkpoints.load_flux_vae (the run folder's "
                     "tokenizer/ holds the finished one)")
