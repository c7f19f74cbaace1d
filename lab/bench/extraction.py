"""Part 2, h extraction: images/s of `extract_from_folders` (DDIM inversion, fp16 shards) at a small and a large batch
on the toy model, in alternating order after a warm-up, and the bytes stored per image in fp16 and fp32 shards."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from lab.bench.arms import torch_dtype, toy_model_missing
from lab.bench.config import BenchConfig
from lab.bench.measuring import alternating_order, ratio, timed


def write_toy_images(folder: Path, num_images: int, size: int, seed: int) -> None:
    """Toy faces as PNG in two class folders (labels do not matter for timing: images alternate between them)."""
    from PIL import Image

    from h_classifiers.toy_world import make_toy_dataset

    images = make_toy_dataset(num_images, seed=seed, image_size=size).images
    for i, image in enumerate(images):
        target = folder / ("class_a" if i % 2 == 0 else "class_b")
        target.mkdir(parents=True, exist_ok=True)
        array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(target / f"{i:05d}.png")


def shard_bytes(features_dir: Path) -> int:
    return sum(p.stat().st_size for p in features_dir.rglob("step_*.safetensors"))


def bench_extraction(config: BenchConfig, workdir: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    from h_classifiers.extraction import extract_from_folders

    model = Path(config.toy_model)
    if missing := toy_model_missing(config):
        return {"skipped": missing}
    pipe = StableDiffusionPipeline.from_pretrained(
        model, dtype=torch_dtype(config), safety_checker=None, requires_safety_checker=False
    ).to(config.device)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image_dir = workdir / "images"
    write_toy_images(image_dir, config.extraction_images, size, config.seed)
    runs = 0

    def extract(batch: int, dtype: str, steps: int, folder: Path = image_dir) -> tuple[float, Path]:
        nonlocal runs
        runs += 1
        out = workdir / f"run_{runs:03d}_b{batch}_{dtype}"
        wall = timed(
            lambda: extract_from_folders(
                pipe,
                folder,
                out,
                num_inference_steps=steps,
                batch_size=batch,
                chunk_size=max(config.extraction_images, batch),
                dtype=dtype,
                progress=False,
            ),
            config.device,
        )
        return wall, out

    warm = workdir / "warmup_images"
    write_toy_images(warm, 2, size, config.seed + 1)
    for batch in config.extraction_batches:
        shutil.rmtree(extract(batch, "fp16", 2, warm)[1])
    walls: dict[int, list[float]] = {b: [] for b in config.extraction_batches}
    stored: dict[str, int] = {}
    order = alternating_order([str(b) for b in config.extraction_batches], config.extraction_rounds)
    for round_order in order:
        for batch in map(int, round_order):
            wall, out = extract(batch, "fp16", config.extraction_steps)
            walls[batch].append(wall)
            stored["fp16"] = shard_bytes(out)
            shutil.rmtree(out)
    largest = max(config.extraction_batches)
    fp32_wall, out = extract(largest, "fp32", config.extraction_steps)
    stored["fp32"] = shard_bytes(out)
    h_shape = json.loads((out / "manifest.json").read_text())["h_shape"]
    shutil.rmtree(out)

    n = config.extraction_images
    batches = {}
    for batch in config.extraction_batches:
        median = statistics.median(walls[batch])
        batches[str(batch)] = {"wall_s": walls[batch], "median_s": median, "images_per_s": n / median}
    smallest = min(config.extraction_batches)
    values = math.prod(h_shape) * config.extraction_steps
    return {
        "recipe": "extract_from_folders (VAE encode + DDIM inversion, cond branch, no classifier-free guidance)",
        "num_images": n,
        "steps": config.extraction_steps,
        "h_shape": h_shape,
        "order": order,
        "batches": batches,
        "speedup": ratio(batches[str(largest)]["images_per_s"], batches[str(smallest)]["images_per_s"]),
        "speedup_of": [largest, smallest],
        "fp32_wall_s": fp32_wall,
        "bytes_per_image": {k: v / n for k, v in stored.items()},
        "h_bytes_per_image": {"fp16": values * 2, "fp32": values * 4},
        "fp32_over_fp16": ratio(stored.get("fp32"), stored.get("fp16")),
    }
