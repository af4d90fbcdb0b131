"""Asking L2 for memory that a kernel will read later, without waiting for it.

A kernel bound by reading weights stalls wherever it cannot have loads in
flight: at a grid-wide barrier, or before the kernel ahead of it has finished.
Weights do not depend on what is computed, so a program can ask L2 for the
weights it will read next (``prefetch.global.L2``, one address per 128-byte
line) and go on; by the time it loads them they are on their way or there.
Used by `nextstep.kernels.persistent_head` (the next product's weights, before
each barrier) and by `nextstep.kernels.skinny_linear` (its first weights,
before waiting for the kernel ahead, see
`nextstep.kernels.triton_support.dependent_launches`).

Inline assembly: compiled kernels only (Triton's interpreter runs none).
"""

from __future__ import annotations

import functools

from nextstep.kernels.triton_support import triton_module

#: ``triton.language``, bound when the helper is first built.
tl = None

__all__ = ["prefetch_function"]


@functools.cache
def prefetch_function(interpret: bool):
    """The Triton function ``prefetch_l2(pointers)``: asks L2 for the line of every pointer (any shape).

    Args:
        interpret: built for Triton's interpreter (a cache key, like the kernels' builders).
    """
    global tl  # Triton's interpreter patches the `triton.language` it finds among a function's globals
    triton = triton_module()
    import triton.language as tl

    @triton.jit
    def prefetch_l2(pointers):
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [pointers],
                                  dtype=tl.int32, is_pure=False, pack=1)

    return prefetch_l2
