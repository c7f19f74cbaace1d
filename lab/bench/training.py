"""Part 3, classifier training: `train_classifier` on synthetic SD1.5-shaped features written shard by shard, its peak
memory (in a fresh worker process on CPU) and time per timestep, next to one timestep's slice and the whole set."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from h_classifiers.io_utils import atomic_save_file, atomic_write_json
from lab.bench.config import SD15_SCHEDULER_CONFIG, BenchConfig
from lab.bench.extraction import shard_bytes
from lab.bench.measuring import PeakMemory, _log, ratio, run_worker


def write_synthetic_features(root: Path, config: BenchConfig) -> dict[str, Any]:
    """An extraction store of random fp16 h with a weak class signal, written one (chunk, timestep) shard at a time.

    It uses the extraction module's format (manifest.json + chunks/chunk_XXXXX/step_XXX.safetensors + chunk.json),
    so `train_classifier` reads it as it reads a real extraction.
    """
    from diffusers import DDIMScheduler

    from h_classifiers.feature_store import (
        CHUNK_INFO_NAME,
        CHUNKS_DIR,
        FORMAT_VERSION,
        MANIFEST_NAME,
        chunk_name,
        step_file_name,
    )

    h_shape = list(config.training_h_shape)
    dim = math.prod(h_shape)
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(config.training_nominal_timesteps)
    timesteps = [int(t) for t in scheduler.timesteps.tolist()][: config.training_timesteps]
    n = config.training_samples
    labels = torch.arange(n) % 2
    generator = torch.Generator().manual_seed(config.seed)
    direction = torch.randn(dim, generator=generator)
    direction *= 3.0 / direction.norm()  # separable but not trivially (a shift of 3 sigma along one direction)
    start = time.perf_counter()
    images = []
    for c, first in enumerate(range(0, n, config.training_chunk)):
        index = torch.arange(first, min(first + config.training_chunk, n))
        y = labels[index]
        tmp = root / CHUNKS_DIR / f".tmp-{chunk_name(c)}"
        tmp.mkdir(parents=True)
        for step, timestep in enumerate(timesteps):
            h = torch.randn(len(index), dim, generator=generator) + (2 * y[:, None] - 1) * direction / 2
            tensors = {"h_cond": h.to(torch.float16).view(len(index), *h_shape), "labels": y, "image_index": index}
            metadata = {"step": str(step), "timestep": str(timestep), "format_version": str(FORMAT_VERSION)}
            atomic_save_file(tensors, tmp / step_file_name(step), metadata)
        records = [{"index": int(i), "label": int(k)} for i, k in zip(index, y)]
        atomic_write_json(tmp / CHUNK_INFO_NAME, {"chunk": c, "images": records, "skipped": [], "h_shape": h_shape})
        os.replace(tmp, root / CHUNKS_DIR / chunk_name(c))
        images.extend(records)
    manifest = {
        "format_version": FORMAT_VERSION,
        "recipe": "synthetic (benchmark)",
        "model": "synthetic",
        "timesteps": timesteps,
        "branches": ["cond"],
        "dtype": "float16",
        "class_names": ["class_0", "class_1"],
        "attribute": "synthetic",
        "h_shape": h_shape,
        "images": images,
        "labels": [r["label"] for r in images],
        "num_images": n,
        "complete": True,
    }
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return {"write_s": time.perf_counter() - start, "bytes_on_disk": shard_bytes(root)}


def training_worker(config: BenchConfig, features_dir: str) -> dict[str, Any]:
    from h_classifiers.training import TrainingConfig, train_classifier

    with PeakMemory(config.device) as memory:
        start = time.perf_counter()
        result = train_classifier(
            features_dir,
            output_dir=None,
            config=TrainingConfig(epochs=config.training_epochs, device=config.device),
            progress=False,
        )
        wall = time.perf_counter() - start
    accuracies = [m["accuracy"] for m in result.metrics]
    return {**memory.as_dict(), "wall_s": wall, "heldout_accuracy": accuracies}


def bench_training(config: BenchConfig, workdir: Path) -> dict[str, Any]:
    features = workdir / "features"
    written = write_synthetic_features(features, config)
    _log(f"training: wrote {written['bytes_on_disk'] / 2**20:.0f} MiB of synthetic shards")
    if config.device.startswith("cuda"):
        run = training_worker(config, str(features))
        run["measured_in"] = "this process"
    else:
        run = run_worker({"kind": "training", "features_dir": str(features)}, config)
        run["measured_in"] = "fresh worker process"
    dim = math.prod(config.training_h_shape)
    n, steps, nominal = config.training_samples, config.training_timesteps, config.training_nominal_timesteps
    slice_bytes = n * dim * 2
    model_bytes = steps * 2 * dim * 4 + steps * 2 * 4
    return {
        "num_samples": n,
        "h_shape": config.training_h_shape,
        "timesteps_trained": steps,
        "timesteps_nominal": nominal,
        "epochs": config.training_epochs,
        "storage_dtype": "float16",
        "slice_bytes": slice_bytes,
        "feature_set_bytes_written": written["bytes_on_disk"],
        "feature_set_bytes_nominal": slice_bytes * nominal,
        "model_bytes": model_bytes,
        "model_bytes_nominal": nominal * 2 * dim * 4 + nominal * 2 * 4,
        "write_s": written["write_s"],
        "train_s": run["wall_s"],
        "s_per_timestep": run["wall_s"] / steps,
        "estimated_s_all_timesteps": run["wall_s"] / steps * nominal,
        "memory": {k: run[k] for k in ("peak_bytes", "baseline_bytes", "increment_bytes", "method", "measured_in")},
        "increment_over_slice": ratio(run["increment_bytes"], slice_bytes),
        "increment_over_slice_plus_model": ratio(run["increment_bytes"], slice_bytes + model_bytes),
        "heldout_accuracy": run["heldout_accuracy"],
    }
