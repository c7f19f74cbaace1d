"""The cost of Balancing Act next to stock Stable Diffusion, measured side by side (a research tool, not installed).

python benchmarks/bench.py [--threads 2] [--device cpu] [--quick] [--parts generation,extraction,training]

Three parts, each measured in this one process (memory peaks of CPU runs in fresh worker processes, see below):

1. generation: stock `StableDiffusionPipeline` vs `BalancingActPipeline` (built with `from_pipe`, so the very same
   modules) in distribution and in sample mode, same seeds and steps, alternating runs after a warm-up; medians and
   guided/vanilla ratios of wall time and peak memory. Two scales: the committed toy model (batch 64, 25 steps, its
   skin classifier) and SD1.5 shapes (a `UNet2DConditionModel` from the SD1.5 config with random weights, 512 px, so
   h is [*, 1280, 8, 8], batch 4 with classifier-free guidance; precomputed random prompt embeddings and
   `output_type="latent"` for every arm, so no text encoder or VAE runs). The cost of one guidance step (the hook
   alone, on an h of the UNet's shape) is also timed in isolation.
2. extraction: images/s of `extract_from_folders` (DDIM inversion, fp16 shards) at batch 1 vs batch 16 on the toy
   model, and bytes stored per image in fp16 vs fp32 shards.
3. training: `train_classifier` on synthetic SD1.5-shaped features (2,000 images, h 1280x8x8) written shard by shard:
   peak memory and time per timestep, next to the size of one timestep's slice and of the whole feature set.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident set's high-water mark (VmHWM, reset
through /proc/self/clear_refs just before the measured call). A process keeps freed heap memory, so on CPU each
arm's peak is measured in a fresh worker process (`--memory subprocess`); the full SD1.5 scale on CPU measures it
in-process during the timed runs by default (`--memory auto`), because a worker would cost one more minute-long
UNet call per arm. Output: `<output-dir>/bench.json` and `<output-dir>/table.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
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

from h_classifiers.commands._common import positive_int  # noqa: E402
from h_classifiers.generation import generate_batches  # noqa: E402
from h_classifiers.io_utils import atomic_save_file, atomic_write_json, atomic_write_text  # noqa: E402


PARTS = ("generation", "extraction", "training")
SCALES = ("toy", "sd15")
ARMS = ("vanilla", "distribution", "sample")
GUIDED_ARMS = ARMS[1:]
MEMORY_MODES = ("auto", "subprocess", "inprocess")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
WORKER_TAG = "BENCH_WORKER_RESULT "
DEFAULT_OUTPUT_DIR = REPO_ROOT / "docs" / "bench"

# Targets of issue 5 (measured, never asserted in a test).
TARGET_WALL_RATIO = 1.05
TARGET_MEMORY_RATIO = 1.05
TARGET_EXTRACTION_SPEEDUP = 5.0
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
    toy_rounds: int = 3
    toy_warmup: int = 1
    sd15_batch: int = 4
    sd15_steps: int = 1
    sd15_rounds: int = 2
    sd15_warmup: int = 0
    guidance_step_repeats: int = 20
    extraction_images: int = 32
    extraction_steps: int = 25
    extraction_batches: list[int] = field(default_factory=lambda: [1, 16])
    extraction_rounds: int = 2
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
    "guidance_step_repeats": 3,
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


def torch_dtype(config: BenchConfig) -> torch.dtype:
    from h_classifiers.evaluation import DTYPES

    return DTYPES[config.dtype]


def random_classifier(h_shape: list[int], scheduler, seed: int, attribute: str, class_names: list[str]):
    """An HClassifier with seeded random heads at the scheduler's 50-step timesteps (shapes are what cost matters)."""
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
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        std = 1.0 / math.sqrt(math.prod(h_shape))
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * std)
    return classifier.eval()


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
    return None if (model / "model_index.json").is_file() else f"toy model not found at {model} (no model_index.json)"


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
    h_shape = guided.mid_block_h_shape(size, size)
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
    reason = f"no classifier at {path}"
    if (path / "config.json").is_file():
        shipped = HClassifier.load_config(path)
        if list(shipped["h_shape"]) == list(h_shape):
            return str(path), {"source": "shipped", "path": str(path), "class_names": shipped["class_names"]}
        reason = f"the classifier at {path} has h_shape {shipped['h_shape']}, the model gives {h_shape}"
    classifier = random_classifier(h_shape, scheduler, config.seed, "skin", ["light", "dark"])
    return classifier, {"source": "random", "reason": reason, "class_names": ["light", "dark"]}


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
    h_shape = guided.mid_block_h_shape(size, size)
    classifier = random_classifier(h_shape, scheduler, config.seed, "attribute", ["class_0", "class_1"])
    generator = torch.Generator().manual_seed(config.seed + 1)
    batch = config.sd15_batch
    embeds = torch.randn(2, batch, *text_shape, generator=generator).to(config.device, dtype)
    label = "tiny SD1.5-structured UNet (--quick)" if config.quick else "SD1.5 UNet config, random weights"
    return GenerationScale(
        name="sd15",
        stock=stock,
        guided=guided,
        classifier=classifier,
        classifier_info={"source": "random", "reason": "random heads of the SD1.5 h shape"},
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
        ],
        build_s=time.perf_counter() - start,
    )


def build_scale(config: BenchConfig, name: str) -> GenerationScale:
    return build_toy_scale(config) if name == "toy" else build_sd15_scale(config)


def guidance_kwargs(scale: GenerationScale, arm: str) -> dict[str, Any]:
    if arm == "vanilla":
        return {}
    kwargs = {"h_classifier": scale.classifier, "guidance_mode": arm}
    if arm == "distribution":
        kwargs["target_distribution"] = [0.5, 0.5]
    else:
        kwargs["target_classes"] = 1
    return kwargs


def run_arm(scale: GenerationScale, arm: str, config: BenchConfig) -> Any:
    """One generation call of all the scale's images: the stock pipeline for 'vanilla', else the Balancing Act
    pipeline; the same seeds (image i: seed + i, `generate_batches`)."""
    pipe = scale.stock if arm == "vanilla" else scale.guided
    kwargs = {**scale.call_kwargs, **guidance_kwargs(scale, arm)}
    prompts = kwargs.pop("prompt", None)
    per_image = {key: kwargs.pop(key) for key in ("prompt_embeds", "negative_prompt_embeds") if key in kwargs}
    (batch,) = generate_batches(pipe, prompts, config.seed, scale.num_images, per_image, **kwargs)
    return batch.output


def generation_memory_worker(config: BenchConfig, scale_name: str, arm: str) -> dict[str, Any]:
    scale = build_scale(config, scale_name)
    with PeakMemory(config.device) as memory:
        wall = timed(lambda: run_arm(scale, arm, config), config.device)
    return {**memory.as_dict(), "wall_s": wall, "build_s": scale.build_s}


def measure_guidance_step(
    scale: GenerationScale, arm: str, config: BenchConfig, classifier: Any = None
) -> dict[str, Any]:
    """Milliseconds of the pipeline's own mid-block hook on one h of the UNet's shape (the guidance cost per step).

    Uses the pipeline's internals (`check_guidance_inputs`, `_guide_h`); reports why when they are not there.
    `classifier` replaces the scale's classifier (e.g. one already moved to the GPU).
    """
    from pipeline_balancing_act import DEFAULT_GUIDANCE_STRENGTH

    guided = scale.guided
    rows = scale.num_images * (2 if scale.guidance_scale > 1 else 1)
    try:
        kwargs = guidance_kwargs(scale, arm)
        if classifier is not None:
            kwargs["h_classifier"] = classifier
        size = scale.call_kwargs.get("height") or guided.unet.config.sample_size * guided.vae_scale_factor
        values = {
            "h_classifier": kwargs["h_classifier"],
            "guidance_mode": arm,
            "target_distribution": kwargs.get("target_distribution"),
            "target_classes": kwargs.get("target_classes"),
            "guidance_strength": DEFAULT_GUIDANCE_STRENGTH,
            "guidance_steps": (0.0, 1.0),
            "distribution_solver": "assign",
            "classifier_temperature": None,
            "guided_branches": "cond",
            "balance_state": None,
            "num_images": scale.num_images,
            "timestep_values": guided._denoising_timesteps(scale.steps, None, None),
            "height": size,
            "width": size,
        }
        accepted = inspect.signature(guided.check_guidance_inputs).parameters
        plan = guided.check_guidance_inputs(**{k: v for k, v in values.items() if k in accepted})
        guided._guidance_scale = scale.guidance_scale
        plan.step_index = 0
        hook = guided._guide_h(plan)
    except (AttributeError, TypeError) as error:
        return {"available": False, "reason": f"pipeline internals changed: {error}"}
    generator = torch.Generator().manual_seed(config.seed)
    h = torch.randn(rows, *scale.h_shape, generator=generator).to(config.device, torch_dtype(config))
    with torch.no_grad():
        if hook(h) is None:
            return {"available": False, "reason": "the pipeline's hook did not guide the first step"}
        for _ in range(2):
            hook(h)
        times = [timed(lambda: hook(h), config.device) * 1000 for _ in range(config.guidance_step_repeats)]
    return {"available": True, "rows": rows, "ms_median": statistics.median(times), "ms_min": min(times)}


def classifier_on_device(scale: GenerationScale, config: BenchConfig) -> Any:
    from pipeline_balancing_act import HClassifier

    classifier = scale.classifier
    if isinstance(classifier, str):
        classifier = HClassifier.from_pretrained(classifier)
    return copy.deepcopy(classifier).to(config.device).eval()


def sync_count(scale: GenerationScale, arm: str, config: BenchConfig) -> int | None:
    """CUDA only: host-device synchronisations of one call, counted with torch's sync debug mode."""
    import warnings

    if not config.device.startswith("cuda"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_arm(scale, arm, config)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def memory_mode(config: BenchConfig, scale_name: str) -> str:
    if config.device.startswith("cuda"):
        return "inprocess"
    if config.memory != "auto":
        return config.memory
    # A fresh worker at full SD1.5 size costs one more minute-long UNet call per arm on a 2-core CPU.
    return "inprocess" if (scale_name == "sd15" and not config.quick) else "subprocess"


def bench_generation_scale(config: BenchConfig, scale_name: str) -> dict[str, Any]:
    scale = build_scale(config, scale_name)
    rounds, warmup = (
        (config.toy_rounds, config.toy_warmup) if scale_name == "toy" else (config.sd15_rounds, config.sd15_warmup)
    )
    for _ in range(warmup):
        for arm in ARMS:
            run_arm(scale, arm, config)
    walls: dict[str, list[float]] = {arm: [] for arm in ARMS}
    peaks: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    order = alternating_order(list(ARMS), rounds)
    for round_order in order:
        for arm in round_order:
            with PeakMemory(config.device) as memory:
                walls[arm].append(timed(lambda: run_arm(scale, arm, config), config.device))
            peaks[arm].append(memory.as_dict())

    mode = memory_mode(config, scale_name)
    arms: dict[str, Any] = {}
    for arm in ARMS:
        median = statistics.median(walls[arm])
        inprocess = max(peaks[arm], key=lambda m: m["peak_bytes"])
        arms[arm] = {
            "wall_s": walls[arm],
            "median_s": median,
            "s_per_step": median / scale.steps,
            "inprocess_memory": inprocess,
            "inprocess_memory_per_run": peaks[arm],
        }
        if mode == "subprocess":
            arms[arm]["memory"] = dict(run_worker({"kind": "generation", "scale": scale_name, "arm": arm}, config))
            arms[arm]["memory"]["measured_in"] = "fresh worker process, one call"
        else:
            arms[arm]["memory"] = dict(inprocess, measured_in="this process, max over the timed runs")
        if arm != "vanilla":
            arms[arm]["guidance_step"] = measure_guidance_step(scale, arm, config)
            arms[arm]["host_device_syncs"] = sync_count(scale, arm, config)
            if config.device.startswith("cuda"):
                # What moving the classifier to the UNet's device once per call would save.
                arms[arm]["guidance_step_classifier_on_device"] = measure_guidance_step(
                    scale, arm, config, classifier_on_device(scale, config)
                )
    if config.device.startswith("cuda"):
        arms["vanilla"]["host_device_syncs"] = sync_count(scale, "vanilla", config)

    vanilla = arms["vanilla"]
    ratios = {}
    for arm in GUIDED_ARMS:
        step = arms[arm]["guidance_step"]
        estimate = None
        if step.get("available"):
            estimate = 1 + (step["ms_median"] / 1000) / vanilla["s_per_step"]
        ratios[arm] = {
            "wall": ratio(arms[arm]["median_s"], vanilla["median_s"]),
            "peak_memory": ratio(arms[arm]["memory"]["peak_bytes"], vanilla["memory"]["peak_bytes"]),
            "peak_increment": ratio(arms[arm]["memory"]["increment_bytes"], vanilla["memory"]["increment_bytes"]),
            "wall_from_guidance_step": estimate,
        }
    return {
        "num_images": scale.num_images,
        "unet_rows": scale.num_images * (2 if scale.guidance_scale > 1 else 1),
        "steps": scale.steps,
        "guidance_scale": scale.guidance_scale,
        "h_shape": scale.h_shape,
        "dtype": config.dtype,
        "classifier": scale.classifier_info,
        "warmup_rounds": warmup,
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


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for scale, data in results.get("generation", {}).items():
        if "ratios" not in data:
            continue
        for arm, values in data["ratios"].items():
            for key, limit in (("wall", TARGET_WALL_RATIO), ("peak_memory", TARGET_MEMORY_RATIO)):
                value = values[key]
                targets.append(
                    {
                        "name": f"generation {scale} {arm}: guided/vanilla {key.replace('_', ' ')}",
                        "value": value,
                        "limit": f"<= {limit}",
                        "met": None if value is None else value <= limit,
                        "binding": scale == "sd15",
                    }
                )
    extraction = results.get("extraction", {})
    if extraction.get("speedup") is not None:
        value = extraction["speedup"]
        largest, smallest = extraction["speedup_of"]
        targets.append(
            {
                "name": f"extraction: images/s at batch {largest} / batch {smallest}",
                "value": value,
                "limit": f">= {TARGET_EXTRACTION_SPEEDUP}",
                "met": value >= TARGET_EXTRACTION_SPEEDUP,
                "binding": True,
            }
        )
    training = results.get("training", {})
    if training.get("increment_over_slice_plus_model") is not None:
        value = training["increment_over_slice_plus_model"]
        targets.append(
            {
                "name": "training: peak memory increment / (one timestep slice + model)",
                "value": value,
                "limit": f"<= {TARGET_TRAINING_SLICES} (the whole feature set is "
                f"{training['feature_set_bytes_nominal'] / (training['slice_bytes'] + training['model_bytes']):.0f})",
                "met": value <= TARGET_TRAINING_SLICES,
                "binding": True,
            }
        )
    return targets


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
            "| Scale | Arm | Median wall (s) | s/step | Wall ratio | Peak memory | Memory ratio | Guidance step (ms) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for scale, data in generation.items():
            if "skipped" in data:
                lines.append(f"| {scale} | skipped: {data['skipped']} | | | | | | |")
                continue
            label = (
                f"{scale}: {data['num_images']} images ({data['unet_rows']} UNet rows), {data['steps']} steps, "
                f"h {'x'.join(map(str, data['h_shape']))}"
            )
            for arm in ARMS:
                values = data["arms"][arm]
                r = data["ratios"].get(arm, {})
                step = values.get("guidance_step", {})
                lines.append(
                    f"| {label if arm == 'vanilla' else ''} | {arm} | {_num(values['median_s'], 2)} | "
                    f"{_num(values['s_per_step'], 3)} | {_num(r.get('wall')) if r else '1'} | "
                    f"{_mib(values['memory']['peak_bytes'])} | {_num(r.get('peak_memory')) if r else '1'} | "
                    f"{_num(step.get('ms_median'), 2) if step.get('available') else '-'} |"
                )
        lines.append("")
        for scale, data in generation.items():
            if "skipped" not in data:
                lines.append(
                    f"- {scale}: {'; '.join(data['notes'])}; classifier: {data['classifier']['source']}"
                    + (f" ({data['classifier']['reason']})" if data["classifier"].get("reason") else "")
                    + f"; {data['warmup_rounds']} warm-up round(s), {data['rounds']} timed round(s) alternating "
                    f"{data['order']}; memory: {data['arms']['vanilla']['memory']['measured_in']} "
                    f"({data['arms']['vanilla']['memory']['method']})."
                )
                syncs = {arm: data["arms"][arm].get("host_device_syncs") for arm in ARMS}
                if any(v is not None for v in syncs.values()):
                    on_device = {
                        arm: data["arms"][arm].get("guidance_step_classifier_on_device", {}).get("ms_median")
                        for arm in GUIDED_ARMS
                    }
                    lines.append(
                        f"- {scale}: host-device synchronisations per call {syncs}; guidance step with the classifier "
                        f"moved to the device first (ms): {on_device}."
                    )
        lines.append("")
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
            met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {t['name']} | {_num(t['value'])} | {t['limit']} | {met} |")
        lines.append("")
    return "\n".join(lines)


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
        prog="benchmarks/bench.py",
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
        default=list(SCALES),
        help="Generation scales (default: toy,sd15).",
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
    parser.add_argument("--sd15-steps", type=positive_int, default=None, help="Denoising steps at SD1.5 shapes.")
    parser.add_argument("--sd15-rounds", type=positive_int, default=None, help="Timed rounds at SD1.5 shapes.")
    parser.add_argument(
        "--sd15-warmup", type=int, default=None, help="Warm-up rounds at SD1.5 shapes (default: 0 on CPU, 1 on CUDA)."
    )
    parser.add_argument("--toy-rounds", type=positive_int, default=None, help="Timed rounds at the toy scale.")
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
        # A GPU step is cheap: more steps and rounds, and a warm-up (kernel selection, allocator pools).
        config.sd15_steps, config.sd15_rounds, config.sd15_warmup = 20, 5, 1
    overrides = {
        "sd15_steps": args.sd15_steps,
        "sd15_rounds": args.sd15_rounds,
        "sd15_warmup": args.sd15_warmup,
        "toy_rounds": args.toy_rounds,
        "training_timesteps": args.training_timesteps,
        "training_samples": args.training_samples,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if config.sd15_warmup < 0:
        raise SystemExit(f"bench.py: --sd15-warmup must be >= 0, got {config.sd15_warmup}.")
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
        "config": asdict(config),
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
