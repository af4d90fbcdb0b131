"""The fast image-token loop: one captured CUDA graph per token step and one per decode step.

Legend: G guidance branches, R images, N = G * R backbone rows, T image tokens,
D token dim, H hidden size, S solver steps, E evaluation times.

`FastTokenSampler.sample_tokens` replaces the per-token loop of
`nextstep.generation.generate_tokens` after the prefill. Per image token it
runs two graphs: the token step (out-projector, every head evaluation with its
guidance combine and solver update, ``use_norm``, in-projector; see
`nextstep.fast.token_step`) and the backbone's decode step over the static KV
cache (`nextstep.fast.decode_step`). Graphs are captured on first use, one per
(rows, branches, solver plan) bucket for the token step and one per (cache,
visible-slot bucket) for the decode step, and kept for later generations; `new_cache` hands out pooled
caches so that the decode graph is reused.

On the CPU, or with ``capture=False``, the same steps run eagerly; the
results are the same up to floating-point rounding (the fused kernels sum in
another order than the samplers' eager code).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Callable

import torch

from nextstep.backbones.base import BackboneCache
from nextstep.compile import safe_compile
from nextstep.fast.cuda_graph import CapturedCall
from nextstep.fast.decode_step import DecodeStep, decode_step_reason
from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity, fused_head_reason
from nextstep.fast.fused_decode import FusedDecodeStack
from nextstep.fast.guidance_weights import image_branch_weights, weights_reason
from nextstep.fast.solver_plan import plan_reason, solver_plan
from nextstep.fast.token_step import MAX_TABLE_ELEMENTS, FusedTokenStep, GenericTokenStep, TokenStepBuffers
from nextstep.samplers.base import Sampler
from nextstep.samplers.guidance import Guidance
from nextstep.samplers.guidance_schedule import token_progress
from nextstep.samplers.step_schedule import StepSchedule, as_step_schedule, check_step_counts

if TYPE_CHECKING:
    from nextstep.model import NextStep

__all__ = ["CACHE_BUCKET", "DECODE_WEIGHTS", "TOKEN_SAMPLERS", "FastTokenSampler", "token_sampler_named"]

logger = logging.getLogger(__name__)

#: Pooled caches round their capacity up to a multiple of this many slots, so
#: that generations of similar lengths share one cache and one decode graph.
CACHE_BUCKET = 256

#: What the fused decode step multiplies by (`FastTokenSampler`'s ``decode_weights``).
DECODE_WEIGHTS = ("native", "skinny", "int8")

#: Names of the ways to sample an image's tokens after the prefill (`token_sampler_named`): the plain
#: loop of `nextstep.generation.generate_tokens`; `FastTokenSampler`; with the fused decode step; with
#: it multiplying through the few-rows kernel; through int8 weights.
TOKEN_SAMPLERS = ("loop", "fast", "fused", "skinny", "int8")


class FastTokenSampler:
    """Samples every image token of a generation with captured CUDA graphs (eagerly on the CPU).

    Build one per model and keep it: it holds the captured graphs, their static
    buffers and pooled caches. It is valid while the model's parameters stay
    unchanged (call `reset` after changing them in place; a model moved to
    another device or dtype is noticed and the sampler starts afresh).

    Args:
        model: a `nextstep.model.NextStep`, already on its device and dtype.
        capture: record CUDA graphs (None: on a CUDA device). True on a
            non-CUDA device raises.
        use_kernels: None: Triton kernels where they can run; True: always
            (CUDA, or CPU under Triton's interpreter); False: never.
            ``NEXTSTEP_DISABLE_TRITON=1`` makes it False.
        compile_backbone: run the decoder stack through ``torch.compile``
            (`nextstep.compile.safe_compile`: falls back to eager on failure)
            inside the decode graph; it replaces the fused stack, so it cannot
            be combined with ``fused_decode`` (nor the options that need it).
        fused_decode: run the decode step as `nextstep.fast.fused_decode.FusedDecodeStack`
            (packed projections, fused rotary + cache write, fused add + norm).
            It packs the backbone's projection weights
            (`nextstep.fast.packed_projections`; no memory is added). Off by
            default: ``benchmarks/gpu_latency.py`` times both stacks.
        decode_weights: ``"native"`` (the model's own), ``"skinny"`` (the same
            weights through the few-rows product kernel) or ``"int8"`` (int8
            copies, `nextstep.fast.weight_quantization`); the last two need
            ``fused_decode``.
        dependent_launches: launch the fused decode step's kernels as
            programmatic dependent launches, each starting while the one ahead
            finishes (`nextstep.kernels.triton_support.dependent_launches`);
            needs ``fused_decode``. Experimental, off by default until measured.
        fused_blocks: run each AdaLN block of the head as two fused
            matrix-product kernels (`nextstep.kernels.adaln_linear`) instead of
            cuBLAS products around fused norms; worth it where the benchmark says so.
        persistent_head: run each head evaluation as one launch of cooperating
            programs (`nextstep.kernels.persistent_head`), where Triton runs.
            Experimental: it needs every program resident on the GPU at once.
        max_table_elements: largest per-token modulation table of the head.
    """

    def __init__(self, model: "NextStep", *, capture: bool | None = None, use_kernels: bool | None = None,
                 compile_backbone: bool = False, fused_blocks: bool = False, fused_decode: bool = False,
                 decode_weights: str = "native", dependent_launches: bool = False, persistent_head: bool = False,
                 max_table_elements: int = MAX_TABLE_ELEMENTS):
        self.model = model
        self._capture_choice = capture
        self.use_kernels = use_kernels
        self.compile_backbone = compile_backbone
        self.fused_decode = bool(fused_decode)
        if decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights must be one of {DECODE_WEIGHTS}, found {decode_weights!r}")
        if decode_weights != "native" and not self.fused_decode:
            raise ValueError(f"decode_weights={decode_weights!r} needs fused_decode=True")
        self.decode_weights = decode_weights
        if dependent_launches and not self.fused_decode:
            raise ValueError("dependent_launches=True needs fused_decode=True")
        if compile_backbone and self.fused_decode:
            raise ValueError("compile_backbone=True compiles the backbone's own decoder stack in place of the fused "
                             "one: pass fused_decode=False (and no decode_weights or dependent_launches)")
        self.dependent_launches = bool(dependent_launches)
        self.fused_blocks = fused_blocks
        self.persistent_head = persistent_head
        self.max_table_elements = max_table_elements
        self.reset()

    def reset(self) -> None:
        """Drop every graph, buffer, pooled cache and the head's folded weights, and read the model's device
        and dtype again (after changing its parameters, moving or casting it).

        Raises:
            ValueError: ``capture=True`` and the model is not on a CUDA device.
        """
        parameter = next(self.model.backbone.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        capture = self._capture_choice
        if capture is None:
            capture = self.device.type == "cuda"
        if capture and self.device.type != "cuda":
            raise ValueError(f"capture=True needs the model on a CUDA device, found it on {self.device}")
        self.capture = capture
        self._said: set[str] = set()  # the eager fallbacks already logged
        self._velocity: FusedFlowMatchingVelocity | None = None
        self._buffers: dict[tuple[int, int], TokenStepBuffers] = {}
        self._token_steps: dict[tuple, tuple[FusedTokenStep, CapturedCall]] = {}
        self._decode_steps: dict[tuple, tuple[DecodeStep, dict[int, CapturedCall]]] = {}
        self._caches: dict[tuple, BackboneCache] = {}
        self._compiled_stack = None
        self._fused_stack: FusedDecodeStack | None = None

    # ------------------------------------------------------------------ set-up
    def fused_reason(self, sampler: Sampler, guidance: Guidance) -> str | None:
        """None when token steps with ``sampler`` and ``guidance`` run fused (and can be captured), else why not."""
        model = self.model
        dtypes = {model.image_out_projector.weight.dtype, model.image_in_projector.weight.dtype, self.dtype,
                  *(parameter.dtype for parameter in model.image_head.parameters())}
        if len(dtypes) > 1:
            return f"the backbone, projectors and head mix dtypes {sorted(map(str, dtypes))}"
        return fused_head_reason(model.image_head) or plan_reason(sampler) or weights_reason(guidance)

    def _say_eager(self, steps: str, reason: str) -> None:
        """Log once per reason that ``steps`` run through the components' own code, eagerly, and why."""
        if reason not in self._said:
            self._said.add(reason)
            logger.info("%s run eagerly through the components' own code: %s", steps, reason)

    def _follow_model(self) -> None:
        """Start afresh (`reset`) when the model was moved to another device or cast since."""
        parameter = next(self.model.backbone.parameters())
        if (parameter.device, parameter.dtype) != (self.device, self.dtype):
            self.reset()

    def new_cache(self, batch_size: int, max_length: int, *, dtype: torch.dtype | None = None) -> BackboneCache:
        """An empty cache with at least ``max_length`` slots, pooled by (rows, bucketed capacity, dtype).

        The same cache object comes back for the next generation of a similar
        size, so its captured decode graph is reused. A cache handed out earlier
        is emptied: finish with it before asking for the next one of its size.

        Args:
            batch_size: rows N (branches x images).
            max_length: slots needed (prompt + image tokens).
            dtype: the cache dtype (default: the backbone's).
        """
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an integer >= 1, found {max_length!r}")
        self._follow_model()
        dtype = dtype or self.dtype
        capacity = -(-max_length // CACHE_BUCKET) * CACHE_BUCKET
        key = (batch_size, capacity, dtype)
        cache = self._caches.get(key)
        if cache is None:
            cache = self.model.backbone.new_cache(batch_size, capacity, dtype=dtype)
            self._caches[key] = cache
        elif hasattr(cache, "reset"):
            cache.reset()
        else:
            cache.crop(0)
        return cache

    def _buffers_for(self, rows: int, branches: int) -> TokenStepBuffers:
        key = (rows, branches)
        if key not in self._buffers:
            self._buffers[key] = TokenStepBuffers.allocate(
                rows, branches, self.model.backbone.hidden_size, self.model.token_dim,
                device=self.device, dtype=self.dtype)
        return self._buffers[key]

    def _head_velocity(self) -> FusedFlowMatchingVelocity:
        if self._velocity is None:
            with torch.inference_mode(False):
                self._velocity = FusedFlowMatchingVelocity(self.model.image_head, self.use_kernels,
                                                           self.fused_blocks, persistent=self.persistent_head)
        return self._velocity

    def _token_step(self, plan, rows: int, branches: int, use_norm: bool) -> tuple[FusedTokenStep, CapturedCall]:
        key = (rows, branches, plan.signature, use_norm)
        entry = self._token_steps.get(key)
        if entry is None:
            step = FusedTokenStep(self.model, self._head_velocity(), plan, rows=rows, branches=branches,
                                  buffers=self._buffers_for(rows, branches), use_norm=use_norm,
                                  use_kernels=self.use_kernels, max_table_elements=self.max_table_elements)
            entry = (step, CapturedCall(step.compute, name=f"token step (rows {rows}, "
                                        f"{len(plan.stages)} stages)"))
            self._token_steps[key] = entry
        else:
            entry[0].set_plan(plan)
        return entry

    def _decode_step(self, cache: BackboneCache,
                     buffers: TokenStepBuffers) -> tuple[DecodeStep, dict[int, CapturedCall]]:
        rows = buffers.hidden.shape[0]
        backbone = self.model.backbone
        reason = decode_step_reason(backbone, cache)
        ready = reason is None
        if not ready:
            self._say_eager("decode steps", reason)
        fused = ready and self.fused_decode
        if fused:
            if self._fused_stack is None:
                self._fused_stack = FusedDecodeStack(backbone, skinny=self.decode_weights == "skinny",
                                                     int8_weights=self.decode_weights == "int8",
                                                     dependent_launches=self.dependent_launches,
                                                     use_kernels=self.use_kernels)
            elif self._fused_stack.refresh():
                self._decode_steps.clear()  # their graphs read the weights where they were
        # A step reads and writes one cache and one set of buffers. Each pooled cache keeps its own steps, so
        # that generations alternating between sizes keep their captured graphs; a cache from elsewhere
        # shares one entry per rows, replaced when another such cache comes (which bounds what is held).
        pooled = any(cache is held for held in self._caches.values())
        key = (id(cache), id(buffers.embeds)) if pooled else ("given", rows, id(buffers.embeds))
        entry = self._decode_steps.get(key)
        if entry is None or entry[0].cache is not cache or entry[0].embeds is not buffers.embeds \
                or entry[0].hidden is not buffers.hidden:
            stack = self._fused_stack if fused else None
            if self.compile_backbone and ready:
                if self._compiled_stack is None:
                    # Automatic dynamic shapes: the visible-slot buckets share one recompiled graph.
                    self._compiled_stack = safe_compile(backbone._run, name="decoder stack", fullgraph=True)
                stack = self._compiled_stack
            step = DecodeStep(backbone, cache, buffers.embeds, buffers.hidden, compile_stack=stack)
            entry = (step, {})  # one captured call per visible-slot bucket
            self._decode_steps[key] = entry
        return entry

    # ------------------------------------------------------------------ sampling
    def _check(self, hidden, cache, next_positions, noise, step_noise, branches, sampler, max_steps):
        if noise.ndim != 3 or noise.shape[-1] != self.model.token_dim:
            raise ValueError(f"noise must have shape (R, T, {self.model.token_dim}), found {tuple(noise.shape)}")
        rows, count, token_dim = noise.shape
        backbone_rows = branches * rows
        if hidden.shape != (backbone_rows, self.model.backbone.hidden_size):
            raise ValueError(f"hidden must have shape ({backbone_rows}, {self.model.backbone.hidden_size}) for "
                             f"{branches} branch(es) x {rows} image(s), found {tuple(hidden.shape)}")
        if next_positions.shape != (backbone_rows, 1):
            raise ValueError(
                f"next_positions must have shape ({backbone_rows}, 1), found {tuple(next_positions.shape)}")
        if not isinstance(cache, BackboneCache):
            raise TypeError(f"FastTokenSampler needs a BackboneCache (length, max_length, batch_size, crop, "
                            f"select_rows) from the backbone's new_cache, found {type(cache).__name__}; derive the "
                            "cache from nextstep.backbones.base.BackboneCache, or generate without token_sampler")
        if cache.batch_size != backbone_rows:
            raise ValueError(f"the cache has {cache.batch_size} rows, the generation needs {backbone_rows}")
        if cache.length + count - 1 > cache.max_length:
            raise ValueError(f"the cache holds {cache.max_length} slots with {cache.length} filled; "
                             f"{count - 1} more image tokens do not fit")
        if sampler.stochastic and step_noise is not None:
            expected = (count, max_steps, rows, token_dim)
            if step_noise.ndim != 4 or step_noise.shape[0] != count or step_noise.shape[1] < max_steps \
                    or step_noise.shape[2:] != expected[2:]:
                raise ValueError(f"step_noise must have shape {expected}, found {tuple(step_noise.shape)}")

    def sample_tokens(
        self,
        hidden: torch.Tensor,
        cache: BackboneCache,
        next_positions: torch.Tensor,
        noise: torch.Tensor,
        step_noise: torch.Tensor | None = None,
        *,
        guidance: Guidance,
        sampler: Sampler | None = None,
        num_steps: int | StepSchedule = 50,
        shift: float = 1.0,
        use_norm: bool | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Sample every image token after the prefill, as `nextstep.generation.generate_tokens` does.

        Args:
            hidden: (N, H) last hidden state of every backbone row after the
                prefill, branch-major (``[branch 0 rows; branch 1 rows; ...]``).
            cache: the backbone cache holding the prefill (ideally from `new_cache`).
            next_positions: (N, 1) rotary position of the first image token per row.
            noise: (R, T, D) starting noise of every token.
            step_noise: (T, S, R, D) step noise for a stochastic sampler, or None.
            guidance: the guidance object (its ``num_branches`` is G).
            sampler: the sampler (default: the model's).
            num_steps: solver steps per token, or a step schedule.
            shift: time shift of the grid.
            use_norm: LayerNorm each sampled token (default: the model config's).
            progress: True for a progress bar, or ``progress(done, total)``.

        Returns:
            tokens (R, T, D) float32.
        """
        with torch.inference_mode():
            tokens = self._sample(hidden, cache, next_positions, noise, step_noise, guidance, sampler, num_steps,
                                  shift, use_norm, progress)
        return tokens.clone()  # an ordinary tensor: inference tensors refuse later in-place updates

    def _sample(self, hidden, cache, next_positions, noise, step_noise, guidance, sampler, num_steps, shift,
                use_norm, progress) -> torch.Tensor:
        model = self.model
        self._follow_model()
        sampler = sampler if sampler is not None else model.sampler
        use_norm = model.config.use_norm if use_norm is None else bool(use_norm)
        schedule = as_step_schedule(num_steps)
        branches = guidance.num_branches
        rows, count, token_dim = noise.shape if noise.ndim == 3 else (0, 0, 0)
        max_steps = schedule.max_steps(count) if count else 0
        self._check(hidden, cache, next_positions, noise, step_noise, branches, sampler, max_steps)
        check_step_counts(sampler, schedule, count, shift)
        if not sampler.stochastic:
            step_noise = None
        reason = self.fused_reason(sampler, guidance)
        fused = reason is None
        if not fused:
            self._say_eager("token steps", reason)
        buffers = self._buffers_for(rows, branches)
        buffers.hidden.copy_(hidden)
        decode, decode_calls = self._decode_step(cache, buffers)
        decode.start(next_positions.to(self.device))
        noise = noise.to(self.device, torch.float32)
        if step_noise is not None:
            step_noise = step_noise.to(self.device, torch.float32)

        per_steps: dict[int, tuple] = {}
        generic = None if fused else GenericTokenStep(model, sampler, guidance, rows=rows, buffers=buffers,
                                                      use_norm=use_norm)
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=count, unit="tok")
        tokens = torch.empty(rows, count, token_dim, device=self.device)
        for index in range(count):
            steps = schedule.steps_for(index, count)
            if steps not in per_steps:
                grid = sampler.make_time_grid(steps, shift, device=self.device)
                if fused:
                    plan = solver_plan(sampler, grid, stochastic=step_noise is not None)
                    step, call = self._token_step(plan, rows, branches, use_norm)
                    weights = image_branch_weights(guidance, plan.times, count).to(self.device)
                    per_steps[steps] = (step, call, weights)
                else:
                    promised = sampler.evaluation_times(grid)
                    per_steps[steps] = (grid, None if promised is None else model.image_head.prepare_times(promised),
                                        promised)
            token_noise = None if step_noise is None else step_noise[index, :steps]  # (S, R, D)
            if fused:
                step, call, weights = per_steps[steps]
                step.load(noise[:, index], token_noise, weights[index])
                if self.capture and not call.captured and call.failure is None:
                    call.capture(self.device)
                call()
            else:
                grid, times, promised = per_steps[steps]  # promised: until a first token confirmed it
                generic.compute(noise[:, index], grid, times, token_noise, token_progress(index, count),
                                promised=promised)
                per_steps[steps] = (grid, times, None)
            tokens[:, index] = buffers.token
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(index + 1, count)
            if index == count - 1:
                break
            self._decode(decode, decode_calls)
        if bar is not None:
            bar.close()
        return tokens

    def _decode(self, decode: DecodeStep, calls: dict[int, CapturedCall]) -> None:
        decode.check_room()
        if not decode.graph_ready:
            decode.eager()
            return
        visible = decode.visible()
        call = calls.get(visible)
        if call is None:
            call = calls[visible] = CapturedCall(functools.partial(decode.compute, visible),
                                                 name=f"decode step ({decode.embeds.shape[0]} rows, {visible} slots)")
        if self.capture and not call.captured and call.failure is None:
            call.capture(self.device, snapshot=decode.snapshot)
        call()
        decode.advance()


def token_sampler_named(model: "NextStep", name: str) -> FastTokenSampler | None:
    """The token sampler a name of `TOKEN_SAMPLERS` stands for: None for ``loop``, else a new
    `FastTokenSampler` of ``model`` (``fused``: ``fused_decode=True``; ``skinny`` and ``int8``: also
    those ``decode_weights``)."""
    if name not in TOKEN_SAMPLERS:
        raise ValueError(f"token sampler must be one of {TOKEN_SAMPLERS}, found {name!r}")
    if name == "loop":
        return None
    if name == "fast":
        return FastTokenSampler(model)
    return FastTokenSampler(model, fused_decode=True, decode_weights="native" if name == "fused" else name)
