"""One function over static buffers, replayed as a CUDA graph, or called eagerly where graphs are unavailable.

A CUDA graph records the kernels of one call once and replays them with a
single launch, which removes the per-kernel launch cost that dominates a
batch-1 decode step or a flow-head step. The function must read its inputs
from, and write its outputs to, tensors that stay allocated between calls
(static buffers), and must not synchronise with the host (no ``.item()``, no
data-dependent shapes).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

__all__ = ["CapturedCall", "GraphCaptureWarning"]


class GraphCaptureWarning(RuntimeWarning):
    """A CUDA graph could not be captured; the function runs eagerly instead."""


class CapturedCall:
    """``fn()`` replayed from a CUDA graph once `capture` succeeded, called eagerly otherwise.

    Args:
        fn: a function of no arguments over static buffers.
        name: how warnings refer to it.
        pool: a memory pool (``torch.cuda.graph_pool_handle()``) shared with other
            graphs that are replayed in the order they were captured and never at
            the same time, or None for a private one.

    Attributes:
        graph: the captured ``torch.cuda.CUDAGraph``, or None (eager).
        failure: why capturing failed, or None.
    """

    def __init__(self, fn: Callable[[], None], *, name: str = "step", pool: Any = None):
        self.fn = fn
        self.name = name
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def capture(self, device: torch.device, *, warmup: int = 2,
                snapshot: Callable[[], Callable[[], None]] | None = None) -> bool:
        """Warm ``fn`` up on a side stream, then record it; on failure warn and stay eager.

        Warm-up calls run lazy set-up outside the graph (cuBLAS workspaces,
        Triton and ``torch.compile`` compilation). They really run, so a function
        with side effects on its state must pass ``snapshot``.

        Args:
            device: the CUDA device.
            warmup: eager calls before recording.
            snapshot: called before the warm-up; returns a function that undoes
                the warm-up's side effects (called after each warm-up call).

        Returns:
            whether a graph was captured.
        """
        if device.type != "cuda":
            self.failure = f"CUDA graphs need a CUDA device, found {device}"
            return False
        restore = snapshot() if snapshot is not None else None
        try:
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.fn()
                    if restore is not None:  # each warm-up call from the same state: a decode step
                        restore()  # writes its own slot every time, never the one past a full cache
            current.wait_stream(side)
            if restore is not None:
                restore()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.fn()
        except Exception as error:
            self.graph = None
            self.failure = f"{type(error).__name__}: {str(error).strip()[:300]}"
            torch.cuda.synchronize(device)
            if restore is not None:
                restore()
            warnings.warn(f"capturing {self.name} as a CUDA graph failed ({self.failure}); running it eagerly",
                          GraphCaptureWarning, stacklevel=2)
            return False
        self.graph = graph
        return True

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()
