"""Image heads (velocity models for continuous tokens) and the LM head."""

from nextstep.heads.base import ImageHead
from nextstep.heads.flow_matching import FlowMatchingHead, FlowMatchingHeadConfig, FlowMatchingMLP
from nextstep.heads.lm_head import LMHead
from nextstep.heads.prepared_flow_matching import FlowMatchingTimes, PreparedFlowMatchingVelocity
from nextstep.heads.time_sampling import sample_times

__all__ = [
    "FlowMatchingHead",
    "FlowMatchingHeadConfig",
    "FlowMatchingMLP",
    "FlowMatchingTimes",
    "ImageHead",
    "LMHead",
    "PreparedFlowMatchingVelocity",
    "sample_times",
]
