"""Per-token latency of the NextStep-1-Large shapes on one GPU, against memory-bandwidth floors.

NextStep-1-Large shapes (Qwen2.5-14B backbone, base flow head 12 x 1536, FLUX
VAE) with random bf16 weights: nothing is downloaded. Generation runs through
`nextstep.fast.FastTokenSampler` (one CUDA graph per token step, one per decode
step and visible-slot bucket, fused Triton kernels where Triton is installed)
with two-way CFG and the Euler sampler, for 256 and 1024 image tokens
(256x256 and 512x512 images), batch 1 and 8, 20 and 50 head steps.

Measured first: one decoder layer's matrix products alone at one row, with the
library's kernel and with `nextstep.kernels.skinny_linear` at a few tiles
(the fastest are kept, then also timed on int8 weights), each captured call
rotating through enough copies of the weight that together they are over
twice the card's L2, so that every product reads its weight from memory
(``weight_copies``); then the backbone's captured decode step for one row
(batch 1, no CFG) at the mean context of each image size, against its floor,
with the backbone's own stack and with the fused one
(`nextstep.fast.fused_decode`), with either kind of product, and through int8
copies of the weights (its floor counts the int8 bytes); and the int8 stack
at the rows of the targets' image (its CFG rows, ``int8_image_decode``), which
that image's estimate uses.
Then per configuration (decode steps with the fastest stack of the model's own
weights at one row; the dependently launched stack is among them where Triton
can launch so):

- backbone ms/token: replays of the captured decode step at the image's mean
  context (prompt + half the image), all CFG rows together;
- head ms/token: replays of the captured token step (out-projector, every head
  step with its CFG combine and solver update, in-projector), with the AdaLN
  blocks as cuBLAS products around fused norms and, where Triton runs, as the
  fused block kernels (``fused_blocks``) with the fastest of a few tiles
  (`nextstep.kernels.adaln_linear.Tiles`, tried first at batch 1); full images
  use the faster of the two;
- the floors: bytes of weights each part must read per token divided by the
  card's measured copy bandwidth, or the arithmetic (two flops per multiplied
  parameter and row) divided by the measured bf16 matmul rate if that is
  larger; for the backbone also the floor with the KV cache's bytes read as
  well (``*_with_kv_ms``, ``*_ratio_with_kv``), and the bytes behind both;
- image seconds: one full generation (prefill, every token, VAE decode) for the
  configurations the time budget allows, and an estimate from the parts for all
  (the targets' configuration is timed first, and the others, and the eager
  path, only while the budget left affords the targets' images besides);
  first the targets' configuration (batch 1, 1024 tokens, 20 steps), then the
  same image decoding through int8 copies of the weights (``int8_images``), each
  timed after an untimed generation of the same sizes through the same sampler
  (``image_cold_seconds``), so that neither includes one-time setup (the pooled
  cache of its capacity and its decode graphs, the int8 copies); the other
  configurations' images include the setup they do not share with the images
  before them.

For batch 1 and 20 steps it also times the eager path (the backbone's
``forward`` and the samplers' own code, no graphs) on a few tokens.

Before the decode stacks and the head variants are timed, with the tiles chosen
for them, their outputs are checked against the eager reference at the timed
shapes (``checks``: max abs and relative error, tolerance, verdict): one decode
step of each fused stack against the backbone's own stack at the timed rows
and the targets' context (on a model of the same shapes with two decoder
layers; the int8 stack with a tolerance of its own), and one token step of each
head variant against the head's guided velocity and the sampler's own code. A
variant out of its tolerance is an error and is not timed.

Writes ``gpu_latency.json`` and ``gpu_latency.md`` (the table for
``docs/performance.md``) to ``--out``, with the kernels that failed to build
or launch and ran as their references from then on (``kernel_fallbacks``).
Exits 1 when there were errors (checks out of tolerance among them) or kernel
fallbacks, and without CUDA (after saying so) unless ``--dry-run``, which runs
every part with tiny shapes on the CPU (graphs off) so the script is known to
work before it meets a GPU.

With ``--persistent-head`` it times only the head, one launch per evaluation
(`nextstep.kernels.persistent_head`) against the norm kernels, and the
grid-wide barrier alone (what the evaluations' barriers cost of the one-launch
time: ``barriers_ms``, ``barrier_share``), each variant after its token step
is checked as above, then one image of the targets'
configuration with the one-launch head, decoding through int8 copies of the
weights (``one_launch_images``; the few-rows tiles the main run chose, read from
its ``gpu_latency.json`` in ``--out``), timed after an untimed generation of the
same sizes (the process's first prefill and VAE decode among its setup), and
writes ``gpu_latency_persistent.json``.

Usage:
    python benchmarks/gpu_latency.py --out DIR                 # the GPU run, about 3-5 minutes on an H100/H200
    python benchmarks/gpu_latency.py --dry-run --out DIR       # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone_decode import copy_bandwidth  # noqa: E402
from common import machine  # noqa: E402

from nextstep.backbones.base import positions_from_mask  # noqa: E402
from nextstep.fast import CapturedCall, DecodeStep, FastTokenSampler, FusedTokenStep, TokenStepBuffers  # noqa: E402
from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity  # noqa: E402
from nextstep.fast.fused_decode import FusedDecodeStack  # noqa: E402
from nextstep.fast.guidance_weights import branch_weights  # noqa: E402
from nextstep.fast.solver_plan import solver_plan  # noqa: E402
from nextstep.fast.weight_quantization import quantize_int8  # noqa: E402
from nextstep.io import atomic_write_text  # noqa: E402
from nextstep.kernels.adaln_linear import Tiles, set_tiles, tiles  # noqa: E402
from nextstep.kernels.persistent_head import (  # noqa: E402
    BARRIER_POLLING,
    barriers_per_evaluation,
    grid_barriers_triton,
)
from nextstep.kernels.skinny_linear import (  # noqa: E402
    SkinnyTiles,
    set_skinny_tiles,
    skinny_linear_triton,
    skinny_tiles,
)
from nextstep.kernels.triton_support import (  # noqa: E402
    FAILED_KERNELS,
    dependent_launch_available,
    triton_enabled,
)
from nextstep.samplers import EulerSampler, guidance_for_scale  # noqa: E402
from nextstep.samplers.guidance import GuidedVelocity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Tiles of the few-rows product kernel tried on one layer's products (the default first).
SKINNY_CANDIDATES = [SkinnyTiles(), SkinnyTiles(4, 512, 4, 1), SkinnyTiles(16, 256, 4, 1), SkinnyTiles(8, 1024, 8, 1),
                     SkinnyTiles(8, 512, 4, 3), SkinnyTiles(16, 512, 8, 2), SkinnyTiles(4, 1024, 4, 1),
                     SkinnyTiles(2, 1024, 2, 1)]
#: File stem of the --persistent-head results.
PERSISTENT_STEM = "gpu_latency_persistent"
#: Products per captured call when timing one product alone (launches amortised).
PRODUCTS_PER_CALL = 20
#: L2 size assumed where the card does not report its own (an H100's or H200's 50 MB).
L2_BYTES = 50 * 10**6
#: Most copies of one weight a captured call rotates through (`weight_copies`).
MAX_WEIGHT_COPIES = 16
#: Tiles of the head's block kernels tried at batch 1 (the default first).
TILE_CANDIDATES = [Tiles(), Tiles(16, 256, 4), Tiles(16, 512, 8), Tiles(32, 128, 4), Tiles(32, 256, 8),
                   Tiles(16, 64, 2), Tiles(8, 512, 4, True), Tiles(4, 512, 4, True), Tiles(16, 256, 4, True),
                   Tiles(2, 1024, 2, True), Tiles(8, 1024, 8, True)]
#: The decode stacks timed at one row: name -> `FusedDecodeStack` options (None: the backbone's own stack).
#: The configurations and full images decode with the fastest of the model's own weights (not int8).
DECODE_STACKS = {"backbone": None, "fused": {}, "fused, few-rows products": {"skinny": True},
                 "fused, few-rows products, dependent launches": {"skinny": True, "dependent_launches": True},
                 "fused, int8 weights": {"int8_weights": True}}
#: The stack of `DECODE_STACKS` that decodes through int8 copies of the weights.
INT8_STACK = "fused, int8 weights"
#: Backbone ms per token assumed for a full image's time estimate when the decode step was not timed (the
#: H200's own-weights decode step measured 10-11 ms).
UNTIMED_BACKBONE_MS = 12.0
#: Seconds of the budget kept for the targets' images before their configuration is timed (the H200's
#: 512x512 image through the model's own weights took 17 s; with its warm-up and the int8 image, about 90 s).
DEFAULT_TARGET_RESERVE_SECONDS = 90.0
#: Seconds the eager path's timing needs besides the targets' reserve (the H200: about 1 s per token).
EAGER_SECONDS = 10.0
#: The paper's per-token figures on an H100 at batch 1 (ms), for reference.
PAPER_MS = {"backbone": 7.20, "head": 3.40}
#: Largest error allowed of a checked output against its eager reference, as a share of the reference's largest
#: magnitude (``max_rel_error``), by the dtype the check ran in: rounding differences only (a wrong tile or mask
#: gives errors of the order of the output itself).
CHECK_TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
#: The same for the decode stack through int8 copies of the weights, whatever the dtype: rounded weights.
INT8_CHECK_TOLERANCE = 0.15
#: Decoder layers of the model the decode stacks are checked on (`check_model`).
CHECK_LAYERS = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for gpu_latency.json / .md")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, graphs off")
    parser.add_argument("--tokens", default=None, type=_ints, help="image tokens per image (default 256,1024)")
    parser.add_argument("--batch-sizes", default=None, type=_ints, help="images per generation (default 1,8)")
    parser.add_argument("--steps", default=None, type=_ints, help="head steps per token (default 20,50)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (random embeddings)")
    parser.add_argument("--repeats", type=int, default=10, help="graph replays per component timing")
    parser.add_argument("--budget-seconds", type=float, default=420.0,
                        help="full-image runs stop when they would end later than this after start")
    parser.add_argument("--compile-backbone", action="store_true",
                        help="torch.compile the decoder stack inside the decode graphs, in place of the fused "
                             "stack (adds minutes; implies --no-fused-decode)")
    parser.add_argument("--no-fused-decode", dest="fused_decode", action="store_false",
                        help="decode with the backbone's own stack only (default: the fused stack, and both "
                             "for the one-row rows)")
    parser.add_argument("--persistent-head", action="store_true",
                        help="time only the head, one launch per evaluation against the norm kernels; writes "
                             "gpu_latency_persistent.json (run it apart: its programs wait for each other, and "
                             "wait forever if the GPU cannot run them all at once)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = [16] if args.dry_run else [256, 1024]
    if args.batch_sizes is None:
        args.batch_sizes = [1, 2] if args.dry_run else [1, 8]
    if args.steps is None:
        args.steps = [2, 3] if args.dry_run else [20, 50]
    for value in args.tokens:
        if math.isqrt(value) ** 2 != value:
            parser.error(f"--tokens values must be square (a square image), found {value}")
    if args.dry_run:
        args.repeats = min(args.repeats, 2)
    if args.compile_backbone:
        args.fused_decode = False  # the compiled stack replaces the fused one
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def sampler_options(stack: dict | None) -> dict:
    """The `FastTokenSampler` options that decode with the stack of `DECODE_STACKS` options ``stack``."""
    if stack is None:
        return {}
    weights = "int8" if stack.get("int8_weights") else "skinny" if stack.get("skinny") else "native"
    return {"fused_decode": True, "decode_weights": weights,
            "dependent_launches": stack.get("dependent_launches", False)}


def _tiles_text(tiles: dict | None) -> str:
    """Tile fields joined by slashes ("-" for the library's kernel)."""
    return "-" if tiles is None else "/".join(str(value) for value in tiles.values())


def _product_line(entry: dict) -> str:
    return (f"product {entry['product']} ({entry['outer']} x {entry['inner']}), {entry['kind']} "
            f"{_tiles_text(entry['tiles'])}: {entry['ms'] * 1e3:.1f} us, {entry['bytes_per_s'] / 1e12:.2f} TB/s")


# ---------------------------------------------------------------------- model
def build_random_model(dry_run: bool, device: torch.device, seed: int, dtype: torch.dtype | None = None,
                       **backbone_changes):
    """NextStep-1-Large shapes (or the tiny preset) with random weights, built directly on ``device`` in
    ``dtype`` (default bf16, fp32 for the tiny preset); ``backbone_changes`` replace fields of the backbone's
    config (``num_layers=1``)."""
    from dataclasses import replace

    from nextstep import build_model
    from nextstep.config import ComponentSpec
    from nextstep.presets import nextstep_1_large, tiny

    config = tiny() if dry_run else nextstep_1_large()
    if backbone_changes:
        spec = config.backbone
        config = replace(config, backbone=ComponentSpec(spec.kind, spec.type, replace(spec.config,
                                                                                      **backbone_changes)))
    if dtype is None:
        dtype = torch.float32 if dry_run else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(config, with_text_tokenizer=False)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and ("norm" in name or "_ln" in name):
                parameter.fill_(1.0)
            elif parameter.ndim == 1:
                parameter.zero_()
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def backbone_weight_bytes(model) -> int:
    """Decoder weights read per decode step (the embedding table is only indexed)."""
    return sum(nbytes(p) for name, p in model.backbone.named_parameters() if not name.startswith("embed_tokens"))


def backbone_matmul_parameters(model) -> int:
    """Parameters a decode step multiplies per token and row: the decoder's matrices (the embedding table is
    only indexed, the norms' and biases' vectors are not multiplied)."""
    return sum(p.numel() for name, p in model.backbone.named_parameters()
               if p.ndim == 2 and not name.startswith("embed_tokens"))


def int8_weight_bytes(stack) -> int:
    """Weights a decode step of an int8 `FusedDecodeStack` reads: the int8 products plus the norms."""
    products = sum(value.nbytes for layer in stack.products for product in layer.values()
                   for value in product if value is not None)
    norms = sum(nbytes(p) for name, p in stack.backbone.named_parameters() if "norm" in name)
    return products + norms


def kv_bytes(model, rows: int, context: int) -> int:
    """Keys and values of ``context`` slots for ``rows`` rows, all layers."""
    config = model.backbone.config
    element = next(model.backbone.parameters()).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.resolved_head_dim * context * rows * element


def head_weights(model) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The token step's weights: read once per token, once per token for the modulation table
    (one row per evaluation), and once per head evaluation."""
    net = model.image_head.net
    once = [model.image_out_projector.weight, model.image_out_projector.bias, net.cond_embed.weight,
            net.cond_embed.bias, model.image_in_projector.weight, model.image_in_projector.bias]
    modulation = [p for block in net.res_blocks for p in block.adaLN_modulation[1].parameters()]
    modulation += list(net.final_layer.adaLN_modulation[1].parameters())
    per_evaluation = [net.input_proj.weight, net.input_proj.bias, net.final_layer.linear.weight,
                      net.final_layer.linear.bias]
    per_evaluation += [p for block in net.res_blocks for p in block.mlp.parameters()]
    return once, modulation, per_evaluation


def head_bytes(model, evaluations: int) -> int:
    """Bytes of weights one token step must read."""
    once, modulation, per_evaluation = head_weights(model)
    return nbytes(*once, *modulation) + evaluations * nbytes(*per_evaluation)


def head_flops(model, rows: int, evaluations: int) -> float:
    """Multiply-adds x 2 of one token step's matrix products, for ``rows`` backbone rows."""
    once, modulation, per_evaluation = head_weights(model)

    def matrices(tensors):
        return sum(t.numel() for t in tensors if t.ndim == 2)

    return 2.0 * rows * (matrices(once) + evaluations * (matrices(modulation) + matrices(per_evaluation)))


def floor_ms(read_bytes: float, flops: float, card: dict) -> float:
    """The least time of a step that reads ``read_bytes`` and does ``flops``: the larger of the two over
    the card's measured copy bandwidth and matmul rate (ms)."""
    return max(read_bytes / card["copy_bandwidth_bytes_per_s"], flops / card["matmul_flops_per_s"]) * 1e3


def head_floor_ms(model, rows: int, evaluations: int, card: dict) -> float:
    """`floor_ms` of one token step of the head with ``evaluations`` solver evaluations of ``rows`` rows."""
    return floor_ms(head_bytes(model, evaluations), head_flops(model, rows, evaluations), card)


def backbone_floors(weight_bytes: int, kv: int, flops: float, card: dict) -> dict:
    """The backbone's floors for a decode step that reads ``weight_bytes`` of weights and ``kv`` bytes of keys and
    values and does ``flops``: ``floor_ms`` of the weights alone (the floor the targets are set against) and
    ``floor_with_kv_ms`` of both."""
    return {"floor_ms": floor_ms(weight_bytes, flops, card),
            "floor_with_kv_ms": floor_ms(weight_bytes + kv, flops, card)}


# ---------------------------------------------------------------------- checks
def compared(found: torch.Tensor, expected: torch.Tensor) -> dict:
    """``max_abs_error`` of ``found`` against ``expected`` and ``max_rel_error``: that over the largest magnitude of
    ``expected`` (infinite where ``expected`` is all zeros, which would compare nothing)."""
    found, expected = found.float(), expected.float()
    if found.shape != expected.shape:
        raise ValueError(f"expected an output of shape {tuple(expected.shape)}, found {tuple(found.shape)}")
    error = (found - expected).abs().max().item()
    scale = expected.abs().max().item()
    relative = error / scale if scale > 0 else math.inf
    return {"max_abs_error": error, "max_rel_error": relative}


def check_verdict(check: dict, tolerance: float) -> dict:
    """``check`` with its ``tolerance`` and ``passed`` (a non-finite error fails)."""
    passed = math.isfinite(check["max_rel_error"]) and check["max_rel_error"] <= tolerance
    return {**check, "tolerance": tolerance, "passed": passed}


def check_decode_stacks(model, options: dict[str, dict], rows: int, context: int, generator) -> dict[str, dict]:
    """One decode step of `FusedDecodeStack` with each of ``options`` (stack name -> its options) against the
    backbone's own eager stack, both over the same cache (``context`` random prompt slots of ``rows`` rows, its
    capacity rounded up to a visible-slot bucket, as the timed steps attend) and input: each stack's `compared`
    result with its tolerance (`CHECK_TOLERANCES`, `INT8_CHECK_TOLERANCE`) and verdict.

    ``model`` is `check_model`'s: the benchmarked layer shapes, two layers deep (random weights amplify rounding
    differences with depth, so a tolerance at the output of every layer would have to admit errors as large as
    those of a faulty kernel)."""
    device = next(model.backbone.parameters()).device
    capacity = -(-(context + 1) // 256) * 256
    cache = model.backbone.new_cache(rows, capacity)
    _, next_positions = random_prefill(model, cache, rows, context, generator)
    embeds = (torch.randn(rows, 1, model.backbone.hidden_size, device=device, generator=generator)
              * 0.02).to(cache.dtype)
    every_row = torch.arange(rows, device=device)

    def one_step(stack) -> torch.Tensor:
        copy = cache.select_rows(every_row)
        hidden = torch.zeros(rows, model.backbone.hidden_size, device=device, dtype=cache.dtype)
        step = DecodeStep(model.backbone, copy, embeds.clone(), hidden, compile_stack=stack)
        step.start(next_positions)
        with torch.inference_mode():
            step.compute(step.visible())
        return hidden

    expected = one_step(None)
    checks = {}
    for name, stack_options in options.items():
        int8 = bool(stack_options.get("int8_weights"))
        tolerance = INT8_CHECK_TOLERANCE if int8 else CHECK_TOLERANCES.get(cache.dtype, 5e-2)
        found = one_step(FusedDecodeStack(model.backbone, **stack_options))
        checks[name] = check_verdict({"part": "decode step", "variant": name, "rows": rows, "context": context,
                                      "layers": model.backbone.config.num_layers, **compared(found, expected)},
                                     tolerance)
    return checks


def check_model(dry_run: bool, device: torch.device, seed: int):
    """The model of the decode stacks' checks: `build_random_model`'s shapes with two decoder layers."""
    return build_random_model(dry_run, device, seed, num_layers=CHECK_LAYERS)


def check_token_step(model, velocity: FusedFlowMatchingVelocity, rows: int, branches: int, steps: int, cfg: float,
                     device: torch.device, generator, variant: str) -> dict:
    """One token step through ``velocity`` (`FusedTokenStep`, as timed) against the eager path (the head's
    guided velocity and the sampler's own code) on the same hidden states and noise: `compared` and the
    verdict against `CHECK_TOLERANCES`."""
    step = loaded_token_step(model, velocity, rows, branches, steps, cfg, device, generator)
    sampler = EulerSampler()
    grid = sampler.make_time_grid(steps, 1.0, device=device)
    with torch.inference_mode():
        step.compute()
        conditions = model.image_out_projector(step.buffers.hidden).view(branches, rows, -1)
        times = model.image_head.prepare_times(sampler.evaluation_times(grid))
        guided = GuidedVelocity(model.image_head, conditions, guidance_for_scale(cfg), times=times)
        expected = sampler.sample(guided, step.noise.clone(), grid)
    check = {"part": "token step", "variant": variant, "batch": rows, "steps": steps,
             **compared(step.buffers.token, expected)}
    return check_verdict(check, CHECK_TOLERANCES.get(velocity.dtype, 5e-2))


def check_text(check: dict) -> str:
    """One line of a check: what, where, its errors and verdict."""
    if check["part"] == "decode step":
        where = f"{check['variant']} stack, {check['rows']} rows, context {check['context']}"
    else:
        where = f"{check['variant']}, batch {check['batch']}, {check['steps']} head steps"
    verdict = "within" if check["passed"] else "over"
    return (f"{check['part']} ({where}) against the eager reference: max abs error {check['max_abs_error']:.3g}, "
            f"max relative error {check['max_rel_error']:.3g}, {verdict} the tolerance {check['tolerance']:g}")


# ---------------------------------------------------------------------- timing
class Clock:
    """Wall time of a block: CUDA events on a GPU, perf_counter on the CPU (milliseconds)."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextmanager
    def measure(self, into: list):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize(self.device)
            into.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            yield
            into.append((time.perf_counter() - begin) * 1e3)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed_replays(call: CapturedCall, clock: Clock, repeats: int, capture: bool, *, snapshot=None,
                  after=None) -> list[float]:
    """Capture ``call`` (with ``capture``), run it once untimed, then ``repeats`` timed runs: their ms.

    ``snapshot`` is passed to the capture; ``after()``, if given, follows every run.
    """
    if capture:
        call.capture(clock.device, snapshot=snapshot)
    times: list[float] = []
    for index in range(repeats + 1):
        if index:
            with clock.measure(times):
                call()
        else:
            call()
        if after is not None:
            after()
    return times


def card_numbers(device: torch.device, dry_run: bool) -> dict:
    """Name, memory, measured copy bandwidth and bf16 (fp32 on the CPU) matmul rate."""
    clock = Clock(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        bandwidth = copy_bandwidth(device)
        name, memory = properties.name, properties.total_memory
        l2 = getattr(properties, "L2_cache_size", 0) or L2_BYTES
    else:
        source = torch.empty(1 << 22)
        target = torch.empty_like(source)
        times = []
        for _ in range(5):
            with clock.measure(times):
                target.copy_(source)
        bandwidth = 2 * nbytes(source) / (min(times) / 1e3)
        name, memory, l2 = "cpu", None, L2_BYTES
    size = 512 if dry_run else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(3 if dry_run else 10):
        with clock.measure(times):
            a @ b
    rate = 2 * size**3 / (statistics.median(times) / 1e3)
    del a, b
    return {"name": name, "memory_bytes": memory, "copy_bandwidth_bytes_per_s": bandwidth,
            "matmul_flops_per_s": rate, "matmul_dtype": str(dtype).replace("torch.", ""), "l2_bytes": l2}


# ---------------------------------------------------------------------- generation pieces
def random_prefill(model, cache, rows: int, length: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``length`` random embeddings into ``cache``: last hidden (rows, H), next positions (rows, 1)."""
    device = cache.keys.device
    embeds = torch.randn(rows, length, model.backbone.hidden_size, device=device, generator=generator)
    embeds = (embeds * 0.02).to(cache.dtype)
    mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    positions = positions_from_mask(mask)
    with torch.inference_mode():
        hidden = model.backbone(embeds, positions, mask, cache)[:, -1]
    return hidden.clone(), positions[:, -1:] + 1


def time_decode(model, fast, clock, rows: int, context: int, repeats: int, capture: bool, generator,
                stack=None) -> dict:
    """Captured decode steps at ``context`` filled slots: median ms per step (all rows).

    ``stack``: the decoder stack the step runs (`FusedDecodeStack`), or None for the backbone's own.
    """
    cache = fast.new_cache(rows, context + repeats + 2)
    hidden, next_positions = random_prefill(model, cache, rows, context, generator)
    buffers_hidden = torch.zeros_like(hidden)
    embeds = (torch.randn(rows, 1, model.backbone.hidden_size, device=hidden.device, generator=generator)
              * 0.02).to(hidden.dtype)
    step = DecodeStep(model.backbone, cache, embeds, buffers_hidden, compile_stack=stack)
    step.start(next_positions)
    visible = -(-(context + repeats + 1) // 256) * 256
    visible = min(visible, cache.max_length)
    call = CapturedCall(lambda: step.compute(visible), name="decode step")
    with torch.inference_mode():
        times = timed_replays(call, clock, repeats, capture, snapshot=step.snapshot, after=step.advance)
    return {"ms": statistics.median(times), "captured": call.captured, "visible_slots": visible,
            "failure": call.failure}


def layer_products(model) -> dict[str, tuple[int, int]]:
    """(N, K) of each matrix product of one decoder layer, as the fused stack runs them."""
    config = model.backbone.config
    hidden, width, head_dim = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    return {"qkv": ((config.num_heads + 2 * config.num_kv_heads) * head_dim, hidden),
            "o": (hidden, config.num_heads * head_dim), "gate_up": (2 * width, hidden), "down": (hidden, width)}


def weight_copies(weight_bytes: int, l2_bytes: int, per_call: int) -> int:
    """Copies of a weight of ``weight_bytes`` that a call of ``per_call`` products rotates through so that
    together they hold over twice ``l2_bytes`` (each product then reads its copy from memory, not from L2),
    at most `MAX_WEIGHT_COPIES` and ``per_call``."""
    return max(1, min(MAX_WEIGHT_COPIES, per_call, math.ceil(2 * l2_bytes / weight_bytes)))


def time_products(clock, shapes: dict[str, tuple[int, int]], rows: int, dtype, repeats: int, capture: bool,
                  candidates: list[SkinnyTiles], generator, errors: list, per_call: int = PRODUCTS_PER_CALL,
                  int8: bool = False, l2_bytes: int = L2_BYTES) -> list[dict]:
    """Each product alone, ``per_call`` times per captured call: the library's and the few-rows kernel
    with each of ``candidates`` (ms per product and the weight's bytes over that time); with ``int8``,
    the few-rows kernel alone on int8 copies of the weights. Each call rotates through `weight_copies`
    copies of the weight (``weight_copies`` of each result), so that L2 (``l2_bytes``) cannot serve a
    product's weight from the product before."""
    device = clock.device
    results = []
    for name, (outer, inner) in shapes.items():
        element = torch.empty((), dtype=torch.int8 if int8 else dtype).element_size()
        count = weight_copies(outer * inner * element, l2_bytes, per_call)
        weights = [(torch.randn(outer, inner, device=device, generator=generator) * 0.02).to(dtype)
                   for _ in range(count)]
        x = torch.randn(rows, inner, device=device, generator=generator).to(dtype)
        if int8:
            quantized = [quantize_int8(weight) for weight in weights]
            weights = [q.values for q in quantized]
            products = [lambda x=x, q=q: skinny_linear_triton(x, q.values, None, q.scale) for q in quantized]
            variants = [("skinny int8", tile, products) for tile in candidates]
        else:
            variants = [("library", None, [lambda x=x, weight=weight: F.linear(x, weight) for weight in weights])]
            skinny = [lambda x=x, weight=weight: skinny_linear_triton(x, weight, None) for weight in weights]
            variants += [("skinny", tile, skinny) for tile in candidates]
        for kind, tile, products in variants:
            if tile is not None:
                set_skinny_tiles(tile)

            def many(products=products):
                for index in range(per_call):
                    products[index % len(products)]()

            call = CapturedCall(many, name=f"{name} product")
            try:
                with torch.inference_mode():
                    times = timed_replays(call, clock, repeats, capture)
            except Exception as error:
                errors.append(_error(f"{name} product ({kind} {tile})", error))
                continue
            ms = statistics.median(times) / per_call
            results.append({"product": name, "rows": rows, "outer": outer, "inner": inner, "kind": kind,
                            "tiles": None if tile is None else asdict(tile), "ms": ms,
                            "bytes_per_s": nbytes(weights[0]) / (ms / 1e3), "weight_copies": count,
                            "captured": call.captured})
    return results


def loaded_token_step(model, velocity: FusedFlowMatchingVelocity, rows: int, branches: int, steps: int, cfg: float,
                      device: torch.device, generator) -> FusedTokenStep:
    """A token step (Euler, CFG at ``cfg``) of ``rows`` images through ``velocity``, loaded with random
    hidden states and noise."""
    sampler = EulerSampler()
    plan = solver_plan(sampler, sampler.make_time_grid(steps, 1.0, device=device))
    buffers = TokenStepBuffers.allocate(rows, branches, model.backbone.hidden_size, model.token_dim,
                                        device=device, dtype=next(model.parameters()).dtype)
    buffers.hidden.normal_(generator=generator)
    step = FusedTokenStep(model, velocity, plan, rows=rows, branches=branches, buffers=buffers, use_norm=False)
    noise = torch.randn(rows, model.token_dim, device=device, generator=generator)
    with torch.inference_mode():
        step.load(noise, None, branch_weights(guidance_for_scale(cfg), plan.times).to(device))
    return step


def time_token_step(model, clock, rows: int, branches: int, steps: int, cfg: float, repeats: int, capture: bool,
                    velocity: FusedFlowMatchingVelocity, generator) -> dict:
    """Captured token steps (Euler, CFG): median ms per token (all rows)."""
    step = loaded_token_step(model, velocity, rows, branches, steps, cfg, clock.device, generator)
    call = CapturedCall(step.compute, name="token step")
    with torch.inference_mode():
        times = timed_replays(call, clock, repeats, capture)
    return {"ms": statistics.median(times), "captured": call.captured, "failure": call.failure,
            "evaluations": len(step.stages)}


def time_eager(model, clock, rows: int, branches: int, steps: int, cfg: float, context: int, count: int,
               generator) -> dict:
    """The eager path on ``count`` tokens: backbone ``forward`` and the sampler's own code (ms per token)."""
    backbone_rows = rows * branches
    cache = model.backbone.new_cache(backbone_rows, context + count + 2)
    hidden, next_positions = random_prefill(model, cache, backbone_rows, context, generator)
    sampler, guidance = EulerSampler(), guidance_for_scale(cfg)
    device = clock.device
    grid = sampler.make_time_grid(steps, 1.0, device=device)
    times = model.image_head.prepare_times(sampler.evaluation_times(grid))
    noise = torch.randn(rows, model.token_dim, device=device, generator=generator)
    mask = torch.ones(backbone_rows, 1, dtype=torch.bool, device=device)
    head_times, backbone_times = [], []
    with torch.inference_mode():
        for index in range(count + 1):
            head_list = head_times if index else []
            with clock.measure(head_list):
                conditions = model.image_out_projector(hidden).view(branches, rows, -1)
                velocity = GuidedVelocity(model.image_head, conditions, guidance, times=times)
                token = sampler.sample(velocity, noise, grid)
                embeds = torch.cat([model.image_in_projector(token.to(hidden.dtype))] * branches)[:, None]
            backbone_list = backbone_times if index else []
            with clock.measure(backbone_list):
                hidden = model.backbone(embeds, next_positions, mask, cache)[:, 0]
            next_positions = next_positions + 1
    return {"backbone_ms": statistics.median(backbone_times), "head_ms": statistics.median(head_times),
            "tokens": count}


def full_image(model, fast, clock, rows: int, branches: int, tokens: int, steps: int, cfg: float,
               prompt_tokens: int, generator, *, warm_up: bool = False) -> dict:
    """One generation end to end: prefill, every token, VAE decode (seconds, and the parts).

    With ``warm_up``, an untimed generation of the same sizes through the same sampler ``fast`` comes first
    (its seconds: ``cold_seconds``), so that the timed one finds done what is done once: the pooled cache of
    that capacity, the decode steps' and the token step's graphs, a fused stack's packed or int8 weights, and
    a process's first prefill and VAE decode.
    """
    cold = _generation(model, fast, clock, rows, branches, tokens, steps, cfg, prompt_tokens,
                       generator)["seconds"] if warm_up else None
    image = _generation(model, fast, clock, rows, branches, tokens, steps, cfg, prompt_tokens, generator)
    if cold is not None:
        image["cold_seconds"] = cold
    return image


def _generation(model, fast, clock, rows: int, branches: int, tokens: int, steps: int, cfg: float,
                prompt_tokens: int, generator) -> dict:
    """`full_image` without the warm-up."""
    device = clock.device
    side = math.isqrt(tokens)
    backbone_rows = rows * branches
    noise = torch.randn(rows, tokens, model.token_dim, device=device, generator=generator)
    prompt = (torch.randn(backbone_rows, prompt_tokens, model.backbone.hidden_size, device=device,
                          generator=generator) * 0.02).to(next(model.parameters()).dtype)
    mask = torch.ones(backbone_rows, prompt_tokens, dtype=torch.bool, device=device)
    positions = positions_from_mask(mask)
    parts = {"prefill": [], "tokens": [], "decode": []}
    clock.sync()
    begin = time.perf_counter()
    with clock.measure(parts["prefill"]):
        cache = fast.new_cache(backbone_rows, prompt_tokens + tokens)
        with torch.inference_mode():
            hidden = model.backbone(prompt, positions, mask, cache)[:, -1]
    with clock.measure(parts["tokens"]):
        sampled = fast.sample_tokens(hidden, cache, positions[:, -1:] + 1, noise, guidance=guidance_for_scale(cfg),
                                     sampler=EulerSampler(), num_steps=steps)
    with clock.measure(parts["decode"]):
        with torch.inference_mode():
            tokenizer = model.image_tokenizer
            latents = tokenizer.unpatchify(sampled.to(next(tokenizer.parameters()).dtype), side, side)
            images = tokenizer.decode(latents)
    clock.sync()
    seconds = time.perf_counter() - begin
    return {"seconds": seconds, "prefill_ms": parts["prefill"][0], "tokens_ms": parts["tokens"][0],
            "vae_decode_ms": parts["decode"][0], "image_shape": list(images.shape)}



#: The fields that name a configuration or an image.
IMAGE_KEY = ("batch", "tokens", "steps")


def image_key(entry: dict) -> tuple[int, int, int]:
    """(batch, tokens, steps) of a configuration or an image."""
    return tuple(entry[name] for name in IMAGE_KEY)


def target_key(args) -> tuple[int, int, int]:
    """The configuration of the targets: batch 1, the most tokens (a 512x512 image), the fewest head steps."""
    return 1, max(args.tokens), min(args.steps)


def image_fields(image: dict) -> dict:
    """A `full_image` result as the fields of a configuration."""
    fields = {"image_seconds": image["seconds"], "image_prefill_ms": image["prefill_ms"],
              "image_tokens_ms": image["tokens_ms"], "image_vae_decode_ms": image["vae_decode_ms"]}
    if "cold_seconds" in image:
        fields["image_cold_seconds"] = image["cold_seconds"]
    fields["image_seconds_per_image"] = image["seconds"] / image["image_shape"][0]
    return fields


def expected_image_seconds(estimated: float, warm_up: bool, setup: float) -> float:
    """What a budget must afford for an image estimated at ``estimated`` s: 1.3x that, twice with the
    warm-up generation, plus ``setup`` s."""
    return (2 if warm_up else 1) * 1.3 * estimated + setup


def target_reserve_seconds(result: dict, args, branches: int) -> float:
    """Seconds of the budget the targets' images need (`expected_image_seconds` of the image through the
    model's own weights, and of the same image through int8 weights where that stack was timed), from the
    timed targets' configuration in ``result``; `DEFAULT_TARGET_RESERVE_SECONDS` before it is timed."""
    timed = [row for row in result["rows"] if image_key(row) == target_key(args)]
    if not timed:
        return DEFAULT_TARGET_RESERVE_SECONDS
    row = timed[0]
    reserve = expected_image_seconds(row["estimated_image_seconds"], True, 3.0)
    head = row["head_ms"] if row["head_blocks_ms"] is None else min(row["head_ms"], row["head_blocks_ms"])
    int8 = int8_image_seconds(result, row, branches, head)
    return reserve if int8 is None else reserve + expected_image_seconds(int8, True, 3.0)


def int8_image_seconds(result: dict, row: dict, branches: int, head_ms: float) -> float | None:
    """The estimated seconds of ``row``'s image through int8 copies of the decode weights: its tokens times
    the int8 backbone's ms at the image's rows (`image_backbone_ms`) plus ``head_ms``; None where no int8
    stack was timed."""
    backbone = image_backbone_ms(result, row["tokens"], row["batch"] * branches, int8=True)
    return None if backbone is None else row["tokens"] * (backbone + head_ms) / 1e3


def image_backbone_ms(found: dict, tokens: int, rows: int, int8: bool) -> float | None:
    """Backbone ms per token of an image of ``tokens`` tokens whose decode steps run ``rows`` rows (its CFG
    rows), through int8 copies of the weights or the model's own, from a main run's results ``found``.

    The int8 stack timed at those rows and that size (``int8_image_decode``) where it was; else the mean
    one-row time of the stacks of that kind (at that size where timed), times how the chosen stack's time
    grows from one row to ``rows`` (its configuration at that size and batch ``rows`` / CFG branches), or,
    without that configuration, how the one-row bytes read (weights, keys and values) grow with the keys and
    values of ``rows`` rows.
    None where no stack of that kind was timed.
    """
    measured = found.get("int8_image_decode") or {}
    if int8 and measured.get("tokens") == tokens and measured.get("rows") == rows:
        return measured["ms"]
    one_row = found.get("backbone_one_row", [])
    singles = [entry for entry in one_row if entry.get("int8", False) == int8]
    singles = [entry for entry in singles if entry.get("tokens") == tokens] or singles
    if not singles:
        return None
    ms = statistics.mean(entry["ms"] for entry in singles)
    if rows == 1:
        return ms
    branches = 2 if found.get("cfg", 1.0) != 1.0 else 1
    chosen = [entry for entry in one_row if entry.get("stack") == found.get("decode_stack_chosen")
              and entry.get("tokens") == tokens]
    configured = [row for row in found.get("rows", []) if row.get("tokens") == tokens
                  and row.get("batch", 0) * branches == rows]
    if chosen and configured:
        return ms * configured[0]["backbone_ms"] / chosen[0]["ms"]
    # The floors: the same weights, the keys and values of ``rows`` rows instead of one.
    single = singles[0]
    if single.get("weight_bytes") and "kv_bytes" in single:
        return ms * (single["weight_bytes"] + rows * single["kv_bytes"]) / (single["weight_bytes"] + single["kv_bytes"])
    # A main run from before the floors were split, whose floor_ms included the keys and values.
    bandwidth = found.get("card", {}).get("copy_bandwidth_bytes_per_s")
    if bandwidth and single.get("weight_bytes") and single.get("floor_ms"):
        read = single["floor_ms"] / 1e3 * bandwidth
        kv = max(read - single["weight_bytes"], 0.0)
        return ms * (single["weight_bytes"] + rows * kv) / read
    return ms


# ---------------------------------------------------------------------- the run
def checked_rows(args, branches: int) -> list[int]:
    """The backbone rows the decode stacks are timed at: one, the targets' image's, the largest batch's (with
    ``--dry-run`` the largest only, which keeps the interpreted kernels' run short)."""
    largest = max(args.batch_sizes) * branches
    return [largest] if args.dry_run else sorted({1, target_key(args)[0] * branches, largest})


def record_check(result: dict, check: dict, consequence: str) -> None:
    """Add ``check`` to ``result["checks"]`` and print it; one out of its tolerance is an error, ending in
    ``consequence``."""
    result["checks"].append(check)
    text = check_text(check)
    print(text, flush=True)
    if not check["passed"]:
        result["errors"].append(f"{text}; {consequence}")


def check_decode_steps(args, result: dict, options: dict[str, dict], device: torch.device, branches: int,
                       generator) -> set[str]:
    """`check_decode_stacks` of the stacks of ``options`` at each of `checked_rows` and the targets' context, on
    `check_model`'s model; into ``result["checks"]``. The names of the stacks that failed or raised."""
    if not options:
        return set()
    failed = set()
    context = args.prompt_tokens + target_key(args)[1] // 2
    try:
        model = check_model(args.dry_run, device, args.seed + 1)
    except Exception as error:
        result["errors"].append(_error("decode step checks (the two-layer model)", error))
        return set(options)
    for rows in checked_rows(args, branches):
        try:
            checks = check_decode_stacks(model, options, rows, context, generator)
        except Exception as error:
            result["errors"].append(_error(f"decode step checks ({rows} rows, context {context})", error))
            failed |= set(options)
            break
        for name, check in checks.items():
            record_check(result, check, "the stack is not timed")
            if not check["passed"]:
                failed.add(name)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _save(args.out, result)
    return failed


def check_token_steps(args, result: dict, model, velocities: dict, device: torch.device, branches: int,
                      generator, stem: str = "gpu_latency") -> set[str]:
    """`check_token_step` of each of ``velocities`` (variant name -> `FusedFlowMatchingVelocity`) at the smallest
    and the largest batch size and the fewest head steps; into ``result["checks"]``. The names of the variants
    that failed or raised."""
    failed = set()
    steps = min(args.steps)
    for name, velocity in velocities.items():
        for batch in sorted({min(args.batch_sizes), max(args.batch_sizes)}):
            try:
                check = check_token_step(model, velocity, batch, branches, steps, args.cfg, device,
                                         generator, name)
            except Exception as error:
                result["errors"].append(_error(f"token step check ({name}, batch {batch}, {steps} head steps)",
                                               error))
                failed.add(name)
                break
            record_check(result, check, "the variant is not timed")
            if not check["passed"]:
                failed.add(name)
                break
    _save(args.out, result, stem)
    return failed


def time_eager_path(args, result: dict, model, clock, branches: int, generator) -> None:
    """The eager path (no graphs, no fused kernels) at batch 1 and the first step count, over a few tokens;
    into ``result["eager"]``, or its failure into ``result["errors"]``."""
    try:
        eager = time_eager(model, clock, 1, branches, args.steps[0], args.cfg, args.prompt_tokens + 512,
                           2 if args.dry_run else 5, generator)
    except Exception as error:
        result["errors"].append(_error("eager", error))
        return
    eager.update(batch=1, steps=args.steps[0])
    result["eager"].append(eager)
    print(f"eager batch 1 steps {args.steps[0]}: backbone {eager['backbone_ms']:.2f} ms, "
          f"head {eager['head_ms']:.2f} ms per token", flush=True)


def run(args) -> dict:
    started = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    capture = device.type == "cuda"
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine(),
              "dry_run": args.dry_run, "cfg": args.cfg, "sampler": "euler",
              "prompt_tokens": args.prompt_tokens, "layer_products": [], "backbone_one_row": [], "head_block_tiles": [],
              "rows": [],
              "eager": [], "checks": [], "errors": []}
    print(json.dumps(result["machine"]), flush=True)
    result["card"] = card = card_numbers(device, args.dry_run)
    bandwidth, matmul = card["copy_bandwidth_bytes_per_s"], card["matmul_flops_per_s"]
    print(f"card {card['name']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, matmul "
          f"{matmul / 1e12:.1f} TFLOP/s ({card['matmul_dtype']})", flush=True)

    begin = time.perf_counter()
    model = build_random_model(args.dry_run, device, args.seed)
    result["build_seconds"] = time.perf_counter() - begin
    weights = backbone_weight_bytes(model)
    multiplied = backbone_matmul_parameters(model)  # 2 flops each per row and token
    result["backbone_weight_bytes"] = weights
    result["triton"] = triton_enabled(next(model.parameters()))  # whether the fused kernels run
    print(f"model built in {result['build_seconds']:.1f} s; decoder weights {weights / 1e9:.2f} GB", flush=True)
    fast = FastTokenSampler(model, capture=capture, compile_backbone=args.compile_backbone,
                            fused_decode=args.fused_decode)
    velocity = FusedFlowMatchingVelocity(model.image_head)
    block_velocity = FusedFlowMatchingVelocity(model.image_head, fused_blocks=True) if result["triton"] else None
    clock = Clock(device)
    branches = 2 if args.cfg != 1.0 else 1

    def remaining() -> float:
        return args.budget_seconds - (time.perf_counter() - started)

    if args.persistent_head:
        return persistent_head_run(args, result, model, velocity, clock, branches, capture, generator, started)

    # One layer's matrix products alone at one row: the library's against the few-rows kernel with a few
    # tiles; the fastest tiles (summed over the products) are used from here on.
    if result["triton"]:
        candidates = SKINNY_CANDIDATES[:1] if args.dry_run else SKINNY_CANDIDATES
        shapes = layer_products(model)
        products = time_products(clock, shapes, 1, next(model.parameters()).dtype, args.repeats,
                                 capture, candidates, generator, result["errors"],
                                 per_call=1 if args.dry_run else PRODUCTS_PER_CALL, l2_bytes=card["l2_bytes"])
        result["layer_products"] = products
        for entry in products:
            print(_product_line(entry), flush=True)
        # The tiles with the least time summed over the products, among those that ran every product.
        by_tiles: dict[tuple, list[float]] = {}
        for entry in products:
            if entry["kind"] == "skinny":
                by_tiles.setdefault(tuple(entry["tiles"].values()), []).append(entry["ms"])
        complete = {key: sum(times) for key, times in by_tiles.items() if len(times) == len(shapes)}
        set_skinny_tiles(SkinnyTiles(*min(complete, key=complete.get)) if complete else SkinnyTiles())
        result["skinny_tiles_chosen"] = asdict(skinny_tiles())
        # The same products through int8 copies of the weights, with the chosen tiles.
        quantized = time_products(clock, shapes, 1, next(model.parameters()).dtype, args.repeats,
                                  capture, [skinny_tiles()], generator, result["errors"],
                                  per_call=1 if args.dry_run else PRODUCTS_PER_CALL, int8=True,
                                  l2_bytes=card["l2_bytes"])
        result["layer_products"] += quantized
        for entry in quantized:
            print(_product_line(entry), flush=True)
        _save(args.out, result)

    # The backbone alone at batch 1, one row (no CFG): its decode step against the bandwidth floor, as
    # the backbone's own stack and as the fused stack (packed projections, fused kernels), with the
    # library's matrix products and with the few-rows kernel.
    stacks = {}
    try:
        for name, options in DECODE_STACKS.items():
            if options is None:
                stacks[name] = None
            elif args.fused_decode and (not options or result["triton"]) and (
                    not options.get("dependent_launches") or dependent_launch_available()):
                stacks[name] = FusedDecodeStack(model.backbone, **options)
    except Exception as error:
        result["errors"].append(_error("fused decode stack", error))
    # Each fused stack's decode step against the backbone's own at the rows the stacks are timed at and the
    # targets' context, with the tiles chosen above; a stack out of its tolerance is not timed.
    checked = {name: DECODE_STACKS[name] for name, stack in stacks.items() if stack is not None}
    for name in check_decode_steps(args, result, checked, device, branches, generator):
        del stacks[name]
    for tokens in args.tokens:
        context = args.prompt_tokens + tokens // 2
        for name, stack in stacks.items():
            try:
                decode = time_decode(model, fast, clock, 1, context, args.repeats, capture, generator, stack)
            except Exception as error:
                result["errors"].append(_error(f"decode one row tokens {tokens} ({name} stack)", error))
                continue
            int8 = bool((DECODE_STACKS[name] or {}).get("int8_weights"))
            read, kv = int8_weight_bytes(stack) if int8 else weights, kv_bytes(model, 1, context + 1)
            floors = backbone_floors(read, kv, 2 * multiplied, card)
            floor = floors["floor_ms"]
            single = {"tokens": tokens, "context": context, "stack": name, "int8": int8, "ms": decode["ms"],
                      "floor_ms": floor, "ratio": decode["ms"] / floor, "floor_with_kv_ms": floors["floor_with_kv_ms"],
                      "ratio_with_kv": decode["ms"] / floors["floor_with_kv_ms"], "weight_bytes": read,
                      "kv_bytes": kv, "captured": decode["captured"]}
            if decode["failure"] and capture:
                result["errors"].append(decode["failure"])
            result["backbone_one_row"].append(single)
            print(f"backbone one row, context {context}, {name} stack: {decode['ms']:.2f} ms/token "
                  f"(weights floor {floor:.2f}, {single['ratio']:.2f}x; with the keys and values "
                  f"{single['floor_with_kv_ms']:.2f}, {single['ratio_with_kv']:.2f}x)", flush=True)
            _save(args.out, result)

    # The int8 stack at the rows (the CFG rows) and mean context of the targets' image, for the estimate of
    # that image through int8 weights.
    target_batch, target_tokens, _ = target_key(args)
    if any(entry["stack"] == INT8_STACK for entry in result["backbone_one_row"]):
        rows, context = target_batch * branches, args.prompt_tokens + target_tokens // 2
        try:
            decode = time_decode(model, fast, clock, rows, context, args.repeats, capture, generator,
                                 stacks[INT8_STACK])
        except Exception as error:
            result["errors"].append(_error(f"decode {rows} rows tokens {target_tokens} ({INT8_STACK} stack)", error))
        else:
            read, kv = int8_weight_bytes(stacks[INT8_STACK]), kv_bytes(model, rows, context + 1)
            floors = backbone_floors(read, kv, 2 * multiplied * rows, card)
            floor = floors["floor_ms"]
            result["int8_image_decode"] = {"tokens": target_tokens, "rows": rows, "context": context,
                                           "ms": decode["ms"], "floor_ms": floor, "ratio": decode["ms"] / floor,
                                           "floor_with_kv_ms": floors["floor_with_kv_ms"],
                                           "ratio_with_kv": decode["ms"] / floors["floor_with_kv_ms"],
                                           "weight_bytes": read, "kv_bytes": kv, "captured": decode["captured"]}
            if decode["failure"] and capture:
                result["errors"].append(decode["failure"])
            print(f"backbone {rows} rows, context {context}, {INT8_STACK} stack: {decode['ms']:.2f} ms/token "
                  f"(weights floor {floor:.2f}, {decode['ms'] / floor:.2f}x; with the keys and values "
                  f"{floors['floor_with_kv_ms']:.2f})", flush=True)
            _save(args.out, result)

    # The configurations decode with the fastest stack of the model's own weights at one row.
    own_weights = [entry for entry in result["backbone_one_row"] if not entry["int8"]]
    chosen = "fused" if "fused" in stacks else "backbone"
    if own_weights:
        chosen = min({entry["stack"] for entry in own_weights},
                     key=lambda name: statistics.mean(entry["ms"] for entry in own_weights if entry["stack"] == name))
    result["decode_stack_chosen"] = chosen
    print(f"configurations decode with the {chosen} stack", flush=True)

    # The block kernels' tiles, at batch 1 and the first step count; the fastest are used from here on.
    if block_velocity is not None:
        candidates = TILE_CANDIDATES[:2] if args.dry_run else TILE_CANDIDATES
        for candidate in candidates:
            set_tiles(candidate)
            try:
                timing = time_token_step(model, clock, 1, branches, args.steps[0], args.cfg, args.repeats, capture,
                                         block_velocity, generator)
            except Exception as error:
                result["errors"].append(_error(f"block kernels with {candidate}", error))
                continue
            result["head_block_tiles"].append({**asdict(candidate), "ms": timing["ms"]})
            print(f"block kernels, batch 1, {args.steps[0]} steps, {candidate}: {timing['ms']:.2f} ms", flush=True)
        if result["head_block_tiles"]:
            fastest = min(result["head_block_tiles"], key=lambda entry: entry["ms"])
            set_tiles(Tiles(fastest["block_n"], fastest["block_k"], fastest["num_warps"], fastest["rows_product"]))
        else:
            set_tiles(Tiles())
        result["head_block_tiles_chosen"] = asdict(tiles())
        _save(args.out, result)

    # The token step against the eager path, with the norm kernels and with the block kernels at the tiles
    # chosen above, at the fewest head steps and each batch size's end: a variant out of its tolerance is not
    # timed (without the norm kernels' step, no configuration is).
    variants = {"norm kernels": velocity, "block kernels": block_velocity}
    rejected = check_token_steps(args, result, model, {name: v for name, v in variants.items() if v is not None},
                                 device, branches, generator)
    if "block kernels" in rejected:
        block_velocity = None
        result["head_block_tiles_rejected"] = result.pop("head_block_tiles")
        result["head_block_tiles"] = []
    head_checked = "norm kernels" not in rejected

    # Components first (cheap), for every configuration: the targets' first, then the others while the
    # budget left affords the targets' images besides (`target_reserve_seconds`).
    result["configurations_skipped"] = []
    target = target_key(args)
    sizes = sorted(((batch, tokens) for batch in args.batch_sizes for tokens in args.tokens),
                   key=lambda size: size != target[:2])
    for batch, tokens in sizes:
        rows = batch * branches
        steps_counts = sorted(args.steps, key=lambda steps: (batch, tokens, steps) != target)
        wanted = []
        for steps in steps_counts:
            reserve = target_reserve_seconds(result, args, branches)
            if not head_checked:
                reason = "the token step with the norm kernels failed its check against the eager path"
                result["configurations_skipped"].append({"batch": batch, "tokens": tokens, "steps": steps,
                                                         "reason": reason})
                print(f"configuration tokens {tokens} batch {batch} steps {steps} skipped: {reason}", flush=True)
            elif (batch, tokens, steps) != target and remaining() < reserve:
                reason = f"{remaining():.0f} s of the budget left, {reserve:.0f} s kept for the targets' images"
                result["configurations_skipped"].append({"batch": batch, "tokens": tokens, "steps": steps,
                                                         "reason": reason})
                print(f"configuration tokens {tokens} batch {batch} steps {steps} skipped: {reason}", flush=True)
            else:
                wanted.append(steps)
        if wanted:
            context = args.prompt_tokens + tokens // 2
            try:
                decode = time_decode(model, fast, clock, rows, context, args.repeats, capture, generator,
                                     stacks[chosen])
            except Exception as error:
                result["errors"].append(_error(f"decode batch {batch} tokens {tokens}", error))
                continue
            kv = kv_bytes(model, rows, context + 1)
            floors = backbone_floors(weights, kv, 2 * multiplied * rows, card)
            backbone_floor = floors["floor_ms"]
            for steps in wanted:
                try:
                    head = time_token_step(model, clock, batch, branches, steps, args.cfg, args.repeats, capture,
                                           velocity, generator)
                except Exception as error:
                    result["errors"].append(_error(f"head batch {batch} steps {steps}", error))
                    continue
                blocks = None
                if block_velocity is not None:
                    try:
                        blocks = time_token_step(model, clock, batch, branches, steps, args.cfg, args.repeats,
                                                 capture, block_velocity, generator)
                    except Exception as error:
                        result["errors"].append(_error(f"block kernels batch {batch} steps {steps}", error))
                evaluations = head["evaluations"]
                head_floor = head_floor_ms(model, rows, evaluations, card)
                best_head = head["ms"] if blocks is None else min(head["ms"], blocks["ms"])
                row = {"tokens": tokens, "batch": batch, "steps": steps, "context": context,
                       "backbone_ms": decode["ms"], "backbone_floor_ms": backbone_floor,
                       "backbone_ratio": decode["ms"] / backbone_floor,
                       "backbone_floor_with_kv_ms": floors["floor_with_kv_ms"],
                       "backbone_ratio_with_kv": decode["ms"] / floors["floor_with_kv_ms"],
                       "backbone_weight_bytes": weights, "backbone_kv_bytes": kv,
                       "backbone_visible_slots": decode["visible_slots"], "backbone_captured": decode["captured"],
                       "head_ms": head["ms"], "head_blocks_ms": None if blocks is None else blocks["ms"],
                       "head_floor_ms": head_floor, "head_ratio": best_head / head_floor,
                       "head_weight_bytes": head_bytes(model, evaluations), "head_captured": head["captured"],
                       "estimated_image_seconds": tokens * (decode["ms"] + best_head) / 1e3,
                       "estimated_seconds_per_image": tokens * (decode["ms"] + best_head) / 1e3 / batch}
                for failure in (decode["failure"], head["failure"], blocks and blocks["failure"]):
                    if failure and capture:
                        result["errors"].append(failure)
                result["rows"].append(row)
                blocks_text = "" if blocks is None else f", block kernels {blocks['ms']:6.2f} ms"
                print(f"tokens {tokens:5d} batch {batch} steps {steps:3d}: backbone {decode['ms']:7.2f} ms "
                      f"(weights floor {backbone_floor:6.2f}, {row['backbone_ratio']:.2f}x; with the keys and values "
                      f"{row['backbone_floor_with_kv_ms']:6.2f}, {row['backbone_ratio_with_kv']:.2f}x)  "
                      f"head {head['ms']:6.2f} ms"
                      f"{blocks_text} (floor {head_floor:5.2f}, {row['head_ratio']:.2f}x)  "
                      f"estimated image {row['estimated_image_seconds']:.2f} s", flush=True)
                _save(args.out, result)

    # The eager path, batch 1, the first step count, a few tokens, where the budget affords it besides the
    # targets' images.
    reserve = target_reserve_seconds(result, args, branches)
    if remaining() < reserve + EAGER_SECONDS:
        result["eager_skipped"] = (f"{remaining():.0f} s of the budget left, {reserve:.0f} s kept for the "
                                   "targets' images")
        print(f"eager path skipped: {result['eager_skipped']}", flush=True)
    else:
        time_eager_path(args, result, model, clock, branches, generator)

    # Full images with the faster head variant, most important first, while the budget lasts.
    compared = [r for r in result["rows"] if r["head_blocks_ms"] is not None]
    fused_blocks = bool(compared) and statistics.median(r["head_blocks_ms"] - r["head_ms"] for r in compared) < 0
    result["image_head_kernels"] = "block kernels" if fused_blocks else "norm kernels"
    del fast
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fast = FastTokenSampler(model, capture=capture, compile_backbone=args.compile_backbone,
                            fused_blocks=fused_blocks, **sampler_options(DECODE_STACKS[chosen]))
    # The targets' configuration (batch 1, the most tokens, the fewest steps) first, then the same image
    # through int8 copies of the decode weights where that stack was timed; each after an untimed
    # generation of the same sizes through the same sampler, so that neither times the setup (graph
    # captures, the int8 copies) it would otherwise include. Then the others, smaller images first:
    # they capture the early decode buckets that the larger ones then reuse (these images' seconds
    # include the setup they do not share with the images before them).
    order = sorted(result["rows"], key=lambda r: (image_key(r) != target_key(args), r["batch"] != 1,
                                                   r["steps"] != min(args.steps), r["tokens"]))
    jobs = [("own", row) for row in order]
    int8_singles = [entry for entry in result["backbone_one_row"] if entry["int8"]]
    if int8_singles and jobs and image_key(jobs[0][1]) == target_key(args):
        jobs.insert(1, ("int8", jobs[0][1]))
    result["int8_images"] = []
    for weights, row in jobs:
        warm_up = image_key(row) == target_key(args)
        if weights == "own":
            estimated = row["estimated_image_seconds"]
        else:
            estimated = int8_image_seconds(result, row, branches,
                                           row["head_blocks_ms"] if fused_blocks else row["head_ms"])
        expected = expected_image_seconds(estimated, warm_up, 3.0)
        if expected > remaining():
            skipped = f"expected {expected:.0f} s, {remaining():.0f} s of the budget left"
            if weights == "own":
                row["image_skipped"] = skipped
            else:
                result["int8_image_skipped"] = skipped
            print(f"image ({weights} weights) tokens {row['tokens']} batch {row['batch']} steps {row['steps']} "
                  f"skipped: {skipped}", flush=True)
            continue
        sampler = fast
        if weights == "int8":
            sampler = FastTokenSampler(model, capture=capture, fused_blocks=fused_blocks,
                                       **sampler_options(DECODE_STACKS[INT8_STACK]))
        try:
            image = full_image(model, sampler, clock, row["batch"], branches, row["tokens"], row["steps"], args.cfg,
                               args.prompt_tokens, generator, warm_up=warm_up)
        except Exception as error:
            result["errors"].append(_error(f"image {row['tokens']} tokens batch {row['batch']} ({weights} "
                                           "weights)", error))
            continue
        finally:
            if weights == "int8":
                del sampler  # its int8 copies of the weights
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if weights == "own":
            row.update(image_fields(image))
        else:
            result["int8_images"].append({**dict(zip(IMAGE_KEY, image_key(row))), "estimated_image_seconds": estimated,
                                          **image_fields(image)})
        cold = f"; untimed first generation {image['cold_seconds']:.2f} s" if "cold_seconds" in image else ""
        print(f"image ({weights} weights): tokens {row['tokens']} batch {row['batch']} steps {row['steps']}: "
              f"{image['seconds']:.2f} s (prefill {image['prefill_ms']:.0f} ms, tokens "
              f"{image['tokens_ms'] / 1e3:.2f} s, VAE {image['vae_decode_ms']:.0f} ms{cold})", flush=True)
        _save(args.out, result)
    result["seconds"] = time.perf_counter() - started
    return result


def persistent_head_run(args, result: dict, model, velocity, clock, branches: int, capture: bool, generator,
                        started: float) -> dict:
    """The head alone with one launch per evaluation (`nextstep.kernels.persistent_head`) against the norm
    kernels, at every batch size and step count."""
    persistent = FusedFlowMatchingVelocity(model.image_head, persistent=True)
    without_prefetch = FusedFlowMatchingVelocity(model.image_head, persistent=True, prefetch=False)
    polling = {name: FusedFlowMatchingVelocity(model.image_head, persistent=True, barrier_polling=name)
               for name in BARRIER_POLLING[1:]}  # the others than the default
    result["persistent_head"] = []
    result["one_launch_images"] = []
    result["checks"] = []
    barrier = None

    def one_launch_ran() -> bool:  # built, and not replaced by the separate kernels after a failed launch
        return persistent._persistent_weights is not None and "persistent_head" not in FAILED_KERNELS

    # Each variant's token step against the eager path first, at the smallest and largest batch size and the
    # fewest head steps (the one-launch head at the programs this GPU runs); a variant out of its tolerance is
    # not timed.
    variants = [("one_launch_ms", persistent)]
    variants += [(f"one_launch_{name}_polling_ms", chosen) for name, chosen in polling.items()]
    variants += [("one_launch_no_prefetch_ms", without_prefetch), ("norm_kernels_ms", velocity)]
    rejected = check_token_steps(args, result, model, {name.removesuffix("_ms"): chosen for name, chosen in variants},
                                 clock.device, branches, generator, PERSISTENT_STEM)
    # The most telling first, since the part runs under a short limit: the default one-launch head, then
    # (once) the barrier alone, then the other ways to wait, no prefetching, the norm kernels.
    variants = [(name, chosen) for name, chosen in variants if name.removesuffix("_ms") not in rejected]
    for batch in args.batch_sizes:
        for steps in args.steps:
            entry = {"batch": batch, "steps": steps}
            for name, chosen in variants:
                try:
                    timing = time_token_step(model, clock, batch, branches, steps, args.cfg, args.repeats, capture,
                                             chosen, generator)
                except Exception as error:
                    result["errors"].append(_error(f"head {name} batch {batch} steps {steps}", error))
                    continue
                entry[name] = timing["ms"]
                evaluations = timing["evaluations"]
                if name == "one_launch_ms" and barrier is None and one_launch_ran():
                    barrier = result["grid_barrier"] = time_grid_barrier(clock, persistent.programs, args.repeats,
                                                                         len(model.image_head.net.res_blocks))
                    _save(args.out, result, PERSISTENT_STEM)
            if "one_launch_ms" not in entry:
                result["persistent_head"].append(entry)
                continue
            rows = batch * branches
            entry["floor_ms"] = head_floor_ms(model, rows, evaluations, result["card"])
            entry["one_launch_ratio"] = entry["one_launch_ms"] / entry["floor_ms"]
            entry["one_launch_ran"] = one_launch_ran()
            if "persistent_head" in FAILED_KERNELS:
                entry["one_launch_failure"] = FAILED_KERNELS["persistent_head"]
            if barrier is not None and "barrier_us" in barrier:
                # What the evaluations' barriers alone take of the one-launch time, and against the floor.
                barriers_ms = evaluations * barrier["barriers_per_evaluation"] * barrier["barrier_us"] / 1e3
                entry["barriers_ms"] = barriers_ms
                entry["barrier_share"] = barriers_ms / entry["one_launch_ms"]
            result["persistent_head"].append(entry)
            print(f"head batch {batch} steps {steps}: norm kernels {entry.get('norm_kernels_ms', float('nan')):.2f} "
                  f"ms, one launch {entry['one_launch_ms']:.2f} ms (floor {entry['floor_ms']:.2f}, "
                  f"{entry['one_launch_ratio']:.2f}x; without prefetching "
                  f"{entry.get('one_launch_no_prefetch_ms', float('nan')):.2f} ms; polling with loads "
                  f"{entry.get('one_launch_loads_polling_ms', float('nan')):.2f} ms, with acquire reads "
                  f"{entry.get('one_launch_acquire_polling_ms', float('nan')):.2f} ms; barriers alone "
                  f"{entry.get('barriers_ms', float('nan')):.2f} ms)", flush=True)
            _save(args.out, result, PERSISTENT_STEM)
            if (batch, steps) == (1, min(args.steps)) and one_launch_ran():
                one_launch_image(args, result, model, clock, branches, capture, generator, entry["one_launch_ms"],
                                 started)
    result["seconds"] = time.perf_counter() - started
    return result


def one_launch_image(args, result: dict, model, clock, branches: int, capture: bool, generator, head_ms: float,
                     started: float) -> None:
    """One image of the targets' configuration (`target_key`) with the one-launch head, decoding through int8
    copies of the weights where the fused stack runs and the main run did not find it out of its tolerance (else
    the backbone's own stack), with the few-rows
    tiles the main run chose (read from its ``gpu_latency.json`` in ``--out``, when there, as is the backbone's
    time in the estimate: `image_backbone_ms`); skipped when the budget would not last, or when that file is
    there but cannot be read."""
    batch, tokens, steps = target_key(args)
    int8 = bool(result["triton"] and args.fused_decode)
    record = {**dict(zip(IMAGE_KEY, (batch, tokens, steps))), "decode_weights": "int8" if int8 else "native"}
    main_run = args.out / "gpu_latency.json"
    try:
        main = json.loads(main_run.read_text()) if main_run.is_file() else {}
        if main.get("skinny_tiles_chosen"):
            set_skinny_tiles(SkinnyTiles(**main["skinny_tiles_chosen"]))
        if int8 and any(not check["passed"] for check in main.get("checks", []) if check["variant"] == INT8_STACK):
            # The main run found the int8 stack out of its tolerance: the backbone's own stack instead.
            int8 = False
            record["decode_weights"] = "native"
            record["int8_rejected"] = "the main run's check of the int8 stack failed"
        backbone_ms = image_backbone_ms(main, tokens, batch * branches, int8)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        reason = f"{main_run} could not be read: {type(error).__name__}: {error}"
        print(f"image with the one-launch head skipped: {reason}", flush=True)
        result["one_launch_images"].append({**record, "image_skipped": reason})
        return
    if backbone_ms is None:
        backbone_ms = UNTIMED_BACKBONE_MS
    estimated = tokens * (backbone_ms + head_ms) / 1e3
    record["estimated_image_seconds"] = estimated
    # Timed after an untimed generation of the same sizes (a fresh process: its first prefill and VAE decode
    # too), which the budget must afford as well.
    expected = expected_image_seconds(estimated, True, 5.0)
    left = args.budget_seconds - (time.perf_counter() - started)
    if expected > left:
        result["one_launch_images"].append({**record, "image_skipped": f"expected {expected:.0f} s, {left:.0f} s "
                                                                       "of the budget left"})
        return
    options = sampler_options(DECODE_STACKS[INT8_STACK]) if int8 else {}
    fast = FastTokenSampler(model, capture=capture, persistent_head=True, **options)
    try:
        image = full_image(model, fast, clock, batch, branches, tokens, steps, args.cfg, args.prompt_tokens,
                           generator, warm_up=True)
    except Exception as error:
        result["errors"].append(_error(f"image with the one-launch head ({record['decode_weights']} weights)",
                                       error))
        return
    finally:
        del fast
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["one_launch_images"].append({**record, **image_fields(image)})
    print(f"image with the one-launch head, {record['decode_weights']} decode weights: tokens {tokens} batch {batch} "
          f"steps {steps}: {image['seconds']:.2f} s (prefill {image['prefill_ms']:.0f} ms, tokens "
          f"{image['tokens_ms'] / 1e3:.2f} s, VAE {image['vae_decode_ms']:.0f} ms; estimated {estimated:.2f} s; "
          f"untimed first generation {image['cold_seconds']:.2f} s)", flush=True)
    _save(args.out, result, PERSISTENT_STEM)


def time_grid_barrier(clock, programs: int, repeats: int, blocks: int, rounds: int = 250) -> dict:
    """What one grid-wide barrier of the one-launch head costs: ``programs`` programs meeting 1 and 1 +
    ``rounds`` times and doing nothing else (`grid_barriers_triton`), the difference over ``rounds`` (median
    of ``repeats`` launches each), waiting each way of `BARRIER_POLLING` (``barrier_us`` the default,
    ``barrier_<name>_polling_us`` the others); and how many an evaluation of ``blocks`` blocks meets at."""
    found = {"programs": programs, "rounds": rounds, "barriers_per_evaluation": barriers_per_evaluation(blocks)}
    for index, polling in enumerate(BARRIER_POLLING):
        key = "barrier_us" if index == 0 else f"barrier_{polling}_polling_us"
        try:
            medians = []
            for count in (1, 1 + rounds):
                grid_barriers_triton(programs, count, clock.device, polling=polling)  # compiles
                times: list[float] = []
                for _ in range(repeats):
                    with clock.measure(times):
                        grid_barriers_triton(programs, count, clock.device, polling=polling)
                medians.append(statistics.median(times))
        except Exception as error:
            found.setdefault("errors", []).append(_error(f"grid barrier ({key})", error))
            continue
        found[key] = (medians[1] - medians[0]) / rounds * 1e3
        if index == 0:
            found["launch_with_one_barrier_us"] = medians[0] * 1e3
    print(f"grid barrier of {programs} programs: {found.get('barrier_us', float('nan')):.2f} us polling with "
          f"relaxed reads, {found.get('barrier_loads_polling_us', float('nan')):.2f} us with loads, "
          f"{found.get('barrier_acquire_polling_us', float('nan')):.2f} us with acquire reads; "
          f"{found['barriers_per_evaluation']} per evaluation", flush=True)
    return found


def _error(where: str, error: BaseException) -> str:
    text = f"{where}: {type(error).__name__}: {str(error).strip()[:500]}"
    print(text, flush=True)
    traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return text


def markdown(result: dict) -> str:
    """The docs table: card, date, one row per configuration."""
    card, info = result["card"], result["machine"]
    memory = f", {card['memory_bytes'] / 2**30:.0f} GiB" if card.get("memory_bytes") else ""
    lines = [
        f"**{card['name']}**{memory}; measured copy bandwidth "
        f"{card['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
        f"{card['matmul_dtype']} matmul {card['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; "
        f"PyTorch {info['torch']}, Triton kernels {'on' if result['triton'] else 'off'}, {info['date']}. "
        f"CFG {result['cfg']:g} (two branches per image), Euler, prompt of {result['prompt_tokens']} tokens. "
        f"Head ratio: the faster head variant over its floor; full images use the "
        f"{result.get('image_head_kernels', 'norm kernels')}. Backbone floors: the bytes of the decoder weights read "
        f"per token over the copy bandwidth (weights; the floor the targets are set against), and with the keys and "
        f"values of the context as well (weights + KV); the GB read behind them are the next column. Image seconds "
        f"are for the whole batch, and per image.",
        "",
        "| tokens | batch | head steps | backbone ms/token | floor (weights) | ratio | floor (weights + KV) | ratio "
        "| backbone GB read (weights + KV) | head ms/token | block kernels | floor | ratio | head GB read "
        "| image s (measured) | s per image (measured) | image s (estimated) | s per image (estimated) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["tokens"], r["batch"], r["steps"])):
        measured = f"{row['image_seconds']:.2f}" if "image_seconds" in row else "-"
        per_image = f"{row['image_seconds_per_image']:.2f}" if "image_seconds_per_image" in row else "-"
        blocks = "-" if row["head_blocks_ms"] is None else f"{row['head_blocks_ms']:.2f}"
        backbone_read = f"{row['backbone_weight_bytes'] / 1e9:.2f} + {row['backbone_kv_bytes'] / 1e9:.3f}"
        lines.append(
            f"| {row['tokens']} | {row['batch']} | {row['steps']} | {row['backbone_ms']:.2f} | "
            f"{row['backbone_floor_ms']:.2f} | {row['backbone_ratio']:.2f}x | {row['backbone_floor_with_kv_ms']:.2f} | "
            f"{row['backbone_ratio_with_kv']:.2f}x | {backbone_read} | {row['head_ms']:.2f} | {blocks} | "
            f"{row['head_floor_ms']:.2f} | {row['head_ratio']:.2f}x | {row['head_weight_bytes'] / 1e9:.2f} | "
            f"{measured} | {per_image} | {row['estimated_image_seconds']:.2f} | "
            f"{row['estimated_seconds_per_image']:.2f} |")
    for row in result["rows"]:
        if "image_cold_seconds" in row:
            lines += ["", f"The image of batch {row['batch']}, {row['tokens']} tokens, {row['steps']} head steps is "
                      f"timed after an untimed generation of the same sizes ({row['image_cold_seconds']:.2f} s, its "
                      "setup included); the other measured images include the setup they do not share with the "
                      "images before them."]
    if result.get("layer_products"):
        lines += ["", "One decoder layer's matrix products alone, one row (weight bytes over time; each captured call "
                  "rotates through copies of the weight that together are over twice the L2):", "",
                  "| product | N x K | kernel | tiles (columns/step/warps/stages) | us | TB/s |",
                  "|---|---|---|---|---|---|"]
        for entry in result["layer_products"]:
            lines.append(f"| {entry['product']} | {entry['outer']} x {entry['inner']} | {entry['kind']} | "
                         f"{_tiles_text(entry['tiles'])} | {entry['ms'] * 1e3:.1f} | "
                         f"{entry['bytes_per_s'] / 1e12:.2f} |")
    for single in result.get("backbone_one_row", []):
        lines += ["", f"Backbone alone, one row (batch 1, no CFG), context {single['context']}, "
                  f"{single.get('stack', 'backbone')} stack: {single['ms']:.2f} ms/token, floor "
                  f"{single['floor_ms']:.2f} ms, {single['ratio']:.2f}x{_with_kv(single)}."]
    if result.get("int8_image_decode"):
        decode = result["int8_image_decode"]
        lines += ["", f"Backbone through int8 copies of the weights ({INT8_STACK} stack), {decode['rows']} rows "
                  f"(the targets' image, CFG rows included), context {decode['context']}: {decode['ms']:.2f} "
                  f"ms/token, floor {decode['floor_ms']:.2f} ms, {decode['ratio']:.2f}x{_with_kv(decode)}."]
    if result.get("checks"):
        lines += ["", "Outputs at the timed shapes and tiles against the eager reference, before the timings (max "
                  "relative error: over the reference's largest magnitude; the decode steps on a model of these "
                  f"shapes with {CHECK_LAYERS} decoder layers; a variant over its tolerance is not timed):", "",
                  "| output | variant | rows or batch | context or head steps | max abs error | max relative error "
                  "| tolerance | within |", "|---|---|---|---|---|---|---|---|"]
        for check in result["checks"]:
            decode = check["part"] == "decode step"
            lines.append(f"| {check['part']} | {check['variant']} | "
                         f"{check['rows'] if decode else check['batch']} | "
                         f"{check['context'] if decode else check['steps']} | {check['max_abs_error']:.3g} | "
                         f"{check['max_rel_error']:.3g} | {check['tolerance']:g} | "
                         f"{'yes' if check['passed'] else 'no'} |")
    if result.get("kernel_fallbacks"):
        failed = "; ".join(f"{name}: {error}" for name, error in result["kernel_fallbacks"].items())
        lines += ["", f"Kernels that failed and ran as their PyTorch references from then on: {failed}."]
    if result.get("decode_stack_chosen"):
        lines += ["", f"The configurations decode with the {result['decode_stack_chosen']} stack (the fastest of the "
                  "model's own weights at one row)."]
    if result.get("head_block_tiles"):
        chosen = result["head_block_tiles_chosen"]
        def name(t):
            return f"{t['block_n']}/{t['block_k']}/{t['num_warps']}{' rows' if t.get('rows_product') else ''}"

        tried = ", ".join(f"{name(t)}: {t['ms']:.2f} ms" for t in result["head_block_tiles"])
        lines += ["", f"Block-kernel tiles (columns/reduction step/warps, 'rows': row-by-row products) at "
                  f"batch 1: {tried}; chosen {name(chosen)}."]
    for image in result.get("int8_images", []):
        lines += ["", f"Image through int8 copies of the decode weights ({INT8_STACK} stack), batch {image['batch']}, "
                  f"{image['tokens']} tokens, {image['steps']} head steps: {image['image_seconds']:.2f} s (prefill "
                  f"{image['image_prefill_ms']:.0f} ms, tokens {image['image_tokens_ms'] / 1e3:.2f} s, VAE "
                  f"{image['image_vae_decode_ms']:.0f} ms; estimated {image['estimated_image_seconds']:.2f} s; "
                  f"after an untimed generation of {image.get('image_cold_seconds', float('nan')):.2f} s)."]
    for eager in result["eager"]:
        lines += ["", f"Eager path (no graphs, no fused kernels), batch {eager['batch']}, {eager['steps']} steps: "
                  f"backbone {eager['backbone_ms']:.2f} ms/token, head {eager['head_ms']:.2f} ms/token "
                  f"(the paper, H100: {PAPER_MS['backbone']} and {PAPER_MS['head']})."]
    skipped = [f"batch {entry['batch']}, {entry['tokens']} tokens, {entry['steps']} head steps ({entry['reason']})"
               for entry in result.get("configurations_skipped", [])]
    if skipped:
        lines += ["", "Configurations not timed, so that the budget afforded the targets' images: "
                  + "; ".join(skipped) + "."]
    if result.get("eager_skipped"):
        lines += ["", f"Eager path not timed: {result['eager_skipped']}."]
    if result["errors"]:
        lines += ["", "Errors: " + "; ".join(result["errors"])]
    return "\n".join(lines) + "\n"


def _with_kv(entry: dict) -> str:
    """The weights-only floor's companion in words: the floor with the keys and values, and the bytes of both."""
    if "floor_with_kv_ms" not in entry:
        return ""
    return (f" (weights alone, {entry['weight_bytes'] / 1e9:.2f} GB; with the keys and values, "
            f"{entry['kv_bytes'] / 1e9:.3f} GB more: floor {entry['floor_with_kv_ms']:.2f} ms, "
            f"{entry['ratio_with_kv']:.2f}x)")


def failures(result: dict) -> list[str]:
    """Why a run's results cannot be taken as they are: its errors (checks out of tolerance among them), the
    kernels that failed and ran as their references, the grid barrier's errors."""
    found = list(result.get("errors", []))
    if result.get("kernel_fallbacks"):
        found.append("kernels that failed and ran as their PyTorch references from then on: "
                     + ", ".join(sorted(result["kernel_fallbacks"])))
    found += result.get("grid_barrier", {}).get("errors", [])
    return found


def _save(out: Path, result: dict, stem: str = "gpu_latency") -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Kernels that failed to build or launch ran as their PyTorch references from then on: their timings
    # are the references'.
    result["kernel_fallbacks"] = dict(FAILED_KERNELS)
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    if "card" in result and stem == "gpu_latency":
        atomic_write_text(out / f"{stem}.md", markdown(result))


def main(argv=None) -> int:
    """Run and write the results: 0 when every part ran as meant, 1 when CUDA is missing (outside a dry run), a
    part failed, a check was out of its tolerance or a kernel ran as its reference (`failures`)."""
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_latency: CUDA is not available: expected a CUDA device outside --dry-run, found none; nothing "
              "measured (use --dry-run to check the script on the CPU)", flush=True)
        return 1
    result = run(args)
    if args.persistent_head:
        _save(args.out, result, PERSISTENT_STEM)
        print(f"wrote {args.out / (PERSISTENT_STEM + '.json')} in {result['seconds']:.0f} s", flush=True)
    else:
        _save(args.out, result)
        print(f"wrote {args.out / 'gpu_latency.json'} and {args.out / 'gpu_latency.md'} in "
              f"{result['seconds']:.0f} s", flush=True)
    found = failures(result)
    if found:
        print(f"gpu_latency: FAILED, expected no errors and no kernel fallbacks, found {len(found)}:", flush=True)
        for text in found:
            print(f"  {text}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
