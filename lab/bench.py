"""The cost of Balancing Act next to stock Stable Diffusion, measured side by side (a research tool, not installed).

python lab/bench.py [--threads 2] [--device cpu] [--quick] [--parts generation,extraction,training]

Three parts, each measured in this one process (memory peaks of CPU runs in fresh worker processes, see below):

1. generation: stock `StableDiffusionPipeline` vs `BalancingActPipeline` (built with `from_pipe`, so the very same
   modules) in distribution and in sample mode, same seeds and steps. Every arm first runs one untimed warm-up round,
   then one untimed call per arm counts its host-device synchronisations, then the timed rounds alternate the order of
   the arms (forward, reversed, ...); medians and guided/vanilla ratios of wall time and peak memory, and the
   synchronisations a guided step adds. Two scales by default: the committed toy model (batch 64, 25 steps, its
   shipped skin classifier) and SD1.5 shapes (a `UNet2DConditionModel` from the SD1.5 config with random weights,
   512 px, so h is [*, 1280, 8, 8], with classifier-free guidance; batch 1 and 1 step per call on CPU, batch 8 and 20
   steps on CUDA; precomputed random prompt embeddings and `output_type="latent"` for every arm, so no text encoder or
   VAE runs, and a classifier made as `balancing-act train` makes one, on synthetic h). A third, `--scales celebahq`:
   the paper's unconditional model's shapes (a `UNet2DModel` from google/ddpm-celebahq-256's config with random
   weights, 256 px, h [*, 512, 8, 8]; `DDIMPipeline` vs `BalancingActUnconditionalPipeline`, distribution mode only;
   batch 2, 1 step per call and 2 timed rounds by default). The guidance step alone (what runs between the UNet's mid
   block and its first up block: the pipeline's hook on h) is also timed at every UNet call of the timed rounds
   (`GuidanceStepTimer`).
2. extraction: images/s of `extract_from_folders` (DDIM inversion, fp16 shards) at batch 1 vs batch 16 on the toy
   model, in alternating order after a warm-up, and bytes stored per image in fp16 vs fp32 shards.
3. training: `train_classifier` on synthetic SD1.5-shaped features (2,000 images, h 1280x8x8) written shard by shard:
   peak memory and time per timestep, next to the size of one timestep's slice and of the whole feature set.

A target is judged only on a figure of at least MIN_TIMED_ROUNDS timed rounds; the table marks any other as "not
judged". Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident set's high-water mark (VmHWM,
reset through /proc/self/clear_refs just before the measured call). A process keeps freed heap memory, so on CPU each
arm's peak is measured in a fresh worker process (`--memory subprocess`); the full SD1.5 and celebahq scales on CPU
measure it in-process during the timed runs by default (`--memory auto`), because a worker would cost one more long
UNet call per arm. Output: `<output-dir>/bench.json` and `<output-dir>/table.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from h_classifiers.arguments import positive_int  # noqa: E402
from h_classifiers.generation import generate_batches  # noqa: E402
from h_classifiers.io_utils import (  # noqa: E402
    atomic_save_file,
    atomic_write_json,
    atomic_write_text,
    portable_path,
)


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
DEFAULT_OUTPUT_DIR = REPO_ROOT / "docs" / "bench"

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


# ----------------------------------------------------------------------------------------------------------------
# Machine, memory and timing helpers
# ----------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it (with family/model numbers when the name is generic)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_info(config: BenchConfig) -> dict[str, Any]:
    import diffusers
    import transformers

    info = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _meminfo_bytes("MemTotal"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": config.device,
        "dtype": config.dtype,
    }
    if config.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(config.device))
    return info


def _proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` field of a /proc file in bytes (None where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _meminfo_bytes(key: str) -> int | None:
    return _proc_bytes("/proc/meminfo", key)


def _status_bytes(key: str) -> int | None:
    """A `Vm*` field of /proc/self/status in bytes."""
    return _proc_bytes("/proc/self/status", key)


def _reset_peak_rss() -> bool:
    """Resets the process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the enclosed code: CUDA allocator peak, or the CPU resident set's high-water mark.

    On CPU it resets VmHWM and reads it back; where the reset is not allowed it samples VmRSS every millisecond.
    `peak` and `baseline` are bytes; `method` says how they were measured.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.peak = self.baseline = 0
        self.method = ""
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status_bytes("VmRSS") or 0)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        # Reset first, then read: the high-water mark then covers the baseline reading, so peak >= baseline.
        reset = _reset_peak_rss()
        self.baseline = _status_bytes("VmRSS") or 0
        if reset:
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        else:
            self.method = "VmRSS sampled every 1 ms"
            self.peak = self.baseline
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        else:
            # The kernel's RSS counters are approximate (per-CPU batches, ~100s of KiB): never report a peak below
            # the readings taken around the call.
            self.peak = max(_status_bytes("VmHWM") or 0, _status_bytes("VmRSS") or 0, self.baseline)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak,
            "baseline_bytes": self.baseline,
            "increment_bytes": self.peak - self.baseline,
            "method": self.method,
        }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def alternating_order(names: list[str], rounds: int) -> list[list[str]]:
    """Run order per round: forward, then reversed, so a drift of the machine's speed hits every arm alike."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------------------------------------------
# Worker processes (fresh process per CPU memory measurement)
# ----------------------------------------------------------------------------------------------------------------


def run_worker(task: dict[str, Any], config: BenchConfig, timeout: float = 1800) -> dict[str, Any]:
    """Runs `task` in a fresh Python process (this module with --worker) and returns its JSON result."""
    env = dict(os.environ)
    # The single-file pipeline lives at the repository root; make it importable in a bare checkout too.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    payload = json.dumps({"task": task, "config": asdict(config)})
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG) :])
    raise RuntimeError(
        f"bench worker {task} failed (exit code {done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    )


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


def setup_torch(config: BenchConfig) -> None:
    torch.set_num_threads(config.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# Part 1: generation
# ----------------------------------------------------------------------------------------------------------------


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


def generation_memory_worker(config: BenchConfig, scale_name: str, arm: str) -> dict[str, Any]:
    scale = build_scale(config, scale_name)
    with PeakMemory(config.device) as memory:
        wall = timed(lambda: run_arm(scale, arm, config), config.device)
    return {**memory.as_dict(), "wall_s": wall, "build_s": scale.build_s}


class GuidanceStepTimer:
    """Times, at every UNet call, what runs between the UNet's mid block returning h and its first up block starting:
    the forward hooks on `unet.mid_block`, that is the guidance step (the Balancing Act pipeline's hook guides h
    there; for the stock pipeline the hook does nothing).

    Built on `torch.nn.Module` hooks of the UNet alone (a forward hook put first on `mid_block`, a forward pre-hook on
    `up_blocks[0]`), so it needs none of the pipeline's internals. On CUDA it records CUDA events (no host-device
    synchronisation: the gap on the device's timeline, which is what the wall time pays), on CPU `perf_counter`.
    `collect()` returns the milliseconds of the calls since the last `collect()`; on CUDA call it after a
    synchronisation.
    """

    def __init__(self, unet: torch.nn.Module, device: str):
        self.cuda = device.startswith("cuda")
        self._start: Any = None
        self._pending: list[tuple[Any, Any]] = []
        self._handles = [
            unet.mid_block.register_forward_hook(self._on_h, prepend=True),
            unet.up_blocks[0].register_forward_pre_hook(self._on_up),
        ]

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _on_h(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._start = self._now()

    def _on_up(self, module: torch.nn.Module, args: Any) -> None:
        if self._start is not None:
            self._pending.append((self._start, self._now()))
            self._start = None

    def collect(self) -> list[float]:
        pending, self._pending = self._pending, []
        if self.cuda:
            return [start.elapsed_time(end) for start, end in pending]
        return [(end - start) * 1000 for start, end in pending]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> "GuidanceStepTimer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def step_summary(samples_ms: list[float], rows: int) -> dict[str, Any]:
    if not samples_ms:
        return {"available": False, "reason": "no UNet call reached the first up block"}
    return {
        "available": True,
        "rows": rows,
        "calls": len(samples_ms),
        "ms_median": statistics.median(samples_ms),
        "ms_min": min(samples_ms),
    }


def classifier_on_device(scale: GenerationScale, config: BenchConfig) -> Any:
    from pipeline_balancing_act import HClassifier

    classifier = scale.classifier
    if isinstance(classifier, str):
        classifier = HClassifier.from_pretrained(classifier)
    return copy.deepcopy(classifier).to(config.device).eval()


def count_host_syncs(scale: GenerationScale, arm: str, config: BenchConfig) -> dict[str, Any]:
    """Host-device synchronisations of one call of `arm`, counted two ways around the whole call:

    - `counter`: the tensor operations that would make the host wait for a GPU (`host_syncs.HostSyncCounter`, a
      TorchFunctionMode: works on any device, so also on a CPU run), with `events` per operation name;
    - `cuda_sync_debug`: on CUDA, the synchronisations torch itself reports (`torch.cuda.set_sync_debug_mode`).

    Both include the UNet's and the scheduler's own operations; the difference to the vanilla arm isolates guidance,
    but also holds what a guided call does once, before its loop. `in_step` counts only inside the guided call's
    steps (its h function and its step end, `_GuidanceRun.on_h` / `end_step`): what the loop itself waits for.
    """
    import warnings
    from collections import Counter

    import pipeline_balancing_act as pba
    from h_classifiers.host_syncs import HostSyncCounter

    in_step: list[str] = []

    def counted(method):
        def wrapper(*args, **kwargs):
            with HostSyncCounter() as step_counter:
                result = method(*args, **kwargs)
            in_step.extend(step_counter.events)
            return result

        return wrapper

    originals = {name: getattr(pba._GuidanceRun, name) for name in ("on_h", "end_step")}
    cuda = config.device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncCounter() as counter:
                for name, method in originals.items():
                    setattr(pba._GuidanceRun, name, counted(method))
                run_arm(scale, arm, config)
        finally:
            for name, method in originals.items():
                setattr(pba._GuidanceRun, name, method)
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return {
        "counter": counter.count,
        "events": dict(Counter(counter.events).most_common()),
        "in_step": len(in_step) if arm != "vanilla" else None,
        "in_step_events": dict(Counter(in_step).most_common()),
        "cuda_sync_debug": sum("synchroniz" in str(w.message) for w in caught) if cuda else None,
    }


def syncs_per_guided_step(guided: dict[str, Any], vanilla: dict[str, Any], guided_steps: int) -> dict[str, Any]:
    """(guided - vanilla) synchronisations per call / guided steps per call, for each way of counting, and the
    synchronisations inside the guided steps per guided step (`in_step`)."""
    added = {
        key: None
        if guided.get(key) is None or vanilla.get(key) is None
        else (guided[key] - vanilla[key]) / guided_steps
        for key in ("counter", "cuda_sync_debug")
    }
    added["in_step"] = None if guided.get("in_step") is None else guided["in_step"] / guided_steps
    return added


def memory_mode(config: BenchConfig, scale_name: str) -> str:
    if config.device.startswith("cuda"):
        return "inprocess"
    if config.memory != "auto":
        return config.memory
    # A fresh worker at full SD1.5 (or google/ddpm-celebahq-256) size costs one more minute-long UNet call per arm on
    # a 2-core CPU.
    return "inprocess" if (scale_name in ("sd15", "celebahq") and not config.quick) else "subprocess"


def bench_generation_scale(config: BenchConfig, scale_name: str) -> dict[str, Any]:
    scale = build_scale(config, scale_name)
    rounds, warmup = scale_rounds(config, scale_name)
    arm_names, guided_arms = list(scale.arms), list(scale.arms[1:])
    # Warm-up: every arm untimed first (first-call costs: the classifier's loading and caching, allocator pools,
    # kernel choices), so that no arm is timed from cold.
    warmup_order = alternating_order(arm_names, warmup)
    for round_order in warmup_order:
        for arm in round_order:
            run_arm(scale, arm, config)
    # One more untimed call per arm counts its host-device synchronisations (a warm call, outside the timed rounds:
    # the counting slows every torch call down).
    syncs = {arm: count_host_syncs(scale, arm, config) for arm in arm_names}
    walls: dict[str, list[float]] = {arm: [] for arm in arm_names}
    peaks: dict[str, list[dict]] = {arm: [] for arm in arm_names}
    hook_ms: dict[str, list[float]] = {arm: [] for arm in arm_names}
    order = alternating_order(arm_names, rounds)
    rows = scale.num_images * (2 if scale.guidance_scale > 1 else 1)
    # Both pipelines share the UNet: the step timer sees every arm alike (two timestamps per UNet call).
    with GuidanceStepTimer(scale.stock.unet, config.device) as step_timer:
        for round_order in order:
            for arm in round_order:
                with PeakMemory(config.device) as memory:
                    walls[arm].append(timed(lambda: run_arm(scale, arm, config), config.device))
                peaks[arm].append(memory.as_dict())
                hook_ms[arm] += step_timer.collect()
        on_device: dict[str, dict[str, Any]] = {}
        if config.device.startswith("cuda"):
            # What moving the classifier to the UNet's device before the call would save (one untimed call each).
            classifier = classifier_on_device(scale, config)
            for arm in guided_arms:
                timed(lambda: run_arm(scale, arm, config, classifier), config.device)
                on_device[arm] = step_summary(step_timer.collect(), rows)

    mode = memory_mode(config, scale_name)
    arms: dict[str, Any] = {}
    for arm in arm_names:
        median = statistics.median(walls[arm])
        inprocess = max(peaks[arm], key=lambda m: m["peak_bytes"])
        arms[arm] = {
            "wall_s": walls[arm],
            "median_s": median,
            "s_per_step": median / scale.steps,
            "s_per_image": median / scale.num_images,
            "inprocess_memory": inprocess,
            "inprocess_memory_per_run": peaks[arm],
        }
        if mode == "subprocess":
            arms[arm]["memory"] = dict(run_worker({"kind": "generation", "scale": scale_name, "arm": arm}, config))
            arms[arm]["memory"]["measured_in"] = "fresh worker process, one call"
        else:
            arms[arm]["memory"] = dict(inprocess, measured_in="this process, max over the timed runs")
        arms[arm]["host_syncs_per_call"] = syncs[arm]
        arms[arm]["guidance_step"] = step_summary(hook_ms[arm], rows)
        if arm in on_device:
            arms[arm]["guidance_step_classifier_on_device"] = on_device[arm]

    # The pipeline's default `guidance_steps=(0.0, 1.0)` guides every denoising step.
    guided_steps = scale.steps
    vanilla = arms["vanilla"]
    ratios = {}
    for arm in guided_arms:
        step, vanilla_step = arms[arm]["guidance_step"], vanilla["guidance_step"]
        estimate = None
        if step.get("available") and vanilla_step.get("available"):
            # The UNet is called once per step (classifier-free guidance batches both branches).
            estimate = 1 + ((step["ms_median"] - vanilla_step["ms_median"]) / 1000) / vanilla["s_per_step"]
        ratios[arm] = {
            "wall": ratio(arms[arm]["median_s"], vanilla["median_s"]),
            "peak_memory": ratio(arms[arm]["memory"]["peak_bytes"], vanilla["memory"]["peak_bytes"]),
            "peak_increment": ratio(arms[arm]["memory"]["increment_bytes"], vanilla["memory"]["increment_bytes"]),
            "wall_from_guidance_step": estimate,
            "syncs_per_guided_step": syncs_per_guided_step(syncs[arm], syncs["vanilla"], guided_steps),
        }
    return {
        "num_images": scale.num_images,
        "unet_rows": rows,
        "steps": scale.steps,
        "guidance_scale": scale.guidance_scale,
        "h_shape": scale.h_shape,
        "dtype": config.dtype,
        "arm_names": arm_names,
        "classifier": scale.classifier_info,
        "guided_steps_per_call": guided_steps,
        "warmup_rounds": warmup,
        "warmup_order": warmup_order,
        "rounds": rounds,
        "order": order,
        "memory_mode": mode,
        "build_s": scale.build_s,
        "notes": scale.notes,
        "arms": arms,
        "ratios": ratios,
    }


def bench_generation(config: BenchConfig) -> dict[str, Any]:
    results = {}
    for name in config.scales:
        missing = toy_model_missing(config) if name == "toy" else None
        results[name] = {"skipped": missing} if missing else bench_generation_scale(config, name)
        _log(f"generation {name}: {'skipped' if missing else 'done'}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Part 2: h extraction
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Part 3: classifier training
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Targets, table, output
# ----------------------------------------------------------------------------------------------------------------


def generation_limits(device: str, scale: str) -> dict[str, float]:
    """The guided / vanilla limits of one scale on one device type (an empty dict: no target there)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return {
        ("cuda", "sd15"): {"wall": TARGET_GPU_SD15_WALL_RATIO, "peak_memory": TARGET_GPU_SD15_MEMORY_RATIO},
        ("cuda", "toy"): {"wall": TARGET_GPU_TOY_WALL_RATIO},
        ("cpu", "sd15"): {"wall": TARGET_CPU_SD15_WALL_RATIO},
    }.get((kind, scale), {})


def why_not_judged(rounds: int | None, config: dict[str, Any], scale: str | None = None, data: dict | None = None):
    """Why a target is not judged on this run, or None when it is: too few timed rounds, the --quick sizes, or (on
    CUDA at SD1.5 shapes) another batch or dtype than the target's."""
    if rounds is not None and rounds < MIN_TIMED_ROUNDS:
        return f"not judged ({rounds} rounds < {MIN_TIMED_ROUNDS})"
    if config.get("quick"):
        return "not judged (--quick sizes)"
    if scale == "sd15" and data is not None and config["device"].startswith("cuda"):
        batch, cfg = data["num_images"], data["guidance_scale"] > 1
        if batch != TARGET_GPU_SD15_BATCH or not cfg or data["dtype"] != TARGET_GPU_SD15_DTYPE:
            return (
                f"not judged (batch {batch}{' + CFG' if cfg else ''}, {data['dtype']}; the target is set for batch "
                f"{TARGET_GPU_SD15_BATCH} + CFG, {TARGET_GPU_SD15_DTYPE})"
            )
    return None


def _target(name: str, value: float | None, limit: float, at_most: bool, reason: str | None) -> dict[str, Any]:
    met = None
    if value is not None and reason is None:
        met = value <= limit if at_most else value >= limit
    verdict = reason or ("-" if met is None else ("yes" if met else "no"))
    return {
        "name": name,
        "value": value,
        "limit": f"{'<=' if at_most else '>='} {limit}",
        "met": met,
        "judged": reason is None and met is not None,
        "verdict": verdict,
    }


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value; `met` is None (and `verdict` says why) where it is not judged."""
    config = results["config"]
    targets = []
    for scale, data in results.get("generation", {}).items():
        if "ratios" not in data:
            continue
        limits = generation_limits(config["device"], scale)
        reason = why_not_judged(data["rounds"], config, scale, data)
        for arm, values in data["ratios"].items():
            for key, limit in limits.items():
                name = f"generation {scale} {arm}: guided/vanilla {key.replace('_', ' ')}"
                targets.append(_target(name, values[key], limit, True, reason))
    extraction = results.get("extraction", {})
    if extraction.get("speedup") is not None:
        largest, smallest = extraction["speedup_of"]
        name = f"extraction: images/s at batch {largest} / batch {smallest}"
        reason = why_not_judged(len(extraction["order"]), config)
        targets.append(_target(name, extraction["speedup"], TARGET_EXTRACTION_SPEEDUP, False, reason))
    training = results.get("training", {})
    if training.get("increment_over_slice_plus_model") is not None:
        whole = training["feature_set_bytes_nominal"] / (training["slice_bytes"] + training["model_bytes"])
        target = _target(
            "training: peak memory increment / (one timestep slice + model)",
            training["increment_over_slice_plus_model"],
            TARGET_TRAINING_SLICES,
            True,
            why_not_judged(None, config),  # a memory figure of one run, not a timing: no rounds
        )
        target["limit"] += f" (the whole feature set is {whole:.0f})"
        targets.append(target)
    return targets


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _syncs(counts: dict[str, Any] | None, digits: int) -> str:
    """The HostSyncCounter figure, and torch's own CUDA count after a slash where there is one."""
    if not counts:
        return "-"
    text = _num(counts.get("counter"), digits)
    if counts.get("cuda_sync_debug") is not None:
        text += f" / {_num(counts['cuda_sync_debug'], digits)}"
    return text


def markdown_table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    load = machine.get("load_average_start")
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch threads "
        f"{machine['torch_threads']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
        + f", dtype {machine['dtype']}; torch {machine['torch']}, diffusers {machine['diffusers']}; load average at "
        f"start {load[0]:.2f}"
        * bool(load)
        + (f", at end {results['load_average_end'][0]:.2f}" if results.get("load_average_end") else "")
        + f". Run: {results['started_utc']}, {results['total_wall_s']:.0f} s"
        + (" (--quick)" if results["config"]["quick"] else "")
        + ".",
        "",
    ]
    generation = results.get("generation", {})
    if generation:
        lines += [
            "| Scale | Arm | Median wall (s) | s/step | s/image | Wall ratio | Peak memory | Memory ratio | "
            "Guidance step (ms) | "
            "Host syncs per call | Added syncs per call / guided steps | Syncs inside a guided step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for scale, data in generation.items():
            if "skipped" in data:
                lines.append(f"| {scale} | skipped: {data['skipped']} | | | | | | | | | | |")
                continue
            cfg = " + CFG" if data["guidance_scale"] > 1 else ""
            label = (
                f"{scale}: {data['num_images']} images{cfg} ({data['unet_rows']} UNet rows), {data['steps']} "
                f"step(s) per call, h {'x'.join(map(str, data['h_shape']))}"
            )
            for arm in data.get("arm_names", ARMS):
                values = data["arms"][arm]
                r = data["ratios"].get(arm, {})
                step = values.get("guidance_step", {})
                lines.append(
                    f"| {label if arm == 'vanilla' else ''} | {arm} | {_num(values['median_s'], 2)} | "
                    f"{_num(values['s_per_step'], 3)} | {_num(values.get('s_per_image'), 3)} | "
                    f"{_num(r.get('wall')) if r else '1'} | "
                    f"{_mib(values['memory']['peak_bytes'])} | {_num(r.get('peak_memory')) if r else '1'} | "
                    f"{_num(step.get('ms_median'), 2) if step.get('available') else '-'} | "
                    f"{_syncs(values.get('host_syncs_per_call'), 0)} | "
                    f"{_syncs(r.get('syncs_per_guided_step'), 2) if r else '-'} | "
                    f"{_num((r.get('syncs_per_guided_step') or {}).get('in_step'), 2) if r else '-'} |"
                )
        lines.append("")
        for scale, data in generation.items():
            if "skipped" in data:
                continue
            classifier = data["classifier"]
            made = (
                f"calibrated: {'yes' if classifier.get('calibrated') else 'no'}, anchors: "
                f"{classifier.get('anchor_source') or 'none'}"
            )
            lines.append(
                f"- {scale}: {'; '.join(data['notes'])}; classifier: {classifier['source']}"
                + (f" ({classifier['reason']})" if classifier.get("reason") else "")
                + f", {made}; {data['warmup_rounds']} warm-up round(s) of every arm, then one untimed call per arm "
                f"counting host syncs, then {data['rounds']} timed round(s) alternating {data['order']}; memory: "
                f"{data['arms']['vanilla']['memory']['measured_in']} ({data['arms']['vanilla']['memory']['method']})."
            )
            on_device = {
                arm: data["arms"][arm].get("guidance_step_classifier_on_device", {}).get("ms_median")
                for arm in data.get("arm_names", ARMS)[1:]
            }
            if any(v is not None for v in on_device.values()):
                lines.append(
                    f"- {scale}: guidance step with the classifier moved to the device first (ms): {on_device}."
                )
        cuda = results["config"]["device"].startswith("cuda")
        lines += [
            "- Host syncs: operations that make the host wait for the device, counted around one whole call of each "
            "arm with `h_classifiers.host_syncs.HostSyncCounter`"
            + (" / with `torch.cuda.set_sync_debug_mode`" if cuda else "")
            + "; the whole call includes the UNet's and the scheduler's own. Added per call / guided steps: (guided - "
            "vanilla) per call / guided steps per call (the default `guidance_steps` guides every step); it also holds "
            "what a guided call does once before its loop (reading the classifier's timesteps and the target, which "
            "live on the host but were made outside the counter, so it counts them as device reads). Inside a guided "
            "step: counted only in the call's h function and step end (`_GuidanceRun.on_h`, `end_step`), per guided "
            "step: what the denoising loop waits for.",
            "",
        ]
    extraction = results.get("extraction", {})
    if extraction:
        if "skipped" in extraction:
            lines += [f"Extraction: skipped ({extraction['skipped']}).", ""]
        else:
            lines += [
                "| Extraction (toy, DDIM inversion) | images/s | median wall (s) |",
                "|---|---|---|",
            ]
            for batch, values in extraction["batches"].items():
                lines.append(f"| batch {batch} | {_num(values['images_per_s'], 2)} | {_num(values['median_s'], 2)} |")
            per_image = extraction["bytes_per_image"]
            lines += [
                "",
                f"{extraction['num_images']} images, {extraction['steps']} steps, h "
                f"{'x'.join(map(str, extraction['h_shape']))}; speedup batch {extraction['speedup_of'][0]} / "
                f"{extraction['speedup_of'][1]}: {_num(extraction['speedup'], 2)}x. Stored per image: fp16 "
                f"{per_image['fp16'] / 1024:.1f} KiB, fp32 {per_image['fp32'] / 1024:.1f} KiB "
                f"(ratio {_num(extraction['fp32_over_fp16'], 2)}).",
                "",
            ]
    training = results.get("training", {})
    if training:
        lines += [
            "| Training (synthetic, h " + "x".join(map(str, training["h_shape"])) + ") | value |",
            "|---|---|",
            f"| samples x timesteps trained (nominal) | {training['num_samples']} x {training['timesteps_trained']} "
            f"({training['timesteps_nominal']}) |",
            f"| one timestep slice (fp16) | {_mib(training['slice_bytes'])} |",
            f"| whole feature set, {training['timesteps_nominal']} timesteps (fp16) | "
            f"{_mib(training['feature_set_bytes_nominal'])} |",
            f"| model ({training['timesteps_trained']} heads) | {_mib(training['model_bytes'])} |",
            f"| peak RSS / increment over start | {_mib(training['memory']['peak_bytes'])} / "
            f"{_mib(training['memory']['increment_bytes'])} |",
            f"| increment / (slice + model) | {_num(training['increment_over_slice_plus_model'], 2)} |",
            f"| time per timestep (TrainingConfig(epochs={training['epochs']}), other defaults) | "
            f"{_num(training['s_per_timestep'], 1)} s |",
            "",
        ]
    targets = results.get("targets", [])
    if targets:
        lines += ["| Target | Measured | Limit | Met |", "|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['name']} | {_num(t['value'])} | {t['limit']} | {t['verdict']} |")
        lines += [
            "",
            f"A timed figure from fewer than {MIN_TIMED_ROUNDS} timed rounds is reported but not judged against its "
            "target.",
            "",
        ]
    return "\n".join(lines)


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


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


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
        prog="lab/bench.py",
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
        "--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="Where bench.json and table.md go (default: docs/bench)."
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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    from h_classifiers.evaluation import resolve_device

    try:
        device = str(resolve_device(args.device))
    except ValueError as error:
        raise SystemExit(f"bench.py: --device: {error}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench.py: --device {args.device!r} asked for, but CUDA is not available.")
    if not device.startswith(("cpu", "cuda")):
        raise SystemExit(f"bench.py: --device must be cpu, cuda or cuda:N, got {args.device!r}.")
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
            f"bench.py: --sd15-warmup must be >= 1 (every arm is warmed up before timing), got {config.sd15_warmup}."
        )
    if config.training_timesteps > config.training_nominal_timesteps:
        raise SystemExit(
            f"bench.py: --training-timesteps must be <= {config.training_nominal_timesteps}, got "
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
    config = resolve_config(args)
    results = run_benchmark(config)
    output_dir = Path(config.output_dir)
    atomic_write_json(output_dir / "bench.json", results, indent=1)
    table = markdown_table(results)
    atomic_write_text(output_dir / "table.md", table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
