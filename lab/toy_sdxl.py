"""The toy Stable Diffusion XL: how it is built (the lab's, like `lab.toy_model` for the toy SD). Trained by
`lab/train_toy_sdxl.py`; the trained model goes to `lab/assets/toy-sdxl` (outside the wheel).

SDXL's structure at the toy's scale, on the toy SD's 4x8x8 latents (its VAE, reused as is):

- two tiny CLIP text encoders, `CLIPTextModel` and `CLIPTextModelWithProjection`, each with the toy SD's tokenizer
  (`lab.toy_model.build_tokenizer`); the UNet attends to both penultimate layers concatenated, and the pooled,
  projected embedding of the second goes to the UNet's added conditioning, as in SDXL;
- a `UNet2DConditionModel` with SDXL's layout: three resolution levels (no attention at the first, cross-attention at
  the two others), a cross-attention mid block, linear projections in the transformers, and the "text_time" added
  conditioning (the pooled text embedding and the six micro-conditioning numbers: original size, crop top-left,
  target size);
- aspect-ratio buckets (`BUCKETS`): the square 32x32 faces, a wider 32x48 and a taller 48x32 canvas with the same
  face in its centre (`h_classifiers.toy_world.render_faces(canvas=...)`).

diffusers and transformers are imported inside the builders.
"""

from __future__ import annotations

from h_classifiers.toy_world import IMAGE_SIZE
from lab.toy_model import MAX_TOKENS, TRAIN_SCHEDULER_CONFIG


# name -> (height, width) in pixels; the VAE divides each side by 4 (latents 8x8, 8x12, 12x8).
BUCKETS: dict[str, tuple[int, int]] = {
    "square": (IMAGE_SIZE, IMAGE_SIZE),
    "wide": (IMAGE_SIZE, IMAGE_SIZE + 16),
    "tall": (IMAGE_SIZE + 16, IMAGE_SIZE),
}
# One bucket per training step, in this cycle: half of the steps square, a quarter each of the others.
BUCKET_CYCLE: tuple[str, ...] = ("square", "wide", "square", "tall")
VAE_SCALE_FACTOR = 4  # the toy SD's VAE: three blocks, two downsamplings

TEXT_HIDDEN_SIZE = 32  # each encoder; the UNet's cross_attention_dim is their sum
TEXT_LAYERS = 3  # SDXL reads the penultimate layer: two layers of context, the last one feeds the pooled projection
PROJECTION_DIM = 32  # text_encoder_2's pooled, projected embedding
ADDITION_TIME_EMBED_DIM = 8  # each of the six micro-conditioning numbers gets a sinusoidal embedding this wide
BLOCK_OUT_CHANNELS = (32, 64, 64)
ATTENTION_HEADS = (2, 4, 4)  # diffusers' `attention_head_dim` (heads in fact, as SDXL's config): 16 channels each


def build_text_encoder(tokenizer, with_projection: bool):
    """Encoder 1 (`CLIPTextModel`) or encoder 2 (`CLIPTextModelWithProjection`): hidden 32, 3 layers, 24 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=PROJECTION_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_unet():
    """The toy SDXL's UNet on 4x8x8 latents: 8 -> 4 -> 2, so h (the mid-block output) is `[B, 64, 2, 2]` for the
    square bucket and `[B, 64, 2, 3]` / `[B, 64, 3, 2]` for the wide / tall ones (8x12 -> 4x6 -> 2x3). 1.71 M
    parameters: (32, 64, 64) rather than (32, 64, 96) keeps the model, with the VAE, at about 10 MB in fp32."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_SCALE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=ATTENTION_HEADS,
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + PROJECTION_DIM,
        norm_num_groups=16,
    )


def build_scheduler():
    """The sampling scheduler saved with the model: DDIM over SDXL's training noise schedule (the SD 1.x betas), set
    as SDXL's scheduler config sets its Euler one (steps_offset 1, "leading" spacing).

    DDIM rather than SDXL's default `EulerDiscreteScheduler`: the toy worlds' reproduction table samples with DDIM 25
    steps by default (`lab.reproduce.rows.Sampler`) and the folder recipe inverts with DDIM, so the stock pipeline
    samples what they measure; `EulerDiscreteScheduler.from_config(pipe.scheduler.config)` gives SDXL's sampler.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **TRAIN_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )


def add_time_ids(height: int, width: int):
    """SDXL's micro-conditioning of a bucket, as `StableDiffusionXLPipeline` builds it by default for an image of
    that size: original size, crop top-left (0, 0), target size. A float tensor [6]."""
    import torch

    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def encode_text(text_encoder, text_encoder_2, input_ids, input_ids_2):
    """(prompt_embeds [B, T, 64], pooled_prompt_embeds [B, 32]) exactly as `StableDiffusionXLPipeline.encode_prompt`
    computes them (clip_skip None): both encoders' penultimate hidden states, concatenated, and encoder 2's projected
    pooled output."""
    import torch

    out_1 = text_encoder(input_ids, output_hidden_states=True)
    out_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
    return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds
