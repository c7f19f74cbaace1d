"""Stable Diffusion XL base 1.0's UNet shapes, without its weights (nothing is downloaded): the real config
(`SDXL_UNET_CONFIG` in lab/bench/config.py) built on the meta device gives the h that `mid_block_h_shape` predicts at
several resolutions, and the same blocks at an eighth of the width, with random weights, run a guided step with one
classifier per resolution."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from tiny_models import CLASSIFIER_TIMESTEPS, HRecorder, guidance_is_off, tiny_classifier

import pipeline_balancing_act as pba
from lab.bench.config import (
    SDXL_POOLED_DIM,
    SDXL_SCHEDULER_CONFIG,
    SDXL_TIME_IDS,
    SDXL_UNET_CONFIG,
    scaled_sdxl_unet_config,
)
from pipeline_balancing_act_xl import BalancingActXLPipeline


DIVISOR = 8  # the width of the scaled UNet: every channel count / 8, one transformer layer per block


def xl_pipeline(unet: UNet2DConditionModel) -> BalancingActXLPipeline:
    """The pipeline around a UNet alone: no VAE (vae_scale_factor 8, SDXL's; latents out), no text encoders (prompt
    embeddings given), SDXL's scheduler."""
    pipe = BalancingActXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "height, width, h_shape",
    [
        (1024, 1024, [1280, 32, 32]),  # SDXL's native size
        (512, 512, [1280, 16, 16]),
        (1024, 768, [1280, 32, 24]),
        (1000, 1000, [1280, 32, 32]),  # latents 125: each downsampler rounds up (125 -> 63 -> 32)
    ],
)
def test_the_real_config_gives_the_h_that_mid_block_h_shape_predicts(height, width, h_shape):
    with torch.device("meta"):  # 2.6 B parameters, no memory: shapes only
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) > 2.5e9
    assert xl_pipeline(unet).h_shape(height, width) == h_shape
    assert pba.mid_block_h_shape(unet, height // 8, width // 8) == h_shape
    seen = []
    with torch.device("meta"), pba.MidBlockHook(unet, lambda h: seen.append(list(h.shape))):
        rows = 2  # one image with classifier-free guidance
        unet(
            torch.empty(rows, 4, height // 8, width // 8),
            torch.tensor(999.0),
            encoder_hidden_states=torch.empty(rows, 77, SDXL_UNET_CONFIG["cross_attention_dim"]),
            added_cond_kwargs={"text_embeds": torch.empty(rows, SDXL_POOLED_DIM), "time_ids": torch.empty(rows, 6)},
        )
    assert seen == [[rows, *h_shape]]
    assert guidance_is_off(unet)


@pytest.fixture(scope="module")
def scaled_pipe() -> BalancingActXLPipeline:
    torch.manual_seed(0)
    return xl_pipeline(UNet2DConditionModel(**scaled_sdxl_unet_config(DIVISOR)).eval())


def prompt_embeds(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text, pooled = (1, 77, config["cross_attention_dim"]), (1, SDXL_POOLED_DIM // DIVISOR)
    return {
        "prompt_embeds": torch.randn(text, generator=generator),
        "negative_prompt_embeds": torch.randn(text, generator=generator),
        "pooled_prompt_embeds": torch.randn(pooled, generator=generator),
        "negative_pooled_prompt_embeds": torch.randn(pooled, generator=generator),
    }


# Flat classifiers: one per resolution, as h's size changes with the image's; a pooled one reads both (below).
@pytest.mark.parametrize("latent_size, h_shape", [((32, 32), [160, 8, 8]), ((32, 48), [160, 8, 12])])
def test_a_guided_step_runs_on_the_scaled_sdxl_unet_at_two_resolutions(scaled_pipe, latent_size, h_shape):
    height, width = (8 * n for n in latent_size)
    assert scaled_pipe.h_shape(height, width) == h_shape
    classifier = tiny_classifier(("female", "male"), "gender", h_shape=h_shape, scale=math.prod(h_shape) ** -0.5)
    call = {
        "height": height,
        "width": width,
        "num_inference_steps": 1,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(0),
        **prompt_embeds(scaled_pipe.unet.config),
    }
    assert SDXL_TIME_IDS * scaled_pipe.unet.config.addition_time_embed_dim + SDXL_POOLED_DIM // DIVISOR == (
        scaled_pipe.unet.add_embedding.linear_1.in_features
    )
    with HRecorder(scaled_pipe.unet) as rec:
        latents = scaled_pipe(h_classifier=classifier, guidance_mode="sample", target_classes="male", **call).images
    assert [list(h.shape) for h in rec.before + rec.after] == [[2, *h_shape]] * 2  # [uncond; cond], moved
    assert torch.equal(rec.after[0][:1], rec.before[0][:1])  # the unconditional row stays
    move = (rec.after[0][1:] - rec.before[0][1:]).flatten()
    anchors = classifier.anchors[classifier.head_index(rec.timesteps[0])]
    assert move.norm() > 0 and float(move @ (anchors[1] - anchors[0])) > 0  # along the anchors, towards "male"
    assert list(latents.shape) == [1, 4, *latent_size] and torch.isfinite(latents).all()
    assert guidance_is_off(scaled_pipe.unet)
    other = [h_shape[0], 8, 20 - h_shape[2]]  # the other resolution's h: a flat classifier fits one only
    with pytest.raises(ValueError, match=rf"h of shape \[{h_shape[0]}, 8, {20 - h_shape[2]}\] but this UNet gives"):
        scaled_pipe(h_classifier=tiny_classifier(h_shape=other), guidance_mode="sample", target_classes=1, **call)


def pooled_classifier(channels: int, grid: int = 8) -> pba.HClassifier:
    """A pooled classifier (heads over h averaged to grid x grid) with random heads, an identity calibration, and the
    heads as anchors (so a move along the anchors raises the asked class's logit margin)."""
    classifier = pba.HClassifier(
        attribute="gender",
        class_names=["female", "male"],
        h_shape=[channels, 8, 8],
        timesteps=list(CLASSIFIER_TIMESTEPS),
        pool_size=grid,
    )
    generator = torch.Generator().manual_seed(0)
    shape = classifier.weight.shape
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(shape, generator=generator) * shape[-1] ** -0.5)
        classifier.bias.zero_()
    classifier.set_calibration([1.0] * shape[0], [[0.0] * shape[1]] * shape[0])
    classifier.set_anchors(classifier.weight.detach().clone(), "heads")
    return classifier.eval()


def test_one_pooled_classifier_guides_the_scaled_sdxl_unet_at_both_resolutions(scaled_pipe):
    classifier = pooled_classifier(channels=160)
    for latent_size, h_shape in (((32, 32), [160, 8, 8]), ((32, 48), [160, 8, 12])):
        height, width = (8 * n for n in latent_size)
        call = {
            "height": height,
            "width": width,
            "num_inference_steps": 1,
            "output_type": "latent",
            "generator": torch.Generator().manual_seed(0),
            **prompt_embeds(scaled_pipe.unet.config),
        }
        with HRecorder(scaled_pipe.unet) as rec:
            scaled_pipe(h_classifier=classifier, guidance_mode="sample", target_classes="male", **call)
        before, after = rec.before[0][1:], rec.after[0][1:]
        assert list(before.shape) == [1, *h_shape]
        # the move, read through the pooling, is along the pooled anchors, towards "male"
        pooled_move = torch.nn.functional.adaptive_avg_pool2d(after - before, 8).flatten()
        anchors = classifier.anchors[classifier.head_index(rec.timesteps[0])]
        assert pooled_move.norm() > 0 and float(pooled_move @ (anchors[1] - anchors[0])) > 0
        logits = [classifier(h, rec.timesteps[0]) for h in (before, after)]
        assert float((logits[1][0, 1] - logits[1][0, 0]) - (logits[0][0, 1] - logits[0][0, 0])) > 0
        assert guidance_is_off(scaled_pipe.unet)
