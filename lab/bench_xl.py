"""What a guided step costs at Stable Diffusion XL's size (a research tool): one UNet forward against the guidance's
own work in that step (`_GuidanceRun.on_h`, one classifier), at SDXL base 1.0's UNet config with random weights.

    python lab/bench_xl.py                   # 512 x 512 (latents 64x64): docs/lab/bench_xl.json + docs/lab/bench_xl.md
    python lab/bench_xl.py --size 1024       # SDXL's native 1024 x 1024 (latents 128x128, h [1280, 32, 32])
    python lab/bench_xl.py --pool-size 4     # a pooled classifier, where the core's HClassifier takes `pool_size`
    python lab/bench_xl.py --tiny            # a check that it runs: 1/8 width, 256 px, into outputs/bench_xl_tiny

One image with classifier-free guidance (2 UNet rows), one denoising step (Euler's first of 50), float32 on the CPU by
default. Timed, in alternating order after `--warmup` rounds: the UNet forward alone (no hook), the same forward with
the guided call's hook (`MidBlockHook` running `on_h`: read h, move it, the up blocks on the moved h), and `on_h` alone
on the h that forward computed, in sample mode and in distribution mode (one image: with a `BalanceState`, as the
pipeline asks). The classifier is random (its values do not change the cost): per-step heads, identity calibration,
random anchors, at the 50 timesteps of SDXL's scheduler. The real config holds 2.6 B parameters: about 10 GB in
float32, so the host needs well over that in memory. Where `--device cuda` is given the UNet runs there.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from h_classifiers.io_utils import atomic_write_json, atomic_write_text, portable_path  # noqa: E402
from lab import LAB_DOCS  # noqa: E402
from lab.bench.config import (  # noqa: E402
    SDXL_POOLED_DIM,
    SDXL_SCHEDULER_CONFIG,
    SDXL_UNET_CONFIG,
    scaled_sdxl_unet_config,
)
from lab.bench.measuring import cpu_model, timed  # noqa: E402


TINY_DIVISOR = 8  # --tiny: every width / 8 (tests/test_xl_real_shapes.py runs the same UNet)
TINY_SIZE = 256
GUIDANCE_SCALE = 5.0  # StableDiffusionXLPipeline's default
NUM_STEPS = 50  # the schedule the classifier's heads are made for; the timed step is its first
MODES = ("sample", "distribution")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def supports_pooling() -> bool:
    from pipeline_balancing_act import HClassifier

    return "pool_size" in inspect.signature(HClassifier.__init__).parameters


def random_classifier(h_shape: list[int], timesteps: list[float], pool_size: int | None, seed: int):
    """Random heads of logits of order 1, identity calibration, random anchors of norm about 1 (flat or pooled)."""
    from pipeline_balancing_act import HClassifier

    extra = {} if pool_size is None else {"pool_size": pool_size}
    classifier = HClassifier(
        attribute="attribute", class_names=["class_0", "class_1"], h_shape=h_shape, timesteps=timesteps, **extra
    )
    num_heads, num_classes, dim = classifier.weight.shape
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) / math.sqrt(dim))
    classifier.set_calibration([1.0] * num_heads, [[0.0] * num_classes] * num_heads)
    anchors = torch.randn(classifier.weight.shape, generator=generator) / math.sqrt(dim)
    classifier.set_anchors(anchors, "random (benchmark)")
    return classifier.eval()


def summary(seconds: list[float]) -> dict[str, Any]:
    ms = sorted(1000 * s for s in seconds)
    return {"median_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))], "samples_ms": ms}


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The UNet, its inputs for one step of one image with classifier-free guidance, and a pipeline around it."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from pipeline_balancing_act_xl import BalancingActXLPipeline

    config = scaled_sdxl_unet_config(TINY_DIVISOR) if args.tiny else SDXL_UNET_CONFIG
    size = TINY_SIZE if args.tiny else args.size
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**config).eval().to(device)
    if dtype != torch.float32:
        unet.to(dtype)
    pipe = BalancingActXLPipeline(
        vae=None,  # vae_scale_factor 8, SDXL's
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.scheduler.set_timesteps(NUM_STEPS)
    latent, rows = size // pipe.vae_scale_factor, 2
    pooled = SDXL_POOLED_DIM // (TINY_DIVISOR if args.tiny else 1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    inputs = {
        "sample": torch.randn(rows, 4, latent, latent, generator=generator),
        "timestep": pipe.scheduler.timesteps[0],
        "encoder_hidden_states": torch.randn(rows, 77, config["cross_attention_dim"], generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, pooled, generator=generator),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, dtype=torch.float32),
        },
    }
    inputs = {k: v.to(device, dtype) if k in ("sample", "encoder_hidden_states") else v for k, v in inputs.items()}
    inputs["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in inputs["added_cond_kwargs"].items()}
    return {"pipe": pipe, "unet": unet, "inputs": inputs, "size": size, "latent": latent, "rows": rows}


def guided_run(pipe, classifier, mode: str, device: torch.device, size: int):
    """A started `_GuidanceRun` of one image at the first of the scheduler's steps (the only one that reads h)."""
    import pipeline_balancing_act as pba

    target = {"target_classes": 1} if mode == "sample" else {"target_distribution": [0.5, 0.5]}
    state = pba.BalanceState() if mode == "distribution" else None  # one image: the counts carried across calls
    arguments = pba.GuidanceArguments(
        h_classifier=classifier, guidance_mode=mode, guidance_steps=[0], balance_state=state, **target
    )
    run = pba._GuidanceRun(pipe.prepare_guidance(pipe.check_guidance_inputs(arguments)), False, None)
    pipe.start_guidance(run, 1, size, size, device, cfg=True, guidance_scale=GUIDANCE_SCALE)
    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    from pipeline_balancing_act import MidBlockHook

    pool_size = args.pool_size
    if pool_size is not None and not supports_pooling():
        raise SystemExit("--pool-size: this core's HClassifier has no `pool_size` (pooled heads); run without it.")
    start = time.perf_counter()
    built = build(args)
    pipe, unet, inputs, size = built["pipe"], built["unet"], built["inputs"], built["size"]
    device = torch.device(args.device)
    h_shape = pipe.h_shape(size, size)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    classifier = random_classifier(h_shape, timesteps, pool_size, args.seed)
    runs = {mode: guided_run(pipe, classifier, mode, device, size) for mode in MODES}
    captured = []
    with torch.no_grad(), MidBlockHook(unet, lambda h: captured.append(h)):
        unet(**inputs)
    h = captured[0]

    def forward(hook=None):
        with torch.no_grad(), MidBlockHook(unet, hook) if hook else contextlib.nullcontext():
            return unet(**inputs).sample

    arms = {
        "unet_forward": lambda: forward(),
        "guided_forward": lambda: forward(runs["sample"].on_h),
        **{f"on_h_{mode}": (lambda run=run: run.on_h(h)) for mode, run in runs.items()},
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for index in range(args.warmup + args.rounds):
        order = list(arms) if index % 2 == 0 else list(reversed(arms))
        for name in order:
            elapsed = timed(arms[name], args.device)
            if index >= args.warmup:
                times[name].append(elapsed)
    timings = {name: summary(values) for name, values in times.items()}
    forward_ms = timings["unet_forward"]["median_ms"]
    classifier_bytes = sum(t.numel() * t.element_size() for t in [*classifier.parameters(), *classifier.buffers()])
    return {
        "generated_by": "python lab/bench_xl.py",
        "machine": cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "unet": f"SDXL base 1.0 UNet config at 1/{TINY_DIVISOR} width (--tiny)"
        if args.tiny
        else "SDXL base 1.0 UNet config",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "image_size": size,
        "latent_size": built["latent"],
        "unet_rows": built["rows"],
        "h_shape": h_shape,
        "classifier": {
            "pool_size": pool_size,
            "heads": len(timesteps),
            "features_per_head": int(classifier.weight.shape[-1]),
            "bytes": classifier_bytes,
        },
        "rounds": args.rounds,
        "warmup": args.warmup,
        "timings": timings,
        "ratios": {
            "guided_forward_over_forward": timings["guided_forward"]["median_ms"] / forward_ms,
            **{f"on_h_{mode}_over_forward": timings[f"on_h_{mode}"]["median_ms"] / forward_ms for mode in MODES},
        },
        "total_s": time.perf_counter() - start,
    }


def markdown(results: dict[str, Any]) -> str:
    classifier, timings, ratios = results["classifier"], results["timings"], results["ratios"]
    kind = (
        "flat" if classifier["pool_size"] is None else f"pooled to {classifier['pool_size']}x{classifier['pool_size']}"
    )
    size = results["image_size"]
    lines = [
        "<!-- generated by python lab/bench_xl.py: do not edit by hand -->",
        "# A guided step at Stable Diffusion XL's size",
        "",
        f"{results['unet']} ({results['unet_parameters'] / 1e9:.2f} B parameters, random weights), {size} x {size} "
        f"px (latents {results['latent_size']}x{results['latent_size']}), {results['unet_rows']} UNet rows (one image "
        f"with classifier-free guidance), {results['dtype']} on {results['device']}: {results['machine']}, "
        f"{results['threads']} thread(s), torch {results['torch']}, diffusers {results['diffusers']}, "
        f"{results['date']}. h is {results['h_shape']}; one {kind} classifier, {classifier['heads']} heads of "
        f"{classifier['features_per_head']:,} features ({classifier['bytes'] / 2**20:.0f} MiB with its anchors). "
        f"Median (p95) of {results['rounds']} rounds after {results['warmup']} warm-up round(s), in alternating "
        "order.",
        "",
        "| what | median ms | p95 ms | / UNet forward |",
        "|---|---|---|---|",
    ]
    names = {
        "unet_forward": "UNet forward, no hook",
        "guided_forward": "UNet forward with the guided call's hook (sample mode)",
        "on_h_sample": "`on_h` alone, sample mode",
        "on_h_distribution": "`on_h` alone, distribution mode (with a BalanceState)",
    }
    for key, name in names.items():
        ratio = 1.0 if key == "unet_forward" else ratios[f"{key}_over_forward"]
        lines.append(f"| {name} | {timings[key]['median_ms']:.1f} | {timings[key]['p95_ms']:.1f} | {ratio:.4f} |")
    flags = [
        f"--size {results['image_size']}" if results["image_size"] != 512 else "",
        f"--pool-size {pool}" if (pool := results["classifier"].get("pool_size")) else "",
        f"--rounds {results['rounds']} --warmup {results['warmup']}"
        if (results["rounds"], results["warmup"]) != (3, 1)
        else "",
        f"--threads {results['threads']}" if results.get("threads") else "",
        f"--output-dir {results['output_dir']}" if results.get("output_dir") else "",
    ]
    command = " ".join(["python lab/bench_xl.py", *filter(None, flags)])
    lines += ["", f"Regenerate: `{command}` (`--size 1024` for SDXL's native size).", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=(512, 1024), default=512, help="Image size in pixels.")
    parser.add_argument("--tiny", action="store_true", help="1/8 width at 256 px: a check that the tool runs.")
    parser.add_argument("--pool-size", type=int, default=None, help="Pooled heads (g x g); default: flat heads.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="Where bench_xl.json and bench_xl.md go (default: docs/lab; with --tiny: outputs/bench_xl_tiny).",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = args.output_dir or (REPO_ROOT / "outputs" / "bench_xl_tiny" if args.tiny else LAB_DOCS)
    results = measure(args)
    if args.output_dir is not None:
        results["output_dir"] = portable_path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "bench_xl.json", results)
    atomic_write_text(output_dir / "bench_xl.md", markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
