"""Shared test fixtures: tiny Stable Diffusion pipelines and h-classifiers built in-process (no network)."""

import os
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
# The single-file pipeline lives at the repository root (installed as a py_module; this also covers a bare checkout).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models are fastest on one thread; more threads only spin when the CPU cores are shared.
torch.set_num_threads(1)

from tiny_models import tiny_classifier, tiny_components, tiny_sd_pipeline  # noqa: E402

from pipeline_balancing_act import BalancingActPipeline  # noqa: E402


@pytest.fixture(scope="session")
def sd_pipe():
    """A tiny StableDiffusionPipeline (shared: do not modify its components in a test)."""
    return tiny_sd_pipeline()


@pytest.fixture(scope="session")
def ba_pipe(sd_pipe):
    """A BalancingActPipeline sharing the components of `sd_pipe` (shared: do not modify its components)."""
    pipe = BalancingActPipeline.from_pipe(sd_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fresh_ba_pipe():
    """A BalancingActPipeline with its own tiny components, free to modify (scheduler, LoRA, dtype)."""
    pipe = BalancingActPipeline(**tiny_components(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def classifier():
    return tiny_classifier()
