"""One evaluation of the flow head's MLP as one kernel: programs that share the work and wait for each other.

Legend: N rows (a few), D token dim, W head width, F the blocks' inner width,
L AdaLN blocks, P modulation pieces (3 per block + 2 for the output layer), G
programs.

The head's MLP runs once per solver step of every image token, and each of its
matrix products is small (a W x W weight for a few rows): launched one by one,
a solver evaluation is some 70 kernels whose launch and ramp-up cost more than
reading their weights. Here one launch does a whole evaluation. Each of the G
programs owns a share of the output features of every product
(`features_per_program`: with G = 128 for a 1536-wide head, 12 features, in a
tile of 16 whose last 4 are masked); after each product
the programs meet at a grid-wide barrier (an atomic counter in global memory),
since the next product reads every feature of the previous one:

    h     = x @ W_in.T + b_in                                  # (N, W)
    per block l:  u = silu(W1_l @ (LayerNorm(h) * scale_l + shift_l) + b1_l)
                  h = h + gate_l * (W2_l @ u + b2_l)
    v     = W_out @ (LayerNorm(h) * scale + shift) + b_out     # (N, D)

Before a modulated product each program computes the LayerNorm statistics and
the modulated input ``LayerNorm(h) * scale + shift`` of every row itself, into
rows of its own (a (G, BM, W) scratch buffer: no other program waits for them),
and every product is `nextstep.kernels.row_products` (loads and multiply-adds
in the loop over W, one reduction after it).

The barrier needs every program resident on the GPU at once: G must not exceed
what the GPU runs together (`persistent_programs` keeps it at most the number of
multiprocessors, and uses as many of them as it can), and nothing else may hold them. Where Triton can, the kernel
is launched as a cooperative grid, which the driver refuses (an error, and the
velocity falls back to separate kernels) rather than start programs that would
wait forever. Under Triton's interpreter
programs run one after another, so the kernel is checked there with G = 1
(one program owning every feature), which runs the same code with trivially
met barriers.

Rounding follows `nextstep.fast.flow_head_velocity.FusedFlowMatchingVelocity`
(cuBLAS products around fused norms): every product's output is rounded to the
head's dtype, then activated or added.
"""

from __future__ import annotations

import functools

import torch

from nextstep.kernels.l2_prefetch import prefetch_function
from nextstep.kernels.row_products import rows_times_weight_function
from nextstep.kernels.row_statistics import modulation_functions
from nextstep.kernels.triton_support import block_size, interpreter_enabled, reduction_step, triton_module

#: ``triton.language`` and the kernel's helper functions, bound when the kernel is first built.
tl = grid_barrier = modulate_rows = prefetch_l2 = prefetch_rows = rows_times_weight = None

__all__ = ["BARRIER_POLLING", "MAX_ROWS", "PersistentHeadWeights", "barriers_per_evaluation",
           "cooperative_launch_available", "features_per_program", "grid_barriers_triton", "persistent_head_triton",
           "persistent_programs"]

#: Most rows one evaluation takes.
MAX_ROWS = 16

BARRIER_POLLING = ("relaxed", "loads", "acquire")
"""How programs wait at the grid-wide barrier, polling its counter: ``relaxed``, with relaxed atomic reads
that one thread makes for its program, then one acquire read; ``loads``, with volatile loads that every
thread makes, then one acquire read; ``acquire``, with acquire reads throughout (each poll invalidates L1;
no read after)."""


class PersistentHeadWeights:
    """The MLP's weights stacked per block, as the kernel reads them (a copy: valid while the head is unchanged).

    Args:
        input_weight: (W, D).
        input_bias: (W,).
        first_weights: L tensors (F, W).
        first_biases: L tensors (F,).
        second_weights: L tensors (W, F).
        second_biases: L tensors (W,).
        output_weight: (D, W).
        output_bias: (D,).
        eps: the blocks' LayerNorm epsilon (one for all).
        output_eps: the output layer's LayerNorm epsilon.
    """

    def __init__(self, input_weight: torch.Tensor, input_bias: torch.Tensor, first_weights: list[torch.Tensor],
                 first_biases: list[torch.Tensor], second_weights: list[torch.Tensor],
                 second_biases: list[torch.Tensor], output_weight: torch.Tensor, output_bias: torch.Tensor,
                 eps: float, output_eps: float):
        with torch.no_grad():
            self.input_weight, self.input_bias = input_weight.contiguous(), input_bias.contiguous()
            self.first_weight = torch.stack(list(first_weights)).contiguous()  # (L, F, W)
            self.first_bias = torch.stack(list(first_biases)).contiguous()  # (L, F)
            self.second_weight = torch.stack(list(second_weights)).contiguous()
            self.second_bias = torch.stack(list(second_biases)).contiguous()
            self.output_weight, self.output_bias = output_weight.contiguous(), output_bias.contiguous()
        self.eps, self.output_eps = float(eps), float(output_eps)
        self.blocks, self.inner_width, self.width = self.first_weight.shape
        self.token_dim = self.output_weight.shape[0]


@functools.cache
def cooperative_launch_available() -> bool:
    """Whether this Triton launches kernels as a cooperative grid (``launch_cooperative_grid``): the
    driver then refuses a grid whose programs cannot all be resident at once instead of letting them wait
    for each other forever."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # no NVIDIA backend
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def persistent_programs(width: int, multiprocessors: int | None, min_features: int = 8) -> int:
    """How many programs share an evaluation of a head ``width`` wide: as many as there are multiprocessors
    (None: no limit), each owning at least ``min_features`` features of every product, and none idle (1536
    features on 132 multiprocessors: 128 programs of 12 features)."""
    programs = max(1, -(-width // min_features))
    if multiprocessors is not None:
        programs = min(programs, multiprocessors)
    features = -(-width // programs)
    return -(-width // features)


def _cooperative_launch() -> dict[str, bool]:
    """Launch options of a kernel whose programs wait for each other: a cooperative grid where this Triton
    compiles and launches one (never under its interpreter)."""
    if interpreter_enabled() or not cooperative_launch_available():
        return {}
    return {"launch_cooperative_grid": True}


def _polling_index(polling: str) -> int:
    if polling not in BARRIER_POLLING:
        raise ValueError(f"polling must be one of {list(BARRIER_POLLING)}, found {polling!r}")
    return BARRIER_POLLING.index(polling)


def barriers_per_evaluation(blocks: int) -> int:
    """Grid-wide barriers in one evaluation of a head of ``blocks`` AdaLN blocks: one after the input
    projection and two per block (25 for the 12 blocks of the base head)."""
    return 1 + 2 * blocks


def features_per_program(width: int, inner_width: int, programs: int) -> int:
    """Features of every product that each of ``programs`` programs owns (the widest product's share)."""
    return -(-max(width, inner_width) // programs)


@functools.cache
def _kernel(interpret: bool):
    """Build the Triton kernel (once per interpreter setting)."""
    # Triton's interpreter patches the `triton.language` it finds among the kernel's globals, and a
    # kernel finds the functions it calls among its globals too.
    global tl, grid_barrier, modulate_rows, prefetch_l2, prefetch_rows, rows_times_weight
    triton = triton_module()
    import triton.language as tl

    rows_times_weight = rows_times_weight_function(interpret)
    prefetch_l2 = prefetch_function(interpret)
    _, modulate_rows = modulation_functions(interpret)

    @triton.jit
    def grid_barrier(counter_ptr, target, POLLING: tl.constexpr):
        # Every thread's writes, then the program publishes them (release) and waits for the counter to
        # reach target (POLLING: `BARRIER_POLLING`'s index). Relaxed reads: atomic adds of 0 (0), which one
        # thread makes and hands to the others, or volatile loads (1), which every thread makes and L2
        # serves at once; then one acquire read orders what follows after every program's release (the
        # loop on its value, never taken, keeps compilers that drop an unused atomic read, as Triton 3.6
        # does, from dropping it). Or acquire reads throughout (2): the read that sees target is the
        # acquire, one round trip to L2 fewer, but every poll invalidates L1. Then every thread goes on.
        tl.debug_barrier()
        tl.atomic_add(counter_ptr, 1, sem="release")
        if POLLING == 1:
            seen = tl.load(counter_ptr, volatile=True)
            while seen < target:
                seen = tl.load(counter_ptr, volatile=True)
        elif POLLING == 0:
            seen = tl.atomic_add(counter_ptr, 0, sem="relaxed")
            while seen < target:
                seen = tl.atomic_add(counter_ptr, 0, sem="relaxed")
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        tl.debug_barrier()

    @triton.jit
    def prefetch_rows(weight_ptr, first, count, INNER: tl.constexpr, BN: tl.constexpr, FEATURES: tl.constexpr,
                      LINE: tl.constexpr, LINES: tl.constexpr):
        # Ask L2 for weight rows first .. first + FEATURES (of count) of a later product, one address per
        # 128-byte line, so that they stream from memory while the programs compute and wait at barriers.
        column = tl.minimum(first + tl.arange(0, BN), tl.minimum(first + FEATURES, count) - 1).to(tl.int64)
        line = tl.minimum(tl.arange(0, LINES) * LINE, INNER - 1)
        prefetch_l2(weight_ptr + column[:, None] * INNER + line[None, :])

    @triton.jit
    def persistent_head_kernel(x_ptr, mod_ptr, input_weight_ptr, input_bias_ptr, first_weight_ptr, first_bias_ptr,
                               second_weight_ptr, second_bias_ptr, output_weight_ptr, output_bias_ptr, h_ptr,
                               inner_ptr, a_ptr, out_ptr, counter_ptr, rows, eps, output_eps, D: tl.constexpr,
                               W: tl.constexpr, F: tl.constexpr, BLOCKS: tl.constexpr, PIECES: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr, FEATURES: tl.constexpr, BK: tl.constexpr,
                               BKD: tl.constexpr, PROGRAMS: tl.constexpr, PREFETCH: tl.constexpr,
                               POLLING: tl.constexpr, LINE: tl.constexpr,
                               LINES_W: tl.constexpr, LINES_F: tl.constexpr):
        program = tl.program_id(0)
        row = tl.arange(0, BM).to(tl.int64)
        row_inside = row < rows
        mine = program * FEATURES  # this program's first features of every product
        owned = tl.arange(0, BN) < FEATURES  # a tile of BN holds the program's FEATURES features
        if PREFETCH:
            prefetch_rows(first_weight_ptr, mine, F, W, BN, FEATURES, LINE, LINES_W)
        # Input projection: this program's features of h, for every row.
        for first in range(mine, W, PROGRAMS * FEATURES):
            column = (first + tl.arange(0, BN)).to(tl.int64)
            column_inside = owned & (column < W)
            total = rows_times_weight(x_ptr, D, input_weight_ptr, D, row, row_inside, column, column_inside, BM, BN,
                                      BKD, False)
            total += tl.load(input_bias_ptr + column, mask=column_inside, other=0.0).to(tl.float32)[None, :]
            tl.store(h_ptr + row[:, None] * W + column[None, :], total.to(h_ptr.dtype.element_ty),
                     mask=row_inside[:, None] & column_inside[None, :])
        grid_barrier(counter_ptr, PROGRAMS, POLLING)  # barrier 1; block b meets at 2 + 2b and 3 + 2b
        a_rows = a_ptr + program * BM * W  # this program's (BM, W) modulated input
        for block in range(BLOCKS):
            if PREFETCH:
                prefetch_rows(second_weight_ptr + block * W * F, mine, W, F, BN, FEATURES, LINE, LINES_F)
            # a = LayerNorm(h) * scale + shift, rounded to h's dtype, into this program's own rows.
            modulate_rows(h_ptr, W, mod_ptr + 3 * block * W, PIECES * W, mod_ptr + (3 * block + 1) * W, PIECES * W,
                          row, row_inside, W, eps, a_rows, BM, BK, True)
            first_weight = first_weight_ptr + block * F * W
            for first in range(mine, F, PROGRAMS * FEATURES):
                column = (first + tl.arange(0, BN)).to(tl.int64)
                column_inside = owned & (column < F)
                total = rows_times_weight(a_rows, W, first_weight, W, row, row_inside, column, column_inside, BM,
                                          BN, BK, False)
                total += tl.load(first_bias_ptr + block * F + column, mask=column_inside,
                                 other=0.0).to(tl.float32)[None, :]
                total = total.to(inner_ptr.dtype.element_ty).to(tl.float32)  # the product's output, rounded
                total = total * tl.sigmoid(total)
                tl.store(inner_ptr + row[:, None] * F + column[None, :], total.to(inner_ptr.dtype.element_ty),
                         mask=row_inside[:, None] & column_inside[None, :])
            grid_barrier(counter_ptr, (2 + 2 * block) * PROGRAMS, POLLING)
            if PREFETCH:
                if block + 1 < BLOCKS:
                    prefetch_rows(first_weight_ptr + (block + 1) * F * W, mine, F, W, BN, FEATURES, LINE, LINES_W)
                elif mine < D:
                    prefetch_rows(output_weight_ptr, mine, D, W, BN, FEATURES, LINE, LINES_W)
            second_weight = second_weight_ptr + block * W * F
            for first in range(mine, W, PROGRAMS * FEATURES):
                column = (first + tl.arange(0, BN)).to(tl.int64)
                column_inside = owned & (column < W)
                inside = row_inside[:, None] & column_inside[None, :]
                total = rows_times_weight(inner_ptr, F, second_weight, F, row, row_inside, column, column_inside,
                                          BM, BN, BK, True)
                total += tl.load(second_bias_ptr + block * W + column, mask=column_inside,
                                 other=0.0).to(tl.float32)[None, :]
                total = total.to(h_ptr.dtype.element_ty).to(tl.float32)
                gate = tl.load(mod_ptr + row[:, None] * (PIECES * W) + (3 * block + 2) * W + column[None, :],
                               mask=inside, other=0.0)
                h = tl.load(h_ptr + row[:, None] * W + column[None, :], mask=inside, other=0.0)
                h = h.to(tl.float32) + gate.to(tl.float32) * total
                tl.store(h_ptr + row[:, None] * W + column[None, :], h.to(h_ptr.dtype.element_ty), mask=inside)
            grid_barrier(counter_ptr, (3 + 2 * block) * PROGRAMS, POLLING)
        # Output layer: the token-dim features, shared by the first programs.
        if mine < D:
            modulate_rows(h_ptr, W, mod_ptr + (PIECES - 2) * W, PIECES * W, mod_ptr + (PIECES - 1) * W, PIECES * W,
                          row, row_inside, W, output_eps, a_rows, BM, BK, True)
        for first in range(mine, D, PROGRAMS * FEATURES):
            column = (first + tl.arange(0, BN)).to(tl.int64)
            column_inside = owned & (column < D)
            total = rows_times_weight(a_rows, W, output_weight_ptr, W, row, row_inside, column, column_inside, BM,
                                      BN, BK, False)
            total += tl.load(output_bias_ptr + column, mask=column_inside, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + row[:, None] * D + column[None, :], total.to(out_ptr.dtype.element_ty),
                     mask=row_inside[:, None] & column_inside[None, :])

    return persistent_head_kernel


@functools.cache
def _barrier_kernel(interpret: bool):
    """Build the kernel that only meets at the grid-wide barrier (once per interpreter setting)."""
    _kernel(interpret)  # binds grid_barrier
    triton = triton_module()

    @triton.jit
    def grid_barriers_kernel(counter_ptr, rounds, PROGRAMS: tl.constexpr, POLLING: tl.constexpr):
        for meeting in range(rounds):
            grid_barrier(counter_ptr, (meeting + 1) * PROGRAMS, POLLING)

    return grid_barriers_kernel


def grid_barriers_triton(programs: int, rounds: int, device: torch.device | str, num_warps: int = 4,
                         polling: str = "relaxed") -> torch.Tensor:
    """``programs`` programs meet ``rounds`` times at the grid-wide barrier of `persistent_head_triton` and
    do nothing else: timed with different ``rounds``, what one barrier costs (it runs
    `barriers_per_evaluation` times per evaluation).

    Args:
        programs: G, as for `persistent_head_triton` (1 under Triton's interpreter).
        rounds: barriers to meet at (>= 0).
        device: where to launch.
        num_warps: warps per program.
        polling: how programs wait at the barrier, a name of `BARRIER_POLLING` (as for
            `persistent_head_triton`).

    Returns:
        the barrier's counter, (1,) int32: ``rounds * programs`` once every program has passed every barrier.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, found {rounds}")
    polling_index = _polling_index(polling)
    if programs < 1 or (interpreter_enabled() and programs != 1):
        expected = "1 under Triton's interpreter" if interpreter_enabled() else ">= 1"
        raise ValueError(f"programs must be {expected}, found {programs}")
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    _barrier_kernel(interpreter_enabled())[(programs,)](counter, rounds, PROGRAMS=programs,
                                                        POLLING=polling_index, num_warps=num_warps,
                                                        **_cooperative_launch())
    return counter


def persistent_head_triton(x_t: torch.Tensor, modulation: torch.Tensor, weights: PersistentHeadWeights,
                           programs: int, num_warps: int = 4, prefetch: bool = True,
                           features: int | None = None, polling: str = "relaxed") -> torch.Tensor:
    """One evaluation of the head's MLP in one launch of ``programs`` cooperating programs.

    Args:
        x_t: (N, D) noisy tokens in the head's dtype, N <= `MAX_ROWS`.
        modulation: (N, P, W) every modulation of this evaluation time (pieces
            ``[shift, scale, gate]`` per block, then ``[shift, scale]``).
        weights: the stacked weights.
        programs: G, at most what the GPU runs at once (see `persistent_programs`);
            1 under Triton's interpreter. Each owns `features_per_program`
            features of every product.
        num_warps: warps per program.
        prefetch: each program asks L2 for its weights of the next product
            while it computes this one (compiled kernels only: Triton's
            interpreter runs no inline assembly).
        features: features of every product a program owns per step (default:
            `features_per_program`; fewer make each program loop over several
            shares, which runs the multi-program code paths with one program).
        polling: how the programs wait at the grid-wide barrier, a name of
            `BARRIER_POLLING` (`grid_barriers_triton` times one barrier each way).

    Returns:
        (N, D) velocity in the head's dtype.
    """
    rows, token_dim = x_t.shape
    width, blocks = weights.width, weights.blocks
    pieces = 3 * blocks + 2
    if token_dim != weights.token_dim or modulation.shape != (rows, pieces, width):
        raise ValueError(f"x_t must be (N, {weights.token_dim}) and modulation (N, {pieces}, {width}), found "
                         f"{tuple(x_t.shape)} and {tuple(modulation.shape)}")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"the persistent head takes 1 to {MAX_ROWS} rows, found {rows}")
    if interpreter_enabled() and programs != 1:
        raise ValueError(f"under Triton's interpreter programs run one after another: programs must be 1, "
                         f"found {programs}")
    x_t, modulation = x_t.contiguous(), modulation.contiguous()
    h = torch.empty(rows, width, dtype=x_t.dtype, device=x_t.device)
    inner = torch.empty(rows, weights.inner_width, dtype=x_t.dtype, device=x_t.device)
    block_m = block_size(rows)
    modulated = torch.empty(programs, block_m, width, dtype=x_t.dtype, device=x_t.device)  # one (BM, W) per program
    out = torch.empty(rows, token_dim, dtype=x_t.dtype, device=x_t.device)
    counter = torch.zeros(1, dtype=torch.int32, device=x_t.device)
    if features is None:
        features = features_per_program(width, weights.inner_width, programs)
    elif features < 1:
        raise ValueError(f"features must be >= 1, found {features}")
    block_n = block_size(features)
    block_k = reduction_step(512, block_m, block_n, num_warps)
    line = max(1, 128 // x_t.element_size())  # elements per 128-byte cache line
    _kernel(interpreter_enabled())[(programs,)](
        x_t, modulation, weights.input_weight, weights.input_bias, weights.first_weight, weights.first_bias,
        weights.second_weight, weights.second_bias, weights.output_weight, weights.output_bias, h, inner, modulated,
        out, counter, rows, weights.eps, weights.output_eps, D=token_dim, W=width, F=weights.inner_width,
        BLOCKS=blocks, PIECES=pieces, BM=block_m, BN=block_n, FEATURES=features, BK=block_k,
        BKD=min(block_k, block_size(token_dim)), PROGRAMS=programs,
        PREFETCH=bool(prefetch) and not interpreter_enabled(),
        POLLING=_polling_index(polling), LINE=line, LINES_W=block_size(-(-width // line)),
        LINES_F=block_size(-(-weights.inner_width // line)), num_warps=num_warps,
        **_cooperative_launch())
    return out
