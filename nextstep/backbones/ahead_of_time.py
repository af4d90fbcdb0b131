"""A backbone's one-token decode step compiled ahead of time with AOTInductor.

``torch.compile`` leaves Python work on every call (frame evaluation, guards,
AOTAutograd's wrappers); for small models that is most of a decode step.
`AheadOfTimeDecodeStep` instead exports the step once with ``torch.export``
(batch size and cache length dynamic), compiles it to a shared library with
AOTInductor and calls the library directly.

The library does not hold its own copy of the weights: it reads the module's
parameters and buffers in place (AOTInductor's user-managed constants), so
weights updated in place (an optimizer step, ``load_state_dict``) are seen
without recompiling. Tensors *replaced* after compiling (``module.to(...)``,
``load_state_dict(..., assign=True)``, assigning a new parameter) are not; the
owning backbone drops the step when it is moved or cast.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["AheadOfTimeDecodeStep", "ahead_of_time_available"]

LayerCache = tuple[torch.Tensor, torch.Tensor]
#: Largest batch and cache length the exported step accepts.
MAX_BATCH = 1 << 16
MAX_SLOTS = 1 << 24
#: The fewest cache slots the exported step takes (a shape bound of the export).
MIN_SLOTS = 2


def ahead_of_time_available() -> bool:
    """Whether this PyTorch has what `AheadOfTimeDecodeStep` needs (``torch.export`` and AOTInductor packaging)."""
    inductor = getattr(torch, "_inductor", None)
    return hasattr(torch, "export") and all(
        hasattr(inductor, name) for name in ("aoti_compile_and_package", "aoti_load_package")
    )


class _StepModule(nn.Module):
    """The decode step as a module of flat tensors, which is what ``torch.export`` traces."""

    def __init__(self, owner: nn.Module, run: Callable[..., torch.Tensor]):
        super().__init__()
        self.owner = owner
        self._run = run

    def forward(self, embeds, positions, key_mask, slots, layer_tensors):
        pairs = tuple(zip(layer_tensors[0::2], layer_tensors[1::2]))
        return self._run(embeds, positions, key_mask, slots, pairs, key_mask.shape[1])


class AheadOfTimeDecodeStep:
    """``run(embeds, positions, key_mask, slots, layer_caches, visible)`` compiled ahead of time.

    Args:
        owner: the module whose parameters and buffers ``run`` reads.
        run: the step: embeds (B, 1, H), positions (B, 1), key_mask (B, T) bool,
            slots (1,) int64, layer_caches (per layer (keys, values), each
            (B, K, T, E), written in place at ``slots``), visible (= T) ->
            hidden states (B, 1, H).
        example: (embeds, positions, key_mask, slots, layer_caches) that ``run`` is
            traced with (any batch and length; the compiled step accepts others).

    Raises whatever export or compilation raises; callers fall back to eager.
    """

    def __init__(self, owner: nn.Module, run: Callable[..., torch.Tensor], example: Sequence):
        from torch.export import Dim

        embeds, positions, key_mask, slots, layer_caches = example
        flat = [tensor for pair in layer_caches for tensor in pair]
        step = _StepModule(owner, run)
        batch = Dim("batch", min=1, max=MAX_BATCH)
        length = Dim("slots", min=MIN_SLOTS, max=MAX_SLOTS)
        shapes = ({0: batch}, {0: batch}, {0: batch, 1: length}, None, [{0: batch, 2: length}] * len(flat))
        with torch.no_grad():
            program = torch.export.export(
                step, (embeds, positions, key_mask, slots, flat), dynamic_shapes=shapes, strict=False
            )
        self._directory = tempfile.TemporaryDirectory(prefix="nextstep-decode-")
        package = torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(Path(self._directory.name) / "decode_step.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False},
        )
        self._runner = torch._inductor.aoti_load_package(package)
        needed = set(self._runner.get_constant_fqns())
        tensors = {**dict(step.named_parameters()), **dict(step.named_buffers())}
        missing = needed - set(tensors)
        if missing:
            raise RuntimeError(f"the compiled decode step needs tensors the module lacks: {sorted(missing)}")
        # user_managed: the library reads these tensors where they are (no copy); holding them
        # here keeps their memory valid even if the module's attributes are replaced later.
        self._constants = {name: tensors[name] for name in needed}
        self._runner.load_constants(self._constants, check_full_update=True, user_managed=True)
        self.dtype, self.device = embeds.dtype, embeds.device

    def accepts(self, embeds: torch.Tensor, positions: torch.Tensor, slots: int) -> bool:
        """Whether a call over a cache of ``slots`` slots can run compiled: no gradients wanted, the dtypes and
        device traced, and a cache of at least `MIN_SLOTS` slots (the shapes the step was exported for)."""
        return (embeds.dtype == self.dtype and positions.dtype == torch.int64 and embeds.device == self.device
                and slots >= MIN_SLOTS and not torch.is_grad_enabled())

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                 slots: torch.Tensor, layer_caches: tuple[LayerCache, ...]) -> torch.Tensor:
        """The step over all T slots of the cache (``run`` with ``visible = T``)."""
        # The library indexes its inputs with the strides it was traced with (contiguous ones).
        return self._runner(embeds.contiguous(), positions.contiguous(), key_mask, slots,
                            [t for pair in layer_caches for t in pair])
