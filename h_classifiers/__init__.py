"""Balancing Act companion tools. The runtime pieces live in the single-file pipeline and are re-exported here."""

from pipeline_balancing_act import (
    DEFAULT_GUIDANCE_STRENGTH,
    DEFAULT_TEMPERATURE,
    GUIDANCE_LOSSES,
    GUIDANCE_MODES,
    GUIDED_BRANCHES,
    BalancingActPipeline,
    HClassifier,
    MidBlockHook,
    guidance_loss,
)


__all__ = [
    "DEFAULT_GUIDANCE_STRENGTH",
    "DEFAULT_TEMPERATURE",
    "GUIDANCE_LOSSES",
    "GUIDANCE_MODES",
    "GUIDED_BRANCHES",
    "BalancingActPipeline",
    "HClassifier",
    "MidBlockHook",
    "guidance_loss",
]
