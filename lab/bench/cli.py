"""The command line: `python -m lab.bench [--threads 2] [--device cpu] [--quick] [--parts ...] [--scales ...]`, and the
worker processes it starts (`--worker`)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from h_classifiers.arguments import positive_int
from h_classifiers.io_utils import atomic_write_json, atomic_write_text
from lab.bench.config import (
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SCALES,
    DTYPE_CHOICES,
    MEMORY_MODES,
    PARTS,
    QUICK_SIZES,
    SCALES,
    TARGET_GPU_SD15_BATCH,
    WORKER_TAG,
    BenchConfig,
    written_config,
)
from lab.bench.extraction import bench_extraction
from lab.bench.generation import bench_generation, generation_memory_worker
from lab.bench.measuring import _log, machine_info, setup_torch
from lab.bench.table import markdown_table
from lab.bench.targets import evaluate_targets
from lab.bench.training import bench_training, training_worker


def worker_main(payload: str) -> None:
    data = json.loads(payload)
    config = BenchConfig(**data["config"])
    setup_torch(config)
    task = data["task"]
    if task["kind"] == "generation":
        result = generation_memory_worker(config, task["scale"], task["arm"])
    elif task["kind"] == "training":
        result = training_worker(config, task["features_dir"])
    else:
        raise ValueError(f"Unknown bench worker task {task!r}.")
    print(WORKER_TAG + json.dumps(result), flush=True)


def _choice_list(choices: tuple[str, ...], name: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"{name} must be a comma-separated subset of {list(choices)}, got {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    from h_classifiers.toy_world import TOY_CLASSIFIERS_PATH, TOY_MODEL_PATH

    parser = argparse.ArgumentParser(
        prog="python -m lab.bench",
        description="Measure Balancing Act next to stock Stable Diffusion (generation), batched h extraction and "
        "classifier training memory; write bench.json and table.md.",
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: 2).")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N.")
    parser.add_argument(
        "--dtype", default="auto", choices=list(DTYPE_CHOICES), help="auto: float32 on CPU, float16 on CUDA."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (seconds; for tests and smoke checks).")
    parser.add_argument(
        "--parts",
        type=_choice_list(PARTS, "--parts"),
        default=list(PARTS),
        help=f"Comma-separated parts to run (default: all of {','.join(PARTS)}).",
    )
    parser.add_argument(
        "--scales",
        type=_choice_list(SCALES, "--scales"),
        default=list(DEFAULT_SCALES),
        help=f"Comma-separated generation scales, of {','.join(SCALES)} (default: {','.join(DEFAULT_SCALES)}).",
    )
    parser.add_argument(
        "--output-dir",
        default=str(DEFAULT_OUTPUT_DIR),
        help="Where bench.json and table.md go (default: docs/lab/bench).",
    )
    parser.add_argument("--toy-model", default=str(TOY_MODEL_PATH), help="Toy model directory (diffusers layout).")
    parser.add_argument(
        "--toy-classifier",
        default=str(TOY_CLASSIFIERS_PATH / "skin"),
        help="Toy h-classifier directory; a random one of the right shape is used when it is missing.",
    )
    parser.add_argument(
        "--memory",
        default="auto",
        choices=list(MEMORY_MODES),
        help="CPU peak memory per arm: in a fresh 'subprocess' per arm, 'inprocess' during the timed runs, or "
        "'auto' (subprocess, except in-process for the full SD1.5 scale). CUDA always measures in-process.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of every generator (default: 0).")
    parser.add_argument(
        "--sd15-batch",
        type=positive_int,
        default=None,
        help="Images per call at SD1.5 shapes, with classifier-free guidance (default: 1 on CPU, 8 on CUDA).",
    )
    parser.add_argument(
        "--sd15-steps",
        type=positive_int,
        default=None,
        help="Denoising steps per call at SD1.5 shapes (1 on CPU, 20 on CUDA).",
    )
    parser.add_argument(
        "--sd15-rounds", type=positive_int, default=None, help="Timed rounds at SD1.5 shapes (default: 5)."
    )
    parser.add_argument(
        "--sd15-warmup", type=int, default=None, help="Warm-up rounds at SD1.5 shapes, at least 1 (default: 1)."
    )
    parser.add_argument(
        "--celebahq-batch",
        type=positive_int,
        default=None,
        help="Images per call at google/ddpm-celebahq-256 shapes (default: 2).",
    )
    parser.add_argument(
        "--celebahq-steps",
        type=positive_int,
        default=None,
        help="Denoising steps per call at google/ddpm-celebahq-256 shapes (default: 1).",
    )
    parser.add_argument(
        "--celebahq-rounds",
        type=positive_int,
        default=None,
        help="Timed rounds at google/ddpm-celebahq-256 shapes (default: 2).",
    )
    parser.add_argument(
        "--toy-rounds", type=positive_int, default=None, help="Timed rounds at the toy scale (default: 5)."
    )
    parser.add_argument(
        "--training-timesteps", type=positive_int, default=None, help="Timesteps of synthetic features to train."
    )
    parser.add_argument("--training-samples", type=positive_int, default=None, help="Synthetic training images.")
    parser.add_argument(
        "--render", action="store_true", help="Rewrite table.md from the --output-dir's bench.json (runs nothing)."
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    from h_classifiers.evaluation import resolve_device

    try:
        device = str(resolve_device(args.device))
    except ValueError as error:
        raise SystemExit(f"lab.bench: --device: {error}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"lab.bench: --device {args.device!r} asked for, but CUDA is not available.")
    if not device.startswith(("cpu", "cuda")):
        raise SystemExit(f"lab.bench: --device must be cpu, cuda or cuda:N, got {args.device!r}.")
    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    config = BenchConfig(
        threads=args.threads,
        device=device,
        dtype=dtype,
        quick=args.quick,
        parts=list(args.parts),
        scales=list(args.scales),
        output_dir=str(args.output_dir),
        toy_model=str(args.toy_model),
        toy_classifier=str(args.toy_classifier),
        memory=args.memory,
        seed=args.seed,
        **(QUICK_SIZES if args.quick else {}),
    )
    if device.startswith("cuda") and not args.quick:
        # A GPU step is cheap: the batch and steps of the GPU targets.
        config.sd15_batch, config.sd15_steps = TARGET_GPU_SD15_BATCH, 20
    overrides = {
        "sd15_batch": args.sd15_batch,
        "sd15_steps": args.sd15_steps,
        "sd15_rounds": args.sd15_rounds,
        "sd15_warmup": args.sd15_warmup,
        "celebahq_batch": args.celebahq_batch,
        "celebahq_steps": args.celebahq_steps,
        "celebahq_rounds": args.celebahq_rounds,
        "toy_rounds": args.toy_rounds,
        "training_timesteps": args.training_timesteps,
        "training_samples": args.training_samples,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if config.sd15_warmup < 1:
        raise SystemExit(
            f"lab.bench: --sd15-warmup must be >= 1 (every arm is warmed up before timing), got {config.sd15_warmup}."
        )
    if config.training_timesteps > config.training_nominal_timesteps:
        raise SystemExit(
            f"lab.bench: --training-timesteps must be <= {config.training_nominal_timesteps}, got "
            f"{config.training_timesteps}."
        )
    return config


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    setup_torch(config)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(config),
        "config": written_config(config),
    }
    with tempfile.TemporaryDirectory(prefix="balancing-act-bench-") as tmp:
        if "generation" in config.parts:
            results["generation"] = bench_generation(config)
        if "extraction" in config.parts:
            results["extraction"] = bench_extraction(config, Path(tmp) / "extraction")
            _log("extraction: done")
        if "training" in config.parts:
            results["training"] = bench_training(config, Path(tmp) / "training")
            _log("training: done")
    results["targets"] = evaluate_targets(results)
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["total_wall_s"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return None
    if args.render:
        results = json.loads((Path(args.output_dir) / "bench.json").read_text())
        atomic_write_text(Path(args.output_dir) / "table.md", markdown_table(results) + "\n")
        return results
    config = resolve_config(args)
    results = run_benchmark(config)
    output_dir = Path(config.output_dir)
    atomic_write_json(output_dir / "bench.json", results, indent=1)
    table = markdown_table(results)
    atomic_write_text(output_dir / "table.md", table + "\n")
    print(table)
    return results
