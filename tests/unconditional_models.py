"""A tiny unconditional `UNet2DModel` built in-process (no download), the pipelines around it, and an h-classifier
with a known closed-form update for its h.

UNet: 3 x 16 x 16 images, blocks of (32, 32, 64) channels, two downsamplings, so h = mid_block output is
[B, 64, 4, 4] (the paper's `google/ddpm-celebahq-256` gives [B, 512, 8, 8] after five).
"""

import math
import sys

import pytest
import torch
from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import dynamic_modules_utils

from pipeline_balancing_act import HClassifier
from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline


IMAGE_SIZE = 16
UNCONDITIONAL_H_SHAPE = [64, 4, 4]
# The known classifier: raw logits [0, SCALE * u.h] for a unit vector u, calibrated as raw * CAL_SCALE + [0, CAL_BIAS],
# anchors 0 (class 0) and GAP * u (class 1).
SCALE = 8.0
CAL_SCALE, CAL_BIAS = 0.5, 0.3
GAP = 2.0


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval()


def tiny_scheduler() -> DDPMScheduler:
    """What `google/ddpm-celebahq-256` ships (a DDPM scheduler, 1000 linear-beta steps); DDIMPipeline converts it."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def tiny_ddim_pipeline(seed: int = 0) -> DDIMPipeline:
    pipe = DDIMPipeline(unet=tiny_unet(seed), scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unconditional_pipeline(seed: int = 0) -> BalancingActUnconditionalPipeline:
    pipe = BalancingActUnconditionalPipeline(unet=tiny_unet(seed), scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def known_classifier(
    h_shape: list[int] = UNCONDITIONAL_H_SHAPE, seed: int = 7, timesteps: tuple[int, ...] = (999, 500, 1)
) -> tuple[HClassifier, torch.Tensor]:
    """K = 2 (light, dark), every head the same known linear map along a unit vector u (returned): every quantity of
    the update is known in closed form."""
    dim = math.prod(h_shape)
    u = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    u = u / u.norm()
    heads = len(timesteps)
    clf = HClassifier(
        attribute="skin", class_names=["light", "dark"], h_shape=list(h_shape), timesteps=list(timesteps)
    )
    with torch.no_grad():
        clf.weight.zero_()
        clf.weight[:, 1, :] = SCALE * u
        clf.bias.zero_()
    clf.set_calibration([CAL_SCALE] * heads, [[0.0, CAL_BIAS]] * heads)
    clf.set_anchors(torch.stack([torch.zeros(heads, dim), GAP * u.repeat(heads, 1)], dim=1), "test")
    return clf.eval(), u


def margin_dark(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Calibrated logit of dark minus light, per image."""
    return CAL_SCALE * SCALE * (h.flatten(1).float() @ u) + CAL_BIAS


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Dynamic modules are copied into a temporary HF_MODULES_CACHE, never into the user's cache (as in
    tests/test_loading_routes.py)."""
    cache = str(tmp_path / "modules")
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr(sys, "path", [*sys.path, cache])
    for name in [n for n in sys.modules if n.startswith("diffusers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    return cache
