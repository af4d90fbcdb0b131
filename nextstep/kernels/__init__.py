"""Fused kernels: Triton on CUDA when available, an eager PyTorch reference everywhere else.

Each module holds one fused operation: its Triton kernel (built lazily, on
first use), its eager reference, and a dispatching function that picks the
kernel where `nextstep.kernels.triton_support.triton_enabled` allows it.
"""

from nextstep.kernels.adaln_linear import (
    gated_linear,
    gated_linear_reference,
    gated_linear_triton,
    modulated_linear,
    modulated_linear_reference,
    modulated_linear_triton,
)
from nextstep.kernels.adaln_modulation import (
    layer_norm_modulate,
    layer_norm_modulate_reference,
    layer_norm_modulate_triton,
)
from nextstep.kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference, add_rms_norm_triton
from nextstep.kernels.guided_update import guided_update, guided_update_reference, guided_update_triton
from nextstep.kernels.rotary_cache import rotate_into_cache, rotate_into_cache_reference, rotate_into_cache_triton
from nextstep.kernels.skinny_linear import skinny_linear, skinny_linear_reference, skinny_linear_triton
from nextstep.kernels.swiglu import swiglu, swiglu_reference, swiglu_triton
from nextstep.kernels.triton_support import KernelFallbackWarning, dispatch, triton_available, triton_enabled

__all__ = [
    "KernelFallbackWarning",
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_rms_norm_triton",
    "dispatch",
    "gated_linear",
    "gated_linear_reference",
    "gated_linear_triton",
    "guided_update",
    "guided_update_reference",
    "guided_update_triton",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "layer_norm_modulate_triton",
    "modulated_linear",
    "modulated_linear_reference",
    "modulated_linear_triton",
    "rotate_into_cache",
    "rotate_into_cache_reference",
    "rotate_into_cache_triton",
    "skinny_linear",
    "skinny_linear_reference",
    "skinny_linear_triton",
    "swiglu",
    "swiglu_reference",
    "swiglu_triton",
    "triton_available",
    "triton_enabled",
]
