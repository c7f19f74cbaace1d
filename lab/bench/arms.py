"""The arms of the generation part, at each scale: the stock pipeline (vanilla) and the Balancing Act pipeline built from
it with `from_pipe` (the same modules), the classifier they guide with (the toy's own, or one made as `balancing-act
train` makes one on synthetic h of the UNet's shape), and one call of an arm (`run_arm`)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from h_classifiers.generation import generate_batches
from lab.bench.config import (
    ARMS,
    CELEBAHQ_ARMS,
    CELEBAHQ_SCHEDULER_CONFIG,
    CELEBAHQ_UNET_CONFIG,
    SD15_SCHEDULER_CONFIG,
    SD15_TEXT_SHAPE,
    SD15_UNET_CONFIG,
    TINY_CELEBAHQ_UNET_CONFIG,
    TINY_SD15_UNET_CONFIG,
    TINY_TEXT_SHAPE,
    BenchConfig,
    written_path,
)


@dataclass
class GenerationScale:
    """Both pipelines of one scale (sharing modules), the classifier and the common call arguments."""

    name: str
    stock: Any
    guided: Any
    classifier: Any  # an HClassifier, or a path the pipeline loads (and caches) itself
    classifier_info: dict[str, Any]
    call_kwargs: dict[str, Any]
    num_images: int
    steps: int
    guidance_scale: float
    h_shape: list[int]
    notes: list[str]
    build_s: float = 0.0
    # The arms measured, vanilla first.
    arms: tuple[str, ...] = ARMS
    # Below 2 images per call distribution mode needs a BalanceState: one, carried across all the arm's calls, as
    # for a job generated one image at a time.
    balance_state: Any = None

    def __post_init__(self) -> None:
        if self.num_images < 2:
            from pipeline_balancing_act import BalanceState

            self.balance_state = BalanceState()
            self.notes.append(
                "distribution mode at 1 image per call carries one BalanceState across its calls (as a job generated "
                "one image at a time; the pipeline needs it below 2 images per call)"
            )


def torch_dtype(config: BenchConfig) -> torch.dtype:
    from h_classifiers.evaluation import DTYPES

    return DTYPES[config.dtype]


def random_classifier(h_shape: list[int], scheduler, seed: int, attribute: str, class_names: list[str]):
    """An HClassifier made the way `balancing-act train` makes one, on seeded synthetic h of the UNet's shape, so that
    guidance takes its default path (calibrated logits, moves between class anchors).

    The synthetic h are Gaussian (unit variance) with class means apart along random directions. As in
    `training.train_classifier`: a class-mean head (`train_class_mean_head`, what `train --head class_mean` fits) on the
    training rows, the class anchors of those rows (`class_anchors`, source "class_means_spread") and a calibration
    fitted on held-out rows (`fit_calibration`). The one synthetic timestep's head, anchors and calibration serve every
    timestep of the scheduler's 50-step schedule: guidance costs the same whatever their values.
    """
    from h_classifiers.calibration import class_anchors, fit_calibration
    from h_classifiers.training import TrainingConfig, train_class_mean_head
    from pipeline_balancing_act import HClassifier

    planned = copy.deepcopy(scheduler)
    planned.set_timesteps(50)
    classifier = HClassifier(
        attribute=attribute,
        class_names=class_names,
        h_shape=h_shape,
        timesteps=[float(t) for t in planned.timesteps.tolist()],
        base_model="random (benchmark)",
    )
    num_heads, num_classes, dim = classifier.weight.shape
    train_per_class, held_per_class = 32, 16
    # Class means about `gap` apart: the class-mean head of `train_per_class` rows per class then separates held-out
    # rows by about 2 standard deviations (about 84% accuracy), in any dimension: gap^2 / sqrt(gap^2 + 2 dim / n) = 2.
    gap = math.sqrt(2 + 2 * math.sqrt(1 + 2 * dim / train_per_class))
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    centres *= gap / math.sqrt(2) / centres.norm(dim=1, keepdim=True)
    per_class = train_per_class + held_per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    h = torch.randn(len(labels), dim, generator=generator) + centres[labels]
    within = torch.arange(len(labels)) % per_class
    train_rows = (within < train_per_class).nonzero().flatten()
    held_rows = (within >= train_per_class).nonzero().flatten()
    weight, bias = train_class_mean_head(h, labels, train_rows, num_classes, TrainingConfig(head="class_mean"))
    anchors = class_anchors(h, labels, train_rows, num_classes)
    scale, offsets = fit_calibration(h[held_rows] @ weight.T + bias, labels[held_rows])
    with torch.no_grad():
        classifier.weight.copy_(weight.expand(num_heads, -1, -1))
        classifier.bias.copy_(bias.expand(num_heads, -1))
    classifier.set_calibration([scale] * num_heads, [offsets] * num_heads)
    classifier.set_anchors(anchors.expand(num_heads, -1, -1), "class_means_spread")
    return classifier.eval()


def classifier_description(classifier: Any) -> dict[str, Any]:
    """Whether a classifier (or the config of one saved at a path) has a calibration and anchors."""
    from pipeline_balancing_act import HClassifier

    config = HClassifier.load_config(classifier) if isinstance(classifier, str) else dict(classifier.config)
    return {
        "calibrated": config.get("calibration_scale") is not None,
        "anchor_source": config.get("anchor_source"),
        "num_heads": len(config["timesteps"]),
    }


def _finish_pipelines(stock, config: BenchConfig):
    from pipeline_balancing_act import BalancingActPipeline

    dtype = torch_dtype(config)
    stock = stock.to(config.device)
    stock.set_progress_bar_config(disable=True)
    # `from_pipe` casts the shared modules to its `dtype` (default float32): pass the run's dtype.
    guided = BalancingActPipeline.from_pipe(stock, dtype=dtype)
    guided.set_progress_bar_config(disable=True)
    return stock, guided


def toy_model_missing(config: BenchConfig) -> str | None:
    """Why the toy model cannot be used (its directory lacks model_index.json), or None."""
    model = Path(config.toy_model)
    return (
        None
        if (model / "model_index.json").is_file()
        else f"toy model not found at {written_path(model)} (no model_index.json)"
    )


def build_toy_scale(config: BenchConfig) -> GenerationScale:
    from diffusers import StableDiffusionPipeline

    from h_classifiers.toy_world import NEUTRAL_PROMPT

    start = time.perf_counter()
    model = Path(config.toy_model)
    if missing := toy_model_missing(config):
        raise FileNotFoundError(missing)
    stock = StableDiffusionPipeline.from_pretrained(
        model, dtype=torch_dtype(config), safety_checker=None, requires_safety_checker=False
    )
    stock, guided = _finish_pipelines(stock, config)
    size = stock.unet.config.sample_size * stock.vae_scale_factor
    h_shape = guided.h_shape(size, size)
    classifier, info = _toy_classifier(config, h_shape, stock.scheduler)
    num_images = config.toy_batch
    return GenerationScale(
        name="toy",
        stock=stock,
        guided=guided,
        classifier=classifier,
        classifier_info=info,
        call_kwargs={
            "prompt": [NEUTRAL_PROMPT] * num_images,
            "num_inference_steps": config.toy_steps,
            "guidance_scale": 7.5,
            "output_type": "pil",
        },
        num_images=num_images,
        steps=config.toy_steps,
        guidance_scale=7.5,
        h_shape=h_shape,
        notes=[f"model {model.name}: full pipeline (text encoder, UNet, VAE decode to PIL), classifier-free guidance"],
        build_s=time.perf_counter() - start,
    )


def _toy_classifier(config: BenchConfig, h_shape: list[int], scheduler) -> tuple[Any, dict[str, Any]]:
    """The shipped classifier (passed as its path: the pipeline loads and caches it), or a random one that fits."""
    from pipeline_balancing_act import HClassifier

    path = Path(config.toy_classifier)
    reason = f"no classifier at {written_path(path)}"
    if (path / "config.json").is_file():
        shipped = HClassifier.load_config(path)
        if list(shipped["h_shape"]) == list(h_shape):
            info = {"source": "shipped", "path": written_path(path), "class_names": shipped["class_names"]}
            return str(path), info | classifier_description(str(path))
        reason = f"the classifier at {written_path(path)} has h_shape {shipped['h_shape']}, the model gives {h_shape}"
    classifier = random_classifier(h_shape, scheduler, config.seed, "skin", ["light", "dark"])
    info = {"source": "random", "reason": reason, "class_names": ["light", "dark"]}
    return classifier, info | classifier_description(classifier)


def build_sd15_scale(config: BenchConfig) -> GenerationScale:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    start = time.perf_counter()
    dtype = torch_dtype(config)
    unet_config, text_shape = (
        (TINY_SD15_UNET_CONFIG, TINY_TEXT_SHAPE) if config.quick else (SD15_UNET_CONFIG, SD15_TEXT_SHAPE)
    )
    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(**unet_config).eval().to(dtype)
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    stock = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock, guided = _finish_pipelines(stock, config)
    size = unet_config["sample_size"] * stock.vae_scale_factor
    h_shape = guided.h_shape(size, size)
    classifier = random_classifier(h_shape, scheduler, config.seed, "attribute", ["class_0", "class_1"])
    generator = torch.Generator().manual_seed(config.seed + 1)
    batch = config.sd15_batch
    embeds = torch.randn(2, batch, *text_shape, generator=generator).to(config.device, dtype)
    label = "tiny SD1.5-structured UNet (--quick)" if config.quick else "SD1.5 UNet config, random weights"
    cpu_short = not config.device.startswith("cuda") and config.sd15_steps < 5
    return GenerationScale(
        name="sd15",
        stock=stock,
        guided=guided,
        classifier=classifier,
        classifier_info={
            "source": "random",
            "reason": "class-mean heads, anchors and calibration fitted on synthetic h of the SD1.5 shape",
            "class_names": ["class_0", "class_1"],
        }
        | classifier_description(classifier),
        call_kwargs={
            "prompt_embeds": embeds[1],
            "negative_prompt_embeds": embeds[0],
            "height": size,
            "width": size,
            "num_inference_steps": config.sd15_steps,
            "guidance_scale": 7.5,
            "output_type": "latent",
        },
        num_images=batch,
        steps=config.sd15_steps,
        guidance_scale=7.5,
        h_shape=h_shape,
        notes=[
            f"{label}; {size} px, latents {size // 8}x{size // 8}, DDIM",
            "no text encoder and no VAE: precomputed random prompt embeddings and output_type='latent' for every arm",
            f"{config.sd15_steps} denoising step(s) per call, every one guided: the ratios are per call"
            + (" (few steps keep the CPU run short; the guidance's per-call costs weigh most)" if cpu_short else ""),
        ],
        build_s=time.perf_counter() - start,
    )


def build_celebahq_scale(config: BenchConfig) -> GenerationScale:
    """google/ddpm-celebahq-256's shapes: `DDIMPipeline` (vanilla) and `BalancingActUnconditionalPipeline` built from
    it with `from_pipe` (the same UNet), a `UNet2DModel` from `CELEBAHQ_UNET_CONFIG` with random weights (nothing is
    downloaded), 256 px, h [*, 512, 8, 8], DDIM over the model's DDPM schedule, no classifier-free guidance."""
    from diffusers import DDIMPipeline, DDPMScheduler, UNet2DModel

    from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline

    start = time.perf_counter()
    dtype = torch_dtype(config)
    unet_config = TINY_CELEBAHQ_UNET_CONFIG if config.quick else CELEBAHQ_UNET_CONFIG
    torch.manual_seed(config.seed)
    unet = UNet2DModel(**unet_config).eval().to(dtype)
    # DDIMPipeline turns the model's DDPMScheduler into a DDIMScheduler with its config, as when it loads the model.
    stock = DDIMPipeline(unet=unet, scheduler=DDPMScheduler(**CELEBAHQ_SCHEDULER_CONFIG)).to(config.device)
    stock.set_progress_bar_config(disable=True)
    guided = BalancingActUnconditionalPipeline.from_pipe(stock, dtype=dtype)
    guided.set_progress_bar_config(disable=True)
    size = unet_config["sample_size"]
    h_shape = guided.h_shape(size, size)
    classifier = random_classifier(h_shape, stock.scheduler, config.seed, "gender", ["female", "male"])
    label = "google/ddpm-celebahq-256 UNet2DModel config, random weights"
    if config.quick:
        label = "tiny UNet2DModel with google/ddpm-celebahq-256's blocks (--quick)"
    return GenerationScale(
        name="celebahq",
        stock=stock,
        guided=guided,
        classifier=classifier,
        classifier_info={
            "source": "random",
            "reason": "class-mean heads, anchors and calibration fitted on synthetic h of the model's shape",
            "class_names": ["female", "male"],
        }
        | classifier_description(classifier),
        # `num_images`: `generate_batches` calls the unconditional pipelines with `batch_size=` instead of prompts.
        call_kwargs={
            "num_images": config.celebahq_batch,
            "num_inference_steps": config.celebahq_steps,
            "output_type": "pt",
        },
        num_images=config.celebahq_batch,
        steps=config.celebahq_steps,
        guidance_scale=1.0,
        h_shape=h_shape,
        notes=[
            f"{label}; {size} px, DDIM (eta 0) over the model's DDPM schedule, no classifier-free guidance",
            "DDIMPipeline vs BalancingActUnconditionalPipeline.from_pipe (the same UNet), output_type='pt'; "
            "distribution mode only (target 50/50)",
            f"{config.celebahq_steps} denoising step(s) per call, every one guided: the ratios are per call",
        ],
        build_s=time.perf_counter() - start,
        arms=CELEBAHQ_ARMS,
    )


SCALE_BUILDERS: dict[str, Callable[[BenchConfig], GenerationScale]] = {
    "toy": build_toy_scale,
    "sd15": build_sd15_scale,
    "celebahq": build_celebahq_scale,
}


def build_scale(config: BenchConfig, name: str) -> GenerationScale:
    return SCALE_BUILDERS[name](config)


def scale_rounds(config: BenchConfig, name: str) -> tuple[int, int]:
    """(timed rounds, warm-up rounds) of a scale."""
    return {
        "toy": (config.toy_rounds, config.toy_warmup),
        "sd15": (config.sd15_rounds, config.sd15_warmup),
        "celebahq": (config.celebahq_rounds, config.celebahq_warmup),
    }[name]


def guidance_kwargs(scale: GenerationScale, arm: str) -> dict[str, Any]:
    if arm == "vanilla":
        return {}
    kwargs = {"h_classifier": scale.classifier, "guidance_mode": arm}
    if arm == "distribution":
        kwargs["target_distribution"] = [0.5, 0.5]
        if scale.balance_state is not None:
            kwargs["balance_state"] = scale.balance_state
    else:
        kwargs["target_classes"] = 1
    return kwargs


def run_arm(scale: GenerationScale, arm: str, config: BenchConfig, classifier: Any = None) -> Any:
    """One generation call of all the scale's images: the stock pipeline for 'vanilla', else the Balancing Act
    pipeline; the same seeds (image i: seed + i, `generate_batches`). `classifier` replaces the scale's (e.g. one
    already moved to the GPU)."""
    pipe = scale.stock if arm == "vanilla" else scale.guided
    kwargs = {**scale.call_kwargs, **guidance_kwargs(scale, arm)}
    if classifier is not None and arm != "vanilla":
        kwargs["h_classifier"] = classifier
    prompts = kwargs.pop("prompt", None)
    per_image = {key: kwargs.pop(key) for key in ("prompt_embeds", "negative_prompt_embeds") if key in kwargs}
    (batch,) = generate_batches(pipe, prompts, config.seed, scale.num_images, per_image, **kwargs)
    return batch.output
