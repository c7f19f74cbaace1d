"""Balancing Act companion tools. The runtime pieces live in the single-file pipeline and are re-exported here.

The re-exports are resolved on first use (PEP 562), so that importing a submodule, e.g. for the command line's
argument parsing, does not import diffusers and transformers.
"""

import importlib
from typing import TYPE_CHECKING


__all__ = [
    "DEFAULT_GUIDANCE_STRENGTH",
    "DEFAULT_TEMPERATURE",
    "DISTRIBUTION_SOLVERS",
    "GUIDANCE_MODES",
    "GUIDED_BRANCHES",
    "BalanceState",
    "BalancingActPipeline",
    "HClassifier",
    "MidBlockHook",
    "assign_classes",
    "guidance_loss",
    "install_h_hook",
    "largest_remainder",
    "remove_h_hook",
]

if TYPE_CHECKING:
    from pipeline_balancing_act import (
        DEFAULT_GUIDANCE_STRENGTH,
        DEFAULT_TEMPERATURE,
        DISTRIBUTION_SOLVERS,
        GUIDANCE_MODES,
        GUIDED_BRANCHES,
        BalanceState,
        BalancingActPipeline,
        HClassifier,
        MidBlockHook,
        assign_classes,
        guidance_loss,
        install_h_hook,
        largest_remainder,
        remove_h_hook,
    )


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("pipeline_balancing_act"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
