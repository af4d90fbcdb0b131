"""Every Triton kernel of the GPU benchmark, compiled for a GPU on this machine: what each one needs.

Runs on a machine without a GPU (`nextstep.kernels.target_compile`): the
kernels are compiled for ``--arch`` (default sm_90, the H100 and H200) with
Triton's compiler and not run. Compiled are the kernels that
``benchmarks/gpu_latency.py`` launches, at its shapes (NextStep-1-Large: the
Qwen2.5-14B decoder layer, the base flow head) and its tile candidates:

- the few-rows products (`nextstep.kernels.skinny_linear`) of one decoder
  layer at 1 and 2 rows, bf16 and int8, with every tile of ``SKINNY_CANDIDATES``;
- one decode step through the fused stack (`nextstep.fast.fused_decode`):
  residual-add norms, rotary embedding into the cache, SwiGLU, also launched
  as programmatic dependent launches;
- one token step of the head (`nextstep.fast.token_step`) with the norm
  kernels, with the block kernels at every tile of ``TILE_CANDIDATES`` (batch 1
  and 8 with CFG: 2 and 16 rows), and with the one-launch head (as many programs as on
  the GPU, at most one per multiprocessor of the target), waiting at its grid-wide
  barrier each way of ``BARRIER_POLLING``, and that barrier alone.

For each distinct kernel: registers per thread, spilled bytes, shared memory,
programs per multiprocessor, and barriers, shared-memory accesses and global
loads inside its loops, and how many of those loads are 128-bit (see
`nextstep.kernels.target_compile`). Writes
``kernel_resources.json`` and ``kernel_resources.md`` to ``--out``; exits 1 if a
kernel failed to compile.

``--small`` compiles the same kernels for the tiny preset in bf16 with the
default tiles and one row-by-row tile (seconds; the tests run it).

``--triton VERSION`` compiles with another Triton release than the installed
one, from ``.tritons/VERSION`` (``make tritons TRITONS=VERSION`` puts it there),
and writes ``kernel_resources_triton-VERSION.json`` / ``.md``. Releases differ
in the code they make from the same kernel (how a tile broadcast over rows is
laid out between threads, say), so the kernels are checked with the release a
GPU will run them with too.

Usage:
    python benchmarks/kernel_resources.py [--arch sm_90] [--out DIR]    # about 2 minutes on 2 cores
    python benchmarks/kernel_resources.py --triton 3.6.0
    python benchmarks/kernel_resources.py --small --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels: Triton's interpreter must be off when it is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default, without its warning

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
from gpu_latency import (  # noqa: E402
    SKINNY_CANDIDATES,
    TILE_CANDIDATES,
    build_random_model,
    layer_products,
    loaded_token_step,
    random_prefill,
)

from nextstep.fast import DecodeStep  # noqa: E402
from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity  # noqa: E402
from nextstep.fast.fused_decode import FusedDecodeStack  # noqa: E402
from nextstep.fast.weight_quantization import quantize_int8  # noqa: E402
from nextstep.io import atomic_write_text  # noqa: E402
from nextstep.kernels.adaln_linear import Tiles, set_tiles  # noqa: E402
from nextstep.kernels.persistent_head import BARRIER_POLLING, grid_barriers_triton, persistent_programs  # noqa: E402
from nextstep.kernels.skinny_linear import SkinnyTiles, set_skinny_tiles, skinny_linear_triton  # noqa: E402
from nextstep.kernels.target_compile import TARGETS, compile_for_target  # noqa: E402
from nextstep.kernels.triton_support import dependent_launch_available  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Where `make tritons` installs more Triton releases, one folder per version.
TRITONS = ROOT / ".tritons"
#: Set in the process that runs with a release from `TRITONS` ahead of the installed Triton.
RELEASE_VARIABLE = "NEXTSTEP_TRITON_RELEASE"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", choices=sorted(TARGETS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for kernel_resources.json / .md")
    parser.add_argument("--small", action="store_true",
                        help="the tiny preset in bf16, the default tiles and one row-by-row tile (seconds)")
    parser.add_argument("--triton", default=None, metavar="VERSION",
                        help="compile with this Triton release from .tritons/VERSION (make tritons)")
    return parser.parse_args(argv)


def run_with_release(release: str, argv: list[str]) -> int:
    """This script again, in a process with Triton ``release`` from `TRITONS` ahead of the installed one."""
    folder = TRITONS / release
    if not (folder / ".installed").exists():
        raise SystemExit(f"--triton {release}: expected Triton {release} installed in {folder} "
                         f"(make tritons TRITONS={release}), found none")
    path = [str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(entry for entry in path if entry),
                       **{RELEASE_VARIABLE: release})
    return subprocess.run([sys.executable, __file__, *argv], env=environment).returncode


def candidates(small: bool) -> tuple[list[SkinnyTiles], list[Tiles]]:
    """The few-rows and head-block tiles to compile: all of the GPU benchmark's, or the default ones and one
    row-by-row tile."""
    if small:
        return [SkinnyTiles()], [Tiles(), next(tile for tile in TILE_CANDIDATES if tile.rows_product)]
    return SKINNY_CANDIDATES, TILE_CANDIDATES


def products(model, skinny_tiles: list[SkinnyTiles], dtype: torch.dtype, generator) -> None:
    """One decoder layer's four products at 1 and 2 rows, in ``dtype`` and int8, with every tile."""
    for name, (outer, inner) in layer_products(model).items():
        weight = (torch.randn(outer, inner, generator=generator) * 0.02).to(dtype)
        quantized = quantize_int8(weight)
        for rows in (1, 2):
            x = torch.randn(rows, inner, generator=generator).to(dtype)
            for tile in skinny_tiles:
                set_skinny_tiles(tile)
                skinny_linear_triton(x, weight, None)
                skinny_linear_triton(x, quantized.values, None, quantized.scale)
    set_skinny_tiles(SkinnyTiles())


def decode_steps(model, dtype: torch.dtype, generator) -> list:
    """One decode step of 2 rows through the fused stack, with the library's products, the few-rows ones,
    and those launched dependently (the prefill runs before compiling starts; returns the steps to run
    inside it)."""
    backbone = model.backbone
    steps = []
    for skinny, dependent in ((False, False), (True, False), (True, True)):
        cache = backbone.new_cache(2, 8)
        _, next_positions = random_prefill(model, cache, 2, 4, generator)
        step_embeds = torch.zeros(2, 1, backbone.hidden_size, dtype=dtype)
        hidden = torch.zeros(2, backbone.hidden_size, dtype=dtype)
        step = DecodeStep(backbone, cache, step_embeds, hidden,
                          compile_stack=FusedDecodeStack(backbone, skinny=skinny, dependent_launches=dependent))
        step.start(next_positions)
        steps.append(step)
    return steps


def token_step(model, velocity, batch: int, generator) -> None:
    """One token step (Euler, 2 head steps, CFG) of ``batch`` images through ``velocity``."""
    loaded_token_step(model, velocity, batch, 2, 2, 7.5, torch.device("cpu"), generator).compute()


def run(args) -> dict:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    model = build_random_model(args.small, torch.device("cpu"), 0, torch.bfloat16, num_layers=1, vocab_size=1024)
    dtype = next(model.parameters()).dtype
    skinny_tiles, head_tiles = candidates(args.small)
    steps = decode_steps(model, dtype, generator)
    limits = TARGETS[args.arch]
    head = model.image_head
    widest = max(head.net.input_proj.out_features, head.net.res_blocks[0].mlp[0].out_features)
    programs = persistent_programs(widest, limits.multiprocessors)
    with torch.inference_mode(), compile_for_target(args.arch) as compiled:
        products(model, skinny_tiles, dtype, generator)
        for step in steps:
            step.compute(step.visible())
        for batch in (1, 8):
            token_step(model, FusedFlowMatchingVelocity(head), batch, generator)
            for tile in head_tiles:
                set_tiles(tile)
                token_step(model, FusedFlowMatchingVelocity(head, fused_blocks=True), batch, generator)
            set_tiles(Tiles())
            for polling in BARRIER_POLLING:
                token_step(model, FusedFlowMatchingVelocity(head, persistent=True, programs=programs,
                                                            barrier_polling=polling), batch, generator)
        for polling in BARRIER_POLLING:
            grid_barriers_triton(programs, 1, "cpu", polling=polling)
    kernels = [kernel.as_dict() for kernel in compiled]
    import triton

    return {"arch": args.arch, "card": limits.card, "machine": machine(), "triton": triton.__version__,
            "dependent_launches": dependent_launch_available(), "small": args.small, "kernels": kernels,
            "failed": sum(kernel["error"] is not None for kernel in kernels),
            "seconds": time.perf_counter() - started}


def _constants(constants: dict) -> str:
    return " ".join(f"{key}={int(value) if isinstance(value, bool) else value}" for key, value in constants.items())


def markdown(result: dict) -> str:
    lines = [f"Kernels compiled for {result['arch']} ({result['card']}) by Triton {result['triton']} on "
             f"{result['machine']['cpu']}, {result['machine']['date']}; `python benchmarks/kernel_resources.py`.", "",
             "| kernel | constants | warps | registers | spilled B | shared B | programs/SM | loop barriers | "
             "loop shared | loop loads | of them 128-bit | loop local |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kernel in result["kernels"]:
        if kernel["error"] is not None:
            lines.append(f"| {kernel['name']} | {_constants(kernel['constants'])} | {kernel['num_warps']} | "
                         f"failed: {kernel['error'][:120]} |||||||||")
            continue
        cells = [kernel[key] for key in ("num_warps", "registers", "local_bytes", "shared_bytes",
                                         "programs_per_multiprocessor", "loop_barriers", "loop_shared_accesses",
                                         "loop_global_loads", "loop_vector_loads", "loop_local_accesses")]
        lines.append(f"| {kernel['name']} | {_constants(kernel['constants'])} | "
                     + " | ".join("-" if cell is None else str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.triton and os.environ.get(RELEASE_VARIABLE) != args.triton:
        return run_with_release(args.triton, argv)
    result = run(args)
    if args.triton and result["triton"] != args.triton:
        raise SystemExit(f"--triton {args.triton}: expected Triton {args.triton} from {TRITONS / args.triton}, "
                         f"found {result['triton']} imported")
    name = f"kernel_resources_triton-{args.triton}" if args.triton else "kernel_resources"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    atomic_write_text(args.out / f"{name}.md", table)
    print(table)
    print(f"{len(result['kernels'])} kernels, {result['failed']} failed to compile, {result['seconds']:.0f} s")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
