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

import pipeline_balancing_act as pba  # noqa: E402
from pipeline_balancing_act import BalancingActPipeline  # noqa: E402


SHARED_PIPELINES = []  # (pipeline, its state when built): checked after every test by `shared_pipelines_unchanged`


def shared_state(pipe) -> dict:
    """What a test must leave as it found it on a shared pipeline (generation itself changes none of it)."""
    unet = pipe.unet
    return {
        "components": {name: id(module) for name, module in pipe.components.items()},
        # (save_pretrained adds private keys such as `_diffusers_version`: not a change)
        "scheduler": (type(pipe.scheduler).__name__, {k: v for k, v in pipe.scheduler.config.items() if k[0] != "_"}),
        "progress_bar": dict(getattr(pipe, "_progress_bar_config", {})),
        "classifier_cache": dict(getattr(pipe, "_h_classifier_cache", {})),
        "unet": (unet.dtype, unet.device, len(unet._forward_hooks), len(unet._forward_pre_hooks)),
        # A call installs Balancing Act's hook for its own duration only: any hook left on the mid block, or an h
        # function left active after a call, is a leak.
        "mid_block_hooks": list(unet.mid_block._forward_hooks.values()),
        "active_h_functions": pba._ACTIVE_H_FUNCTIONS.get(),
        "offload_or_lora": (hasattr(unet, "_hf_hook"), getattr(unet, "peft_config", None) is not None),
    }


def share(pipe):
    SHARED_PIPELINES.append((pipe, shared_state(pipe)))
    return pipe


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Commands set torch's thread count (`--threads`); every test leaves it as it found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd_pipe():
    """A tiny StableDiffusionPipeline (shared: do not modify its components in a test; checked after each test)."""
    return share(tiny_sd_pipeline())


@pytest.fixture(scope="session")
def ba_pipe(sd_pipe):
    """A BalancingActPipeline sharing the components of `sd_pipe` (shared: do not modify it; use `fresh_ba_pipe`)."""
    pipe = BalancingActPipeline.from_pipe(sd_pipe)
    pipe.set_progress_bar_config(disable=True)
    return share(pipe)


@pytest.fixture(autouse=True)
def shared_pipelines_unchanged():
    yield
    for i, (pipe, state) in enumerate(SHARED_PIPELINES):
        now = shared_state(pipe)
        if now != state:
            SHARED_PIPELINES[i] = (pipe, now)  # report the test that changed it, not every test after it
            changed = [key for key in state if now[key] != state[key]]
            pytest.fail(f"this test modified a shared pipeline fixture ({changed}); use `fresh_ba_pipe`")


@pytest.fixture
def fresh_ba_pipe():
    """A BalancingActPipeline with its own tiny components, free to modify (scheduler, LoRA, dtype)."""
    pipe = BalancingActPipeline(**tiny_components(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def classifier():
    return tiny_classifier()
