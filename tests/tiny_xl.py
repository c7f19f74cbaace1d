"""Tiny Stable Diffusion XL components built in-process (no download), after diffusers' own SDXL test components.

Base UNet: SDXL's structure at a tiny size: `addition_embed_type="text_time"` (the pooled text embedding and six
micro-conditioning ids), cross-attention over both text encoders' hidden states (32 + 64 = 96 wide), blocks
("DownBlock2D", "CrossAttnDownBlock2D") of (32, 64) channels with (1, 2) transformer layers and one downsampling:
latents 4x8x8, so h = mid_block output is [B, 64, 4, 4], the tiny SD UNet's `H_SHAPE` (tests/tiny_models.py).
Text encoders: a `CLIPTextModel` (width 32) and a `CLIPTextModelWithProjection` (width 64, pooled projection 32),
each with its own copy of the committed tiny tokenizer. VAE: two blocks (vae_scale_factor 2, images 16x16).
Scheduler: Euler, "leading", as SDXL base's. Refiner: an img2img UNet on the second text encoder only, conditioned on
the aesthetic score (five ids), as SDXL's refiner is.
"""

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tiny_models import IMAGE_SIZE, tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipeline_balancing_act_xl import BalancingActXLPipeline


TEXT_WIDTHS = (32, 64)  # the two text encoders' hidden sizes; the UNet cross-attends to both, concatenated
PROJECTION_DIM = 32  # the second encoder's pooled embedding, SDXL's `text_embeds`
TIME_EMBED_DIM = 8  # per micro-conditioning id


def tiny_xl_unet(seed: int = 0, refiner: bool = False) -> UNet2DConditionModel:
    """Base: six time ids (original size, crop, target size) over both encoders. Refiner: five (original size, crop,
    aesthetic score) over the second encoder only."""
    torch.manual_seed(seed)
    ids = 5 if refiner else 6
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TEXT_WIDTHS[1] if refiner else sum(TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=ids * TIME_EMBED_DIM + PROJECTION_DIM,
        norm_num_groups=32,
    ).eval()


def tiny_text_config(tokenizer, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        vocab_size=len(tokenizer),
        projection_dim=PROJECTION_DIM,
    )


def tiny_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def tiny_xl_components(seed: int = 0) -> dict:
    """The components of a StableDiffusionXLPipeline, deterministic for a seed."""
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    unet = tiny_xl_unet(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, TEXT_WIDTHS[0]))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, TEXT_WIDTHS[1]))
    return {
        "unet": unet,
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": tiny_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(**tiny_xl_components(seed), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ba_xl_pipeline(seed: int = 0) -> BalancingActXLPipeline:
    """A BalancingActXLPipeline with the same weights as `tiny_sdxl_pipeline(seed)`, in modules of its own."""
    pipe = BalancingActXLPipeline(**tiny_xl_components(seed), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_refiner(base: StableDiffusionXLPipeline, seed: int = 1) -> StableDiffusionXLImg2ImgPipeline:
    """An SDXL refiner sharing the base's VAE and second text encoder (as SDXL's refiner does), with its own UNet."""
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=tiny_xl_unet(seed, refiner=True),
        scheduler=tiny_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner
