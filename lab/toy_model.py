"""The toy world's models: how they are built (the lab's: the package ships the trained models, not their recipes).

- The miniature Stable Diffusion (`h_classifiers/assets/toy-sd`, text-to-image, latent space): its tokenizer, VAE,
  text encoder, UNet and scheduler. Trained by `lab/train_toy_model.py`.
- The unconditional pixel-space DDPM (`h_classifiers/assets/toy-ddpm`, the paper's unconditional setting): its
  `UNet2DModel` and scheduler. Trained by `lab/train_toy_ddpm.py`.

diffusers and transformers are imported inside the builders.
"""

from __future__ import annotations

import torch

from h_classifiers.toy_world import IMAGE_SIZE, caption_vocabulary


MAX_TOKENS = 24
TRAIN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
# The unconditional pixel model's noise schedule: DDPM's linear betas, like the paper's CelebA-HQ model.
PIXEL_TRAIN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def build_tokenizer():
    """A tiny CLIP BPE tokenizer whose merges spell every caption word as one token (characters as fallback)."""
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab: dict[str, int] = {bos: 0, eos: 1}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for ch in "abcdefghijklmnopqrstuvwxyz":
        add(ch)
        add(ch + "</w>")
    for word in caption_vocabulary():
        # Merge left to right: w + o -> wo, wo + r -> wor, ..., the last character carries the end-of-word mark.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            if pair not in merges:
                merges.append(pair)
            current += piece
            add(current)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # (16, 32, 64) rather than (32, 64, 64): 2x faster on CPU and still exact on these flat-colour faces.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(tokenizer, hidden_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int, layers_per_block: int):
    """The toy text-to-image UNet on 4x8x8 latents (`h_classifiers/assets/toy-sd`): one downsampling, 8 -> 4, so h
    (the mid-block output) is `[B, 64, 4, 4]`; cross-attention at the 4x4 level and in the mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_scheduler():
    """The sampling scheduler saved with the model: DDIM over the training noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **TRAIN_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )


def build_pixel_unet():
    """The unconditional toy DDPM's `UNet2DModel` on 3x32x32 images (2.7 M parameters, 10.8 MB in fp32).

    Shaped like the paper's CelebA-HQ model where it matters: h (the mid-block output) comes after three
    downsamplings, 32 -> 16 -> 8 -> 4, so **h is `[B, 128, 4, 4]`**; with the deep skips cut in training
    (`cut_deep_skips`), the bottleneck, not a shallow skip connection, carries the face. Self-attention only at the 4x4 level and in the mid block. The 32x32 and 16x16 levels are half
    as wide as in (32, 64, 64, 128): they dominate the cost of a training step on a CPU (1.7 times faster).
    """
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64, 128),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_pixel_scheduler():
    """The sampling scheduler saved with the pixel model: DDIM over DDPM's linear betas (1e-4 to 0.02, 1,000 steps),
    with the predicted image clipped to [-1, 1] and the final step to alpha 1, as diffusers' DDIM for pixel DDPMs."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **PIXEL_TRAIN_SCHEDULER_CONFIG,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )


def cut_deep_skips(unet, levels: int) -> list[tuple[torch.Tensor, int]]:
    """Zero the weights through which the `levels` lowest-resolution up blocks read their skip connections, and
    return them as (weight, first skip input channel) pairs for `hold_cut` to keep at zero while training.

    Those skips carry the encoder's deepest features, which are the mid block's own input: while they reach the
    decoder, a toy decoder draws the face without h, and no move of h changes it (a toy face is simple enough for a
    shallow path to carry it). With them cut, the semantics
    must pass through h; the high-resolution skips still carry the noise's detail. The model stays a standard
    `UNet2DModel` or `UNet2DConditionModel` (the cut is zeros in its weights). Each up block's resnet reads `cat([hidden, skip])`, so the skip
    is the last input channels; the group norm before the convolution still mixes the two where a group spans both.
    """
    reversed_channels = list(reversed(unet.config.block_out_channels))
    cut = []
    for i in range(levels):
        for j, resnet in enumerate(unet.up_blocks[i].resnets):
            hidden = reversed_channels[max(i - 1, 0)] if j == 0 else reversed_channels[i]
            for conv in (resnet.conv1, resnet.conv_shortcut):
                if conv is not None:
                    cut.append((conv.weight, hidden))
    hold_cut(cut)
    return cut


@torch.no_grad()
def hold_cut(cut: list[tuple[torch.Tensor, int]]) -> None:
    """Set the cut skip weights (`cut_deep_skips`) back to zero."""
    for weight, first in cut:
        weight[:, first:] = 0


def add_cut_skips_argument(parser) -> None:
    """`--cut-skips N`, the same option in both toy trainers (`cut_deep_skips`)."""
    parser.add_argument(
        "--cut-skips",
        type=int,
        default=0,
        help="Cut the skip connections into this many lowest-resolution up blocks (`lab.toy_model.cut_deep_skips`), "
        "so the decoder reads the deep features through h only.",
    )
