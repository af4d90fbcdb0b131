"""Image heads (velocity models for continuous tokens) and the LM head."""

from nextstep.heads.base import ImageHead
from nextstep.heads.flow_matching import FlowMatchingHead, FlowMatchingHeadConfig, FlowMatchingMLP
from nextstep.heads.lm_head import LMHead
from nextstep.heads.time_sampling import sample_times

__all__ = [
    "FlowMatchingHead",
    "FlowMatchingHeadConfig",
    "FlowMatchingMLP",
    "ImageHead",
    "LMHead",
    "sample_times",
]
