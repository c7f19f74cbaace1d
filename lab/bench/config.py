"""What a benchmark run measures and against what: the parts, scales and arms, the targets, the model shapes (SD1.5's,
google/ddpm-celebahq-256's and SDXL base's, with random weights), a run's configuration (`BenchConfig`, `--quick`'s
sizes), and how paths are written into its output."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h_classifiers.io_utils import portable_path
from lab import LAB_DOCS


PARTS = ("generation", "extraction", "training")
SCALES = ("toy", "sd15", "celebahq")
# What a run measures without --scales: "celebahq" (minutes per UNet call on a CPU) is measured when asked for.
DEFAULT_SCALES = ("toy", "sd15")
ARMS = ("vanilla", "distribution", "sample")
GUIDED_ARMS = ARMS[1:]
# The celebahq scale measures distribution mode only (the paper's debiasing), to keep its CPU run short.
CELEBAHQ_ARMS = ("vanilla", "distribution")
MEMORY_MODES = ("auto", "subprocess", "inprocess")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
WORKER_TAG = "BENCH_WORKER_RESULT "
DEFAULT_OUTPUT_DIR = LAB_DOCS / "bench"

# Targets (measured and reported in the table, never asserted in a test). Guided / vanilla, per call:
# on a GPU at SD1.5 shapes (fp16, batch 8 with classifier-free guidance) wall time and peak memory,
TARGET_GPU_SD15_WALL_RATIO = 1.02
TARGET_GPU_SD15_MEMORY_RATIO = 1.02
TARGET_GPU_SD15_BATCH = 8
TARGET_GPU_SD15_DTYPE = "float16"
# the toy model on a GPU (a small UNet: the guidance step's fixed costs weigh more),
TARGET_GPU_TOY_WALL_RATIO = 1.10
# and on a CPU at SD1.5 shapes.
TARGET_CPU_SD15_WALL_RATIO = 1.03
TARGET_EXTRACTION_SPEEDUP = 5.0
# A timed figure from fewer rounds than this is reported, but its target is "not judged".
MIN_TIMED_ROUNDS = 5
# "Training memory bounded by about one timestep slice plus the model": the peak increment may hold the slice a few
# times over (the loaded slice, its training split, the rows being predicted), never the whole feature set.
TARGET_TRAINING_SLICES = 4.0

# Stable Diffusion 1.5's UNet (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json), random weights.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_TEXT_SHAPE = (77, 768)  # CLIP ViT-L/14 text encoder output per prompt
# --quick: the same block structure at a tiny width (h is [*, 64, 2, 2] at 128 px).
TINY_SD15_UNET_CONFIG: dict[str, Any] = dict(
    SD15_UNET_CONFIG,
    sample_size=16,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=32,
)
TINY_TEXT_SHAPE = (77, 32)
# The paper's unconditional model, google/ddpm-celebahq-256 (a DDPMPipeline), with random weights. Its unet config, as
# diffusers saved it from the Hub snapshot cd5c944777ea2668051904ead6cc120739b86c4d in a fine-tune of the model
# (`_name_or_path` .../models--google--ddpm-celebahq-256/snapshots/cd5c944...: huggingface.co/jl8771/
# ddpm-celebahq-finetuned-butterflies-2epochs/blame/1e8c6eb1227076468a87043b6d9fd52aff7df658/config.json); the same
# values as google/ddpm-cat-256's published config. `attention_head_dim` is null there (one head: diffusers then uses
# the block's channels), not UNet2DModel's default 8, and `norm_eps` is 1e-6, not the default 1e-5. Five
# downsamplings of 256 px: h is [*, 512, 8, 8].
CELEBAHQ_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "down_block_types": (
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
}
# Its scheduler_config.json (a DDPMScheduler saved by diffusers 0.1.1: a copy on the Hub,
# huggingface.co/Mou11209203/ddpm-celebahq-256/blob/807d47f96bd0ee54f1d58bca7c8391d1a4e63c62/scheduler_config.json,
# and the same values as google/ddpm-cat-256's and google/ddpm-church-256's). DDIMPipeline, and so both pipelines
# here, turn it into a DDIMScheduler with this config.
CELEBAHQ_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "variance_type": "fixed_small",
}
# --quick: the same blocks at a tiny width and 64 px (h is [*, 64, 2, 2]).
TINY_CELEBAHQ_UNET_CONFIG: dict[str, Any] = dict(
    CELEBAHQ_UNET_CONFIG, sample_size=64, block_out_channels=(32, 32, 32, 32, 64, 64), layers_per_block=1
)
# Stable Diffusion 1.5's noise schedule; DDIM so that `num_inference_steps` is exactly the number of UNet steps.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# Stable Diffusion XL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), random weights
# (lab/bench_xl.py; tests/test_xl_real_shapes.py). Two downsamplings: h is [*, 1280, 32, 32] at 1024 px (latents
# 128x128), [*, 1280, 16, 16] at 512. Cross-attention over both text encoders' hidden states (CLIP ViT-L 768 + OpenCLIP
# bigG 1280 = 2048); `text_time` added conditioning: the pooled bigG embedding (1280) and six micro-conditioning ids of
# 256 each (6 x 256 + 1280 = 2816). `attention_head_dim` is diffusers' historical name for the number of heads.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_POOLED_DIM = 1280  # the second text encoder's projection (`text_embeds`)
SDXL_TIME_IDS = 6  # original size, crop top-left, target size
# Its scheduler (scheduler/scheduler_config.json: EulerDiscreteScheduler, "leading" spacing): the arguments Euler
# takes.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def scaled_sdxl_unet_config(divisor: int = 8) -> dict[str, Any]:
    """SDXL base's UNet with every width divided by `divisor` (channels, cross-attention, time and pooled embeddings,
    norm groups; the head counts kept, so each head is `divisor` times narrower) and one transformer layer per block:
    the same blocks, downsamplings and channel pattern (1 : 2 : 4), so h is [*, 1280 / divisor, H / 4, W / 4]."""
    config = dict(SDXL_UNET_CONFIG)
    time_embed = config["addition_time_embed_dim"] // divisor
    config.update(
        block_out_channels=tuple(c // divisor for c in config["block_out_channels"]),
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=config["norm_num_groups"] // divisor,
        cross_attention_dim=config["cross_attention_dim"] // divisor,
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * time_embed + SDXL_POOLED_DIM // divisor,
    )
    return config


@dataclass
class BenchConfig:
    """Everything a run (and each of its worker processes) needs; sizes are resolved from --quick and the flags."""

    threads: int
    device: str
    dtype: str
    quick: bool
    parts: list[str]
    scales: list[str]
    output_dir: str
    toy_model: str
    toy_classifier: str
    memory: str
    seed: int = 0
    toy_batch: int = 64
    toy_steps: int = 25
    toy_rounds: int = 5
    toy_warmup: int = 1
    # On CPU one SD1.5 UNet call of 2 rows (1 image with classifier-free guidance) takes about 15 s on 2 cores: 1 step
    # per call keeps 1 warm-up + 1 counting + 5 timed rounds of 3 arms near 6 minutes. The ratio is per call (with 1
    # step, the guidance's per-call costs weigh most; distribution mode then carries a BalanceState, see
    # GenerationScale). CUDA: batch 8, 20 steps (`resolve_config`).
    sd15_batch: int = 1
    sd15_steps: int = 1
    sd15_rounds: int = 5
    sd15_warmup: int = 1
    # google/ddpm-celebahq-256 shapes (256 px, no classifier-free guidance): one UNet call on 2 images takes about a
    # minute on one busy CPU core, so the CPU default is 1 step per call and 2 timed rounds (1 warm-up + 1 counting +
    # 2 timed rounds of 2 arms: 8 calls). Only the vanilla and distribution arms (`CELEBAHQ_ARMS`).
    celebahq_batch: int = 2
    celebahq_steps: int = 1
    celebahq_rounds: int = 2
    celebahq_warmup: int = 1
    extraction_images: int = 32
    extraction_steps: int = 25
    extraction_batches: list[int] = field(default_factory=lambda: [1, 16])
    extraction_rounds: int = 5
    training_samples: int = 2000
    training_timesteps: int = 2
    training_nominal_timesteps: int = 50
    training_h_shape: list[int] = field(default_factory=lambda: [1280, 8, 8])
    training_epochs: int = 40
    training_chunk: int = 250


QUICK_SIZES: dict[str, Any] = {
    "toy_batch": 4,
    "toy_steps": 3,
    "toy_rounds": 2,
    "toy_warmup": 1,
    "sd15_batch": 2,
    "sd15_steps": 2,
    "sd15_rounds": 2,
    "sd15_warmup": 1,
    "celebahq_batch": 2,
    "celebahq_steps": 2,
    "celebahq_rounds": 2,
    "celebahq_warmup": 1,
    "extraction_images": 4,
    "extraction_steps": 2,
    "extraction_batches": [1, 4],
    "extraction_rounds": 1,
    "training_samples": 40,
    "training_timesteps": 2,
    "training_nominal_timesteps": 50,
    "training_h_shape": [64, 2, 2],
    "training_epochs": 2,
    "training_chunk": 16,
}


def written_path(path: str | os.PathLike) -> str:
    """A path as the output records it: relative to the repository inside it (`io_utils.portable_path`), else only its
    last component, so that no generated file shows an absolute path of the machine that wrote it."""
    text = portable_path(path)
    return f".../{Path(text).name}" if os.path.isabs(text) else text


def written_config(config: BenchConfig) -> dict[str, Any]:
    """The run's configuration as bench.json records it (paths by `written_path`)."""
    data = asdict(config)
    for key in ("output_dir", "toy_model", "toy_classifier"):
        data[key] = written_path(data[key])
    return data
