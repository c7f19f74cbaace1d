"""Train the toy world's unconditional pixel-space DDPM (the paper's unconditional setting) from a seed.

    python lab/train_toy_ddpm.py --report docs/lab/toy_ddpm_report.json --grid docs/lab/toy_ddpm_grid.png
    python lab/train_toy_ddpm.py --steps 4000 --report docs/lab/toy_ddpm_report.json --grid docs/lab/toy_ddpm_grid.png
    python lab/train_toy_ddpm.py --output .work/toy-ddpm --work-dir .work/toy-ddpm-train

The data is the toy Stable Diffusion's: `make_toy_dataset(--num-images, seed=--seed)`, with the same bias, images
only. A `UNet2DModel` (`lab.toy_model.build_pixel_unet`: h is `[B, 128, 4, 4]`, after three downsamplings)
learns epsilon prediction on DDPM's linear betas, with AdamW, a cosine learning-rate schedule and an EMA of the weights;
the EMA weights are exported as a standard diffusers `DDIMPipeline` directory (unet + scheduler, safetensors).
Checkpoints (safetensors) go under `--work-dir`; a rerun of the same command resumes from the last one, and once
training is complete it only exports again (and reports). A finished run rerun with a larger `--steps` continues from
its last checkpoint under the longer cosine schedule (a warm restart, recorded as `extended_from` in the report). `--report` samples the exported model with DDIM (eta 0 and
eta 1) and writes the oracle's valid rate and class fractions as JSON (`--grid`: and a PNG of samples).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from h_classifiers.arguments import positive_int  # noqa: E402
from h_classifiers.io_utils import atomic_save_file, atomic_write_json, atomic_write_text, portable_path  # noqa: E402
from h_classifiers.toy_world import ATTRIBUTES, DATA_BIAS, TOY_DDPM_PATH, ToyOracle, make_toy_dataset  # noqa: E402
from lab.toy_ddpm_diagnostics import diagnostics_markdown, h_dependence, noise_fit  # noqa: E402
from lab.toy_model import (  # noqa: E402
    PIXEL_TRAIN_SCHEDULER_CONFIG,
    add_cut_skips_argument,
    build_pixel_scheduler,
    build_pixel_unet,
    cut_deep_skips,
    hold_cut,
)
from lab.toy_report import save_grid, summarise  # noqa: E402
from lab.train_toy_model import (  # noqa: E402
    _step_generator,
    checkpoint_metadata,
    cosine_schedule,
    load_checkpoint,
    save_checkpoint,
    save_pipeline,
)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def _stages(metadata: dict[str, str]) -> list[str]:
    """The step counts of the earlier, finished runs a checkpoint's run extends (its "stages" metadata)."""
    return [s for s in metadata.get("stages", "").split(",") if s]


LOW_FREQUENCY_GRIDS = (1, 2, 4, 8)


def low_frequency_loss(predicted: torch.Tensor, noise: torch.Tensor, noise_fraction: torch.Tensor) -> torch.Tensor:
    """Per image, the noise error averaged over cells of a 1x1, 2x2, 4x4 and 8x8 grid, each grid's squared error
    scaled by its cell area so that its noise has unit variance per value, averaged over the grids, and weighted by
    the image's noise fraction `1 - alpha_bar_t`.

    The plain loss weighs a grid of k x k cells by k^2 / (H * W): the image's mean colour (1x1) counts 1/1024 at
    32x32, so a UNet barely learns the noise's mean, and its x0 estimate at high noise misses the image's colour.
    Sampling with fresh noise at every step (eta 1) turns that error into colour drift; DDIM at eta 0 hides it. At
    low noise the coarse noise cannot be told from the image's own colour: unweighted, that error cannot shrink,
    swamps the gradient (clipped to norm 1) and the fine denoising that DDIM at eta 0 needs is lost (measured:
    docs/lab/toy_ddpm_ablation.md). The minimiser is the same (each component's conditional mean); only the weight
    of the coarse components changes.
    """
    height, width = noise.shape[-2:]
    terms = []
    for grid in LOW_FREQUENCY_GRIDS:
        area = (height // grid) * (width // grid)
        error = F.adaptive_avg_pool2d(predicted - noise, grid)
        terms.append(error.pow(2).mean(dim=(1, 2, 3)) * area)
    return torch.stack(terms).mean(dim=0) * noise_fraction


def ema_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights out of a training checkpoint's tensors (saved under `ema_unet.`)."""
    return {k[len("ema_unet.") :]: v for k, v in tensors.items() if k.startswith("ema_unet.")}


def train_pixel_unet(args, images: torch.Tensor, work: Path):
    """Train (or resume, or load once complete) the UNet; returns its EMA copy and the final file's metadata, or None
    for the model when `--stop-after` ended this run before the last step."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    torch.manual_seed(args.seed)
    unet = build_pixel_unet()
    ema_unet = copy.deepcopy(unet)  # holds the EMA weights in checkpoints and in the exported model
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    modules = {"unet": unet, "ema_unet": ema_unet}
    final = work / "unet_final.safetensors"
    stages = []  # the step counts of earlier, finished runs this one extends
    if final.exists() and int(checkpoint_metadata(final)["step"]) < args.steps:
        # A finished run continued to a larger --steps: its last checkpoint resumes under the new, longer cosine
        # schedule (a warm restart), and the final file is written again at the end.
        previous = checkpoint_metadata(final)
        stages = [*_stages(previous), previous["step"]]
        final.unlink()
    if final.exists():
        tensors = load_file(str(final))
        ema_unet.load_state_dict(ema_weights(tensors))
        return ema_unet, checkpoint_metadata(final)
    lr_scheduler = cosine_schedule(optimizer, args.steps, warmup=min(args.warmup, args.steps // 10))
    ckpt = work / "unet_checkpoint.safetensors"
    start, seconds = 0, 0.0
    if ckpt.exists():
        start = load_checkpoint(ckpt, modules, optimizer, lr_scheduler)
        saved = checkpoint_metadata(ckpt)
        seconds = float(saved.get("train_seconds", 0.0))
        stages = stages or _stages(saved)
    elif args.init_from is not None:  # a new run that starts from a finished model's weights (fresh optimizer)
        start_weights = load_file(str(Path(args.init_from) / "unet" / "diffusion_pytorch_model.safetensors"))
        unet.load_state_dict(start_weights)
        ema_unet.load_state_dict(start_weights)
    cut = cut_deep_skips(unet, args.cut_skips)
    cut_deep_skips(ema_unet, args.cut_skips)
    ema = EMAModel(ema_unet.parameters(), decay=args.ema_decay)  # starts from the (restored) EMA weights
    ema.load_state_dict({"optimization_step": start})

    def save(step: int) -> None:
        ema.copy_to(ema_unet.parameters())
        elapsed = seconds + time.time() - t0
        extra = {"train_seconds": f"{elapsed:.1f}", **({"stages": ",".join(stages)} if stages else {})}
        save_checkpoint(ckpt, modules, optimizer, step, lr_scheduler, extra)

    scheduler = DDPMScheduler(**PIXEL_TRAIN_SCHEDULER_CONFIG)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    unet.train()
    t0 = time.time()
    bar = tqdm(range(start, end), initial=start, total=args.steps, desc="UNet", mininterval=30)
    for step in bar:
        g = _step_generator(args.seed, 1, step)
        b = args.batch_size
        x0 = images[torch.randint(len(images), (b,), generator=g)] * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        predicted = unet(xt, t).sample
        loss = F.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.low_frequency_weight:
            noise_fraction = 1 - scheduler.alphas_cumprod[t]
            loss = loss + args.low_frequency_weight * low_frequency_loss(predicted, noise, noise_fraction)
        if args.snr_gamma is not None:  # Min-SNR-gamma (Hang et al., 2023), as diffusers' training examples
            snr = compute_snr(scheduler, t)
            loss = loss * snr.clamp(max=args.snr_gamma) / snr
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        hold_cut(cut)
        lr_scheduler.step()
        ema.step(unet.parameters())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        # also at the end of a run, finished or not: a later, longer --steps extends from exactly there
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == end:
            save(step + 1)
    if end < args.steps:
        return None, {"step": str(end), "train_seconds": f"{seconds + time.time() - t0:.1f}"}
    ema.copy_to(ema_unet.parameters())
    metadata = {"step": str(args.steps), "train_seconds": f"{seconds + time.time() - t0:.1f}"}
    if stages:
        metadata["stages"] = ",".join(stages)
    atomic_save_file({f"ema_unet.{k}": v for k, v in ema_unet.state_dict().items()}, final, metadata)
    return ema_unet, metadata


def export_pipeline(unet, output: Path) -> None:
    """Save a stock `DDIMPipeline` directory (unet + DDIM scheduler), swapped in place of `output` once complete."""
    from diffusers import DDIMPipeline

    save_pipeline(DDIMPipeline(unet=unet.eval(), scheduler=build_pixel_scheduler()), output)


# ---------------------------------------------------------------------------------------------------------------
# The oracle report
# ---------------------------------------------------------------------------------------------------------------


def load_pixel_pipeline(path: str | Path = TOY_DDPM_PATH):
    """The toy DDPM as a stock `DDIMPipeline` (offline, CPU)."""
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_pixel_images(pipe, num_samples: int, steps: int, eta: float, seed: int, batch_size: int) -> torch.Tensor:
    """`num_samples` DDIM samples [N, 3, 32, 32] in [0, 1]; image i draws from its own generator (seed `seed + i`), so
    the samples do not depend on the batch size."""
    chunks = []
    for first in range(0, num_samples, batch_size):
        generators = [
            torch.Generator().manual_seed(seed + i) for i in range(first, min(num_samples, first + batch_size))
        ]
        out = pipe(
            batch_size=len(generators), generator=generators, num_inference_steps=steps, eta=eta, output_type="np"
        )
        chunks.append(torch.from_numpy(out.images).permute(0, 3, 1, 2).float())
    return torch.cat(chunks)


def oracle_report(
    pipe, num_samples: int, steps: int, etas: list[float], seed: int, batch_size: int
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Per eta (keys `eta_0`, `eta_1`, ...): the oracle's valid rate, class fractions (over all samples and over the
    valid ones) and the pass rate of each validity check of `num_samples` DDIM samples, and how long sampling took;
    and the samples themselves."""
    rows, samples = {}, {}
    for eta in etas:
        t0 = time.time()
        key = f"eta_{eta:g}"
        samples[key] = sample_pixel_images(pipe, num_samples, steps, eta, seed, batch_size)
        checks = ToyOracle().diagnose(samples[key])
        rows[key] = summarise(ToyOracle().read(samples[key]), None, None)
        rows[key]["checks_passed"] = {k: float(v.float().mean()) for k, v in checks.items() if k.endswith("_ok")}
        rows[key].update(eta=eta, steps=steps, seed=seed, sample_seconds=round(time.time() - t0, 1))
    return rows, samples


def write_report(args, metadata: dict[str, str]) -> dict:
    """Measure the exported model (`--output`) with the oracle and write `--report` (paths relative to the
    repository)."""
    pipe = load_pixel_pipeline(args.output)
    h_shape = []
    hook = pipe.unet.mid_block.register_forward_hook(lambda module, inputs, output: h_shape.append(list(output.shape)))
    with torch.no_grad():
        pipe.unet(torch.zeros(1, 3, pipe.unet.config.sample_size, pipe.unet.config.sample_size), 0)
    hook.remove()
    report = {
        "model": portable_path(args.output),
        "architecture": {
            "class": type(pipe.unet).__name__,
            "block_out_channels": list(pipe.unet.config.block_out_channels),
            "parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "h_shape": h_shape[0][1:],
            "scheduler": type(pipe.scheduler).__name__,
        },
        "training": {
            "num_images": args.num_images,
            "steps": int(metadata["step"]),
            # earlier finished runs this one extended (warm restarts of the cosine schedule), in steps
            "extended_from": [int(s) for s in _stages(metadata)],
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "ema_decay": args.ema_decay,
            "snr_gamma": args.snr_gamma,
            "low_frequency_weight": args.low_frequency_weight,
            "cut_skips": args.cut_skips,
            "seed": args.seed,
            "threads": args.threads,
            "train_seconds": float(metadata["train_seconds"]),
        },
        "data_bias": {a: dict(zip(ATTRIBUTES[a], p)) for a, p in DATA_BIAS.items()},
    }
    report["samples"], samples = oracle_report(
        pipe, args.report_samples, args.report_steps, args.report_etas, args.report_seed, args.report_batch_size
    )
    report["diagnostics"] = model_diagnostics(pipe, args)
    if args.init_from is not None:
        report["training"]["init_from"] = portable_path(args.init_from)
    compared = args.previous_model or args.init_from
    if compared is not None:  # the model this one replaces (by default the one it started from), measured the same way
        previous = load_pixel_pipeline(compared)
        report["previous"] = {
            "model": portable_path(compared),
            "training": json.loads(args.previous_report.read_text())["training"] if args.previous_report else None,
        }
        report["previous"]["samples"], _ = oracle_report(
            previous,
            args.report_samples,
            args.report_steps,
            args.report_etas,
            args.report_seed,
            args.report_batch_size,
        )
        report["previous"]["diagnostics"] = model_diagnostics(previous, args)
    atomic_write_json(args.report, report)
    atomic_write_text(Path(args.report).with_suffix(".md"), report_markdown(report))
    if args.grid is not None:  # the first samples of each eta, one row each
        save_grid(
            [(f"DDIM {args.report_steps} steps, {key.replace('_', ' ')}", x) for key, x in samples.items()],
            args.grid,
            16,
        )
    return report


def model_diagnostics(pipe, args) -> dict:
    """The noise fit per timestep and the h dependence (DDIM at `--report-steps`, each report eta) of one model."""

    def sample(pipe, num_images: int, eta: float, seed: int) -> torch.Tensor:
        return sample_pixel_images(pipe, num_images, args.report_steps, eta, seed, args.report_batch_size)

    with torch.no_grad():
        fit = noise_fit(pipe.unet.eval(), PIXEL_TRAIN_SCHEDULER_CONFIG, num_images=args.fit_images)
    return {
        "noise_fit": fit,
        "h_dependence": h_dependence(pipe, sample, args.report_etas, num_images=args.h_dependence_images),
    }


def report_markdown(report: dict) -> str:
    """The report's samples as a table: valid rate, class fractions and each validity check's pass rate per eta."""
    training = report["training"]
    extended = "".join(f"{s} then " for s in training.get("extended_from", []))
    lines = [
        "<!-- generated by lab/train_toy_ddpm.py --report: do not edit by hand -->",
        "# The toy DDPM: what it generates",
        "",
        f"`{report['model']}`: {report['architecture']['parameters']:,} parameters, h "
        f"{report['architecture']['h_shape']}, trained {extended}{training['steps']} steps at batch "
        f"{training['batch_size']} in {training['train_seconds'] / 60:.0f} min ({training['threads']} thread). "
        "Samples: DDIM, read by the toy oracle; fractions over all samples (the oracle's best guess for an invalid "
        "image).",
        "",
        "| | samples | valid | " + " | ".join(ATTRIBUTES) + " | checks passed |",
        "|---|---|---|" + "---|" * len(ATTRIBUTES) + "---|",
        "| data (`DATA_BIAS`) | | 1.000 | "
        + " | ".join(" / ".join(f"{p:.3f}" for p in report["data_bias"][a].values()) for a in ATTRIBUTES)
        + " | |",
    ]
    rows = [("", report["samples"])]
    if "previous" in report:
        rows.append(("previous model: ", report["previous"]["samples"]))
    for prefix, key, row in [(prefix, key, row) for prefix, samples in rows for key, row in samples.items()]:
        fractions = " | ".join(" / ".join(f"{p:.3f}" for p in row["fractions"][a].values()) for a in ATTRIBUTES)
        checks = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in row["checks_passed"].items())
        lines.append(
            f"| {prefix}DDIM {row['steps']}, eta {row['eta']:g} | {row['num_samples']} | {row['valid_rate']:.3f} | "
            f"{fractions} | {checks} |"
        )
    classes = "; ".join(f"{a}: {' / '.join(c)}" for a, c in ATTRIBUTES.items())
    lines += ["", f"Classes in column order: {classes}."]
    if training.get("init_from"):
        lines += [
            "",
            f"This run started from `{training['init_from']}` with a fresh optimizer: {training['steps']} steps at "
            f"learning rate {training['lr']:g} (cosine), low-frequency loss weight "
            f"{training.get('low_frequency_weight', 0.0):g}"
            + (
                f", the skip connections into the {training['cut_skips']} lowest-resolution up blocks cut "
                "(`lab.toy_model.cut_deep_skips`)."
                if training.get("cut_skips")
                else "."
            ),
        ]
    if "previous" in report:
        history = report["previous"]["training"]
        lines += [
            "",
            f"The previous model, `{report['previous']['model']}`"
            + (f" (trained {history['steps']} steps at batch {history['batch_size']})" if history else "")
            + ", is measured beside it with the same code.",
        ]
    if "diagnostics" in report:
        models = {"this model": report["diagnostics"]}
        if "previous" in report:
            models["previous model"] = report["previous"]["diagnostics"]
        lines += diagnostics_markdown(models)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the toy world's unconditional pixel DDPM on the CPU.")
    p.add_argument("--output", type=Path, default=TOY_DDPM_PATH, help="Where the DDIMPipeline directory is saved.")
    p.add_argument("--work-dir", type=Path, default=Path(".work/toy-ddpm-train"), help="Checkpoints.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=positive_int, default=30_000)
    p.add_argument("--steps", type=positive_int, default=1400)
    p.add_argument("--batch-size", type=positive_int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=50, help="Warm-up steps (at most a tenth of --steps).")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument(
        "--snr-gamma", type=float, default=None, help="Min-SNR loss weighting: min(SNR, gamma) / SNR; none if unset."
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="Start from this exported DDIMPipeline's weights (a new cosine run with a fresh optimizer); its report "
        "(--previous-report) is kept in the new one.",
    )
    p.add_argument(
        "--previous-model",
        type=Path,
        default=None,
        help="With --report: the model this one replaces, measured beside it (default: --init-from).",
    )
    p.add_argument(
        "--previous-report", type=Path, default=None, help="The report of the previous model (its training)."
    )
    p.add_argument(
        "--low-frequency-weight",
        type=float,
        default=0.0,
        help="Weight of the coarse noise error (`low_frequency_loss`): 0 is the plain epsilon loss.",
    )
    add_cut_skips_argument(p)
    p.add_argument("--checkpoint-every", type=positive_int, default=50)
    p.add_argument(
        "--stop-after", type=positive_int, default=None, help="Stop after this many steps in this run (resumable)."
    )
    p.add_argument("--report", type=Path, default=None, help="Write the oracle report of the exported model here.")
    p.add_argument("--grid", type=Path, default=None, help="With --report: a PNG of 16 samples per eta.")
    p.add_argument("--report-samples", type=positive_int, default=256)
    p.add_argument("--report-steps", type=positive_int, default=50, help="DDIM steps.")
    p.add_argument("--report-etas", type=float, nargs="+", default=[0.0, 1.0], help="DDIM eta values.")
    p.add_argument("--report-seed", type=int, default=0)
    p.add_argument("--report-batch-size", type=positive_int, default=64)
    p.add_argument("--fit-images", type=positive_int, default=256, help="Held-out faces of the noise fit.")
    p.add_argument("--h-dependence-images", type=positive_int, default=64, help="Samples of the h dependence.")
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads; 1 is fastest on a busy 2-core machine."
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    """Train, export, and report if asked; returns the report (or None)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    t0 = time.time()

    data = make_toy_dataset(args.num_images, seed=args.seed)
    print(f"data: {args.num_images} images ({time.time() - t0:.0f}s)")
    unet, metadata = train_pixel_unet(args, data.images, work)
    if unet is None:
        print(f"stopped at step {metadata['step']} of {args.steps}; rerun to resume ({time.time() - t0:.0f}s)")
        return None
    print(f"trained {metadata['step']} steps in {float(metadata['train_seconds']):.0f}s (all runs)")
    export_pipeline(unet, args.output)
    print(f"saved {args.output} ({time.time() - t0:.0f}s in this run)")
    if args.report is None:
        return None
    report = write_report(args, metadata)
    for key, row in report["samples"].items():
        print(f"{key}: valid {row['valid_rate']:.3f}, fractions {json.dumps(row['fractions'])}")
    print(f"wrote {args.report} ({time.time() - t0:.0f}s in this run)")
    return report


if __name__ == "__main__":
    main()
