"""Fast sampling on GPUs: captured CUDA graphs per image token and per decode step, fused kernels.

`FastTokenSampler` is the entry point: it replaces the per-token loop of
`nextstep.generation.generate_tokens` after the prefill. On the CPU (or with
``capture=False``) it runs the same steps eagerly.
"""

from nextstep.fast.cuda_graph import CapturedCall, GraphCaptureWarning
from nextstep.fast.decode_step import DecodeStep
from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity
from nextstep.fast.fused_decode import FusedDecodeStack
from nextstep.fast.guidance_weights import branch_weights
from nextstep.fast.packed_projections import PackedProjections, pack_projections
from nextstep.fast.solver_plan import SolverPlan, SolverStage, solver_plan
from nextstep.fast.token_sampler import FastTokenSampler
from nextstep.fast.token_step import FusedTokenStep, GenericTokenStep, TokenStepBuffers
from nextstep.fast.weight_quantization import Int8Weight, quantize_int8

__all__ = [
    "CapturedCall",
    "DecodeStep",
    "FastTokenSampler",
    "FusedDecodeStack",
    "FusedFlowMatchingVelocity",
    "FusedTokenStep",
    "GenericTokenStep",
    "GraphCaptureWarning",
    "Int8Weight",
    "PackedProjections",
    "SolverPlan",
    "SolverStage",
    "TokenStepBuffers",
    "branch_weights",
    "pack_projections",
    "quantize_int8",
    "solver_plan",
]
