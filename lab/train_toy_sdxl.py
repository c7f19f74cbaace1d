"""Train the toy world's miniature Stable Diffusion XL from a seed, on faces in three aspect-ratio buckets.

    python lab/train_toy_sdxl.py --report docs/lab/toy_sdxl_report.json --grid docs/lab/toy_sdxl_grid.png
    python lab/train_toy_sdxl.py --output .work/toy-sdxl --work-dir .work/toy-sdxl-train --stop-after 500

The architecture is `lab.toy_sdxl`: the toy SD's VAE (`h_classifiers/assets/toy-sd/vae`, reused as is, not trained
here), two tiny CLIP text encoders and an SDXL-shaped UNet. The data is the toy SD's, in three buckets
(`lab.toy_sdxl.BUCKETS`: 32x32, 32x48, 48x32, the face at the same scale in the centre): each bucket has its own
images (`make_toy_dataset(..., canvas=...)`, a seed of its own), encoded once by the VAE and cached under
`--work-dir`. Each training step draws one batch from one bucket, in the cycle square, wide, square, tall. Both text
encoders train jointly with the UNet, with SDXL's conditioning: the penultimate layers of both encoders as context,
the pooled embedding of encoder 2 and the bucket's micro-conditioning (original size, crop top-left (0, 0), target
size) as added conditioning. Dropped captions (classifier-free guidance) get zeros for both embeddings, as SDXL was
trained, so the model is saved with `force_zeros_for_empty_prompt`. AdamW, a cosine learning-rate schedule and an
EMA of the weights; the EMA weights are exported as a standard diffusers `StableDiffusionXLPipeline` directory
(safetensors, DDIM scheduler, no watermark) to `--output`, by default `lab/assets/toy-sdxl` (the lab's assets: not
in the wheel).

Checkpoints (safetensors) go under `--work-dir`; a rerun of the same command resumes from the last one
(`--stop-after N` ends a run after N steps), and once training is complete it only exports again (and reports).
`--report` samples the exported model with the stock pipeline in every bucket and writes the toy oracle's valid rate
and class fractions (read from each image's centre square) as JSON and a generated markdown page (`--grid`: and a PNG
of samples per bucket).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from h_classifiers.arguments import positive_int  # noqa: E402
from h_classifiers.generation import generate_batches  # noqa: E402
from h_classifiers.io_utils import (  # noqa: E402
    atomic_save_file,
    atomic_save_image,
    atomic_write_json,
    atomic_write_text,
    portable_path,
)
from h_classifiers.toy_world import (  # noqa: E402
    ATTRIBUTES,
    DATA_BIAS,
    NEUTRAL_PROMPT,
    TOY_MODEL_PATH,
    ToyOracle,
    make_toy_dataset,
)
from lab import ROOT  # noqa: E402
from lab.toy_model import (  # noqa: E402
    MAX_TOKENS,
    TRAIN_SCHEDULER_CONFIG,
    add_cut_skips_argument,
    build_tokenizer,
    cut_deep_skips,
    hold_cut,
)
from lab.toy_report import summarise  # noqa: E402
from lab.toy_sdxl import (  # noqa: E402
    BUCKET_CYCLE,
    BUCKETS,
    VAE_SCALE_FACTOR,
    add_time_ids,
    build_scheduler,
    build_text_encoder,
    build_unet,
    encode_text,
)
from lab.train_toy_model import (  # noqa: E402
    _step_generator,
    checkpoint_metadata,
    cosine_schedule,
    load_checkpoint,
    make_caption_pool,
    save_checkpoint,
    save_pipeline,
    tokenize,
)


TOY_SDXL_PATH = ROOT / "lab" / "assets" / "toy-sdxl"
TOY_VAE_PATH = TOY_MODEL_PATH / "vae"
EMA_MODULES = ("ema_unet", "ema_text_encoder", "ema_text_encoder_2")


# ---------------------------------------------------------------------------------------------------------------
# Data: one set of images per bucket, encoded once
# ---------------------------------------------------------------------------------------------------------------


class Bucket(NamedTuple):
    """A bucket's training data: its size in pixels, its latents (scaled by the VAE's scaling factor) [N, 4, h, w]
    and the token ids of its captions [N, captions per image, MAX_TOKENS]."""

    size: tuple[int, int]
    latents: torch.Tensor
    token_ids: torch.Tensor


def bucket_counts(num_images: int) -> dict[str, int]:
    """How many of `num_images` each bucket gets: its share of the training steps (half square, a quarter each)."""
    return {name: max(1, num_images * BUCKET_CYCLE.count(name) // len(BUCKET_CYCLE)) for name in BUCKETS}


def bucket_seed(seed: int, name: str) -> int:
    # Each bucket draws images of its own (the buckets share no face).
    return seed + 1_000 * list(BUCKETS).index(name)


def load_vae(path: Path = TOY_VAE_PATH):
    """The VAE of `path`, as is. Built from its config and weights rather than `from_pretrained`, which would record
    this machine's absolute path (`_name_or_path`) in the exported config."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(path)))
    vae.load_state_dict(load_file(str(Path(path) / "diffusion_pytorch_model.safetensors")))
    return vae.eval()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@torch.no_grad()
def bucket_latents(vae, vae_digest: str, name: str, images: torch.Tensor, seed: int, work: Path) -> torch.Tensor:
    """The posterior means of a bucket's images, cached under `work` (recomputed if the VAE, the seed or the number
    of images changed). Unscaled."""
    path = work / f"latents_{name}.safetensors"
    key = {"bucket": name, "num_images": str(len(images)), "seed": str(seed), "vae_sha256": vae_digest}
    if path.exists() and checkpoint_metadata(path) == key:
        return load_file(str(path))["latents"]
    chunks = [
        vae.encode(images[i : i + 250] * 2 - 1).latent_dist.mean
        for i in tqdm(range(0, len(images), 250), desc=f"encode {name}", mininterval=10)
    ]
    # Contiguous: the posterior mean is a strided view, and the UNet's convolutions round differently on that layout,
    # so a first run would not train on the same numbers as a resumed one, which reads the cache.
    latents = torch.cat(chunks).contiguous()
    atomic_save_file({"latents": latents}, path, key)
    return latents


def prepare_buckets(args, vae, tokenizer, work: Path) -> dict[str, Bucket]:
    vae_digest = file_digest(Path(args.vae) / "diffusion_pytorch_model.safetensors")
    buckets = {}
    for name, count in bucket_counts(args.num_images).items():
        seed = bucket_seed(args.seed, name)
        data = make_toy_dataset(count, seed=seed, canvas=BUCKETS[name])
        latents = bucket_latents(vae, vae_digest, name, data.images, seed, work) * vae.config.scaling_factor
        pool = make_caption_pool(data.labels, seed, args.captions_per_image)
        token_ids = tokenize(tokenizer, [c for caps in pool for c in caps]).view(count, -1, MAX_TOKENS)
        buckets[name] = Bucket(BUCKETS[name], latents, token_ids)
        print(f"bucket {name}: {count} images {BUCKETS[name]}, latents {tuple(latents.shape[1:])}")
    return buckets


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def training_loss(unet, text_encoder, text_encoder_2, bucket: Bucket, noise_scheduler, args, g: torch.Generator):
    """One batch of `bucket`: epsilon-prediction MSE under SDXL's conditioning, captions dropped to zero embeddings
    at `--caption-dropout`."""
    b = args.batch_size
    idx = torch.randint(len(bucket.latents), (b,), generator=g)
    ids = bucket.token_ids[idx, torch.randint(bucket.token_ids.shape[1], (b,), generator=g)]
    keep = (torch.rand(b, generator=g) >= args.caption_dropout).float()
    x0 = bucket.latents[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=g)
    xt = noise_scheduler.add_noise(x0, noise, t)
    context, pooled = encode_text(text_encoder, text_encoder_2, ids, ids)
    # Zeros, not the empty caption's embedding: the unconditional input of a pipeline that forces zeros for an empty
    # negative prompt (and SDXL's own caption dropout).
    context, pooled = context * keep[:, None, None], pooled * keep[:, None]
    conditioning = {"text_embeds": pooled, "time_ids": add_time_ids(*bucket.size).expand(b, 6)}
    return F.mse_loss(unet(xt, t, encoder_hidden_states=context, added_cond_kwargs=conditioning).sample, noise)


def train(args, buckets: dict[str, Bucket], tokenizer, work: Path):
    """Train (or resume, or load once complete) the UNet and both text encoders; returns their EMA copies (None when
    `--stop-after` ended this run before the last step) and the final (or last checkpoint's) metadata."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    models = {
        "unet": build_unet(),
        "text_encoder": build_text_encoder(tokenizer, with_projection=False),
        "text_encoder_2": build_text_encoder(tokenizer, with_projection=True),
    }
    # Copies that hold the EMA weights in checkpoints and in the exported model.
    emas = {f"ema_{name}": copy.deepcopy(m) for name, m in models.items()}
    modules = {**models, **emas}
    final = work / "final.safetensors"
    if final.exists():
        tensors = load_file(str(final))
        for name in EMA_MODULES:
            emas[name].load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        return emas, checkpoint_metadata(final)
    params = [p for m in models.values() for p in m.parameters()]
    ema_params = [p for m in emas.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = cosine_schedule(optimizer, args.steps, warmup=min(args.warmup, args.steps // 10))
    ckpt = work / "checkpoint.safetensors"
    start, seconds, cpu_seconds = 0, 0.0, 0.0
    if ckpt.exists():
        start = load_checkpoint(ckpt, modules, optimizer, lr_scheduler)
        saved = checkpoint_metadata(ckpt)
        seconds, cpu_seconds = float(saved.get("train_seconds", 0.0)), float(saved.get("train_cpu_seconds", 0.0))
    elif args.init_from is not None:  # a new run from an exported model's weights (fresh optimizer)
        for name, model in models.items():
            folder = Path(args.init_from) / name
            weights = load_file(str(next(folder.glob("*.safetensors"))))
            model.load_state_dict(weights)
            emas[f"ema_{name}"].load_state_dict(weights)
    cut = cut_deep_skips(models["unet"], args.cut_skips)
    cut_deep_skips(emas["ema_unet"], args.cut_skips)
    ema = EMAModel(ema_params, decay=args.ema_decay)  # starts from the (restored) EMA weights
    ema.load_state_dict({"optimization_step": start})
    noise_scheduler = DDPMScheduler(**TRAIN_SCHEDULER_CONFIG)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    for m in models.values():
        m.train()
    t0, cpu0 = time.time(), time.process_time()

    def timing() -> dict[str, str]:
        # Wall and CPU time of all runs: on a shared machine the CPU time is what a step costs on a free core.
        wall, cpu = seconds + time.time() - t0, cpu_seconds + time.process_time() - cpu0
        return {"train_seconds": f"{wall:.1f}", "train_cpu_seconds": f"{cpu:.1f}"}

    def save(step: int) -> None:
        ema.copy_to(ema_params)
        save_checkpoint(ckpt, modules, optimizer, step, lr_scheduler, timing())

    bar = tqdm(range(start, end), initial=start, total=args.steps, desc="UNet+text", mininterval=30)
    for step in bar:
        bucket = buckets[BUCKET_CYCLE[step % len(BUCKET_CYCLE)]]
        g = _step_generator(args.seed, 2, step)
        loss = training_loss(*models.values(), bucket, noise_scheduler, args, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        hold_cut(cut)
        lr_scheduler.step()
        ema.step(params)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == end:
            save(step + 1)
    if end < args.steps:
        return None, {"step": str(end), **timing()}
    ema.copy_to(ema_params)
    metadata = {"step": str(args.steps), **timing()}
    tensors = {f"{name}.{k}": v for name in EMA_MODULES for k, v in emas[name].state_dict().items()}
    atomic_save_file(tensors, final, metadata)
    return emas, metadata


def export_pipeline(vae, text_encoder, text_encoder_2, tokenizer, unet, output: Path) -> None:
    """Save a stock `StableDiffusionXLPipeline` directory, swapped in place of `output` only once complete."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.eval(),
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,  # as trained: a dropped caption is zero embeddings
        add_watermarker=False,
    )
    save_pipeline(pipe, output)


# ---------------------------------------------------------------------------------------------------------------
# The oracle report
# ---------------------------------------------------------------------------------------------------------------


def load_sdxl_pipeline(path: str | Path = TOY_SDXL_PATH):
    """The toy SDXL as a stock `StableDiffusionXLPipeline` (offline, CPU, no watermark)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def h_shapes(unet) -> dict[str, list[int]]:
    """h (the mid-block output) per bucket, without the batch dimension, from one forward pass on zeros."""
    shapes, time_dim = {}, unet.config.addition_time_embed_dim
    hook = unet.mid_block.register_forward_hook(lambda module, inputs, output: shapes.update(last=list(output.shape)))
    try:
        for name, (height, width) in BUCKETS.items():
            x = torch.zeros(1, unet.config.in_channels, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
            context = torch.zeros(1, MAX_TOKENS, unet.config.cross_attention_dim)
            pooled = torch.zeros(1, unet.config.projection_class_embeddings_input_dim - 6 * time_dim)
            conditioning = {"text_embeds": pooled, "time_ids": add_time_ids(height, width)[None]}
            unet(x, 0, encoder_hidden_states=context, added_cond_kwargs=conditioning)
            shapes[name] = shapes.pop("last")[1:]
    finally:
        hook.remove()
    return shapes


def architecture(pipe, output: Path) -> dict:
    """Parameter counts and file sizes of the exported model, and h per bucket."""
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    components["vae"] = pipe.vae
    sizes = {name: sum(f.stat().st_size for f in (Path(output) / name).glob("*.safetensors")) for name in components}
    config = pipe.unet.config
    return {
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in components.items()},
        "safetensors_mb": {name: round(size / 1e6, 2) for name, size in sizes.items()},
        "total_mb": round(sum(sizes.values()) / 1e6, 2),
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": list(config.down_block_types),
        "cross_attention_dim": config.cross_attention_dim,
        "addition_time_embed_dim": config.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": config.projection_class_embeddings_input_dim,
        "h_shape": h_shapes(pipe.unet),
        "scheduler": type(pipe.scheduler).__name__,
        "force_zeros_for_empty_prompt": bool(pipe.config.force_zeros_for_empty_prompt),
    }


@torch.no_grad()
def sample_bucket(pipe, size: tuple[int, int], args) -> torch.Tensor:
    """`--report-samples` images [N, 3, H, W] in [0, 1] of the neutral prompt at the bucket's size; image i draws from
    its own generator (seed `--report-seed` + i), so the samples do not depend on the batch size."""
    batches = generate_batches(
        pipe,
        [NEUTRAL_PROMPT] * args.report_samples,
        args.report_seed,
        args.report_batch_size,
        height=size[0],
        width=size[1],
        num_inference_steps=args.report_steps,
        guidance_scale=args.guidance_scale,
        output_type="pt",
    )
    return torch.cat([batch.output.images.float().cpu() for batch in batches])


def save_bucket_grid(rows: list[tuple[str, torch.Tensor]], path: Path, columns: int = 16, scale: int = 2) -> None:
    """One row of `columns` samples per bucket, each at its own size (scaled by `scale`), its name on the left."""
    from PIL import Image, ImageDraw

    label_width, pad = 120, 2
    width = max(min(len(x), columns) * (x.shape[-1] * scale + pad) for _, x in rows)
    grid = Image.new("RGB", (label_width + width, sum(x.shape[-2] * scale + pad for _, x in rows)), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for label, images in rows:
        height, tile_width = images.shape[-2] * scale, images.shape[-1] * scale
        draw.text((4, top + height // 2 - 6), label, fill="black")
        for c, image in enumerate(images[:columns]):
            tile = Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
            grid.paste(tile.resize((tile_width, height), Image.NEAREST), (label_width + c * (tile_width + pad), top))
        top += height + pad
    atomic_save_image(grid, path)


def write_report(args, metadata: dict[str, str]) -> dict:
    """Measure the exported model (`--output`) per bucket with the oracle and write `--report` (JSON and markdown)
    and `--grid`."""
    pipe = load_sdxl_pipeline(args.output)
    report = {
        "model": portable_path(args.output),
        "architecture": architecture(pipe, args.output),
        "training": {
            "num_images": bucket_counts(args.num_images),
            "steps": int(metadata["step"]),
            "bucket_cycle": list(BUCKET_CYCLE),
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "ema_decay": args.ema_decay,
            "caption_dropout": args.caption_dropout,
            "init_from": portable_path(args.init_from) if args.init_from else None,
            "cut_skips": args.cut_skips,
            "seed": args.seed,
            "threads": args.threads,
            "train_seconds": float(metadata["train_seconds"]),
            "train_cpu_seconds": float(metadata["train_cpu_seconds"]),
        },
        "sampler": {
            "scheduler": type(pipe.scheduler).__name__,
            "steps": args.report_steps,
            "guidance_scale": args.guidance_scale,
            "prompt": NEUTRAL_PROMPT,
            "seed": args.report_seed,
        },
        "data_bias": {a: dict(zip(ATTRIBUTES[a], p)) for a, p in DATA_BIAS.items()},
        "buckets": {},
    }
    grid_rows = []
    for name, size in BUCKETS.items():
        t0 = time.time()
        images = sample_bucket(pipe, size, args)
        row = {"height": size[0], "width": size[1], **summarise(ToyOracle().read(images), None, None)}
        checks = ToyOracle().diagnose(images)
        row["checks_passed"] = {k: float(v.float().mean()) for k, v in checks.items() if k.endswith("_ok")}
        row["minus_data_bias"] = {
            a: {c: row["fractions"][a][c] - report["data_bias"][a][c] for c in ATTRIBUTES[a]} for a in ATTRIBUTES
        }
        row["sample_seconds"] = round(time.time() - t0, 1)
        report["buckets"][name] = row
        grid_rows.append((f"{name} {size[0]}x{size[1]}", images))
        print(f"{name}: valid {row['valid_rate']:.3f}, fractions {json.dumps(row['fractions'])}")
    atomic_write_json(args.report, report)
    atomic_write_text(Path(args.report).with_suffix(".md"), report_markdown(report))
    if args.grid is not None:
        save_bucket_grid(grid_rows, args.grid)
    return report


def report_markdown(report: dict) -> str:
    """The report as a page: the model, then the valid rate, class fractions and checks passed per bucket."""
    arch, training, sampler = report["architecture"], report["training"], report["sampler"]
    params = arch["parameters"]
    images = ", ".join(f"{n} {k:,}" for n, k in training["num_images"].items())
    lines = [
        "<!-- generated by lab/train_toy_sdxl.py --report: do not edit by hand -->",
        "# The toy SDXL: what it generates per bucket",
        "",
        f"`{report['model']}`: UNet {params['unet']:,} parameters, text encoders {params['text_encoder']:,} + "
        f"{params['text_encoder_2']:,}, VAE {params['vae']:,} (the toy SD's); {arch['total_mb']} MB of safetensors. "
        f"Trained {training['steps']:,} steps at batch {training['batch_size']} (buckets in the cycle "
        f"{', '.join(training['bucket_cycle'])}; images: {images}) in {training['train_seconds'] / 60:.0f} min "
        f"({training['threads']} thread, {training['train_cpu_seconds'] / 60:.0f} min of CPU time).",
        "",
        f'Samples: the neutral prompt "{sampler["prompt"]}", {sampler["scheduler"]} {sampler["steps"]} steps, CFG '
        f"{sampler['guidance_scale']:g}, stock `StableDiffusionXLPipeline` at each bucket's size; read by the toy "
        "oracle from each image's centre 32x32 square. Fractions over all samples (the oracle's best guess for an "
        "invalid image).",
        "",
        "| bucket | h | samples | valid | " + " | ".join(ATTRIBUTES) + " | checks passed |",
        "|---|---|---|---|" + "---|" * len(ATTRIBUTES) + "---|",
        "| data (`DATA_BIAS`) | | | 1.000 | "
        + " | ".join(" / ".join(f"{p:.3f}" for p in report["data_bias"][a].values()) for a in ATTRIBUTES)
        + " | |",
    ]
    for name, row in report["buckets"].items():
        fractions = " | ".join(" / ".join(f"{p:.3f}" for p in row["fractions"][a].values()) for a in ATTRIBUTES)
        checks = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in row["checks_passed"].items())
        h = "x".join(str(d) for d in arch["h_shape"][name])
        lines.append(
            f"| {name} {row['height']}x{row['width']} | {h} | {row['num_samples']} | {row['valid_rate']:.3f} | "
            f"{fractions} | {checks} |"
        )
    classes = "; ".join(f"{a}: {' / '.join(c)}" for a, c in ATTRIBUTES.items())
    lines += ["", f"Classes in column order: {classes}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the toy world's miniature Stable Diffusion XL on the CPU.")
    p.add_argument("--output", type=Path, default=TOY_SDXL_PATH, help="Where the StableDiffusionXLPipeline is saved.")
    p.add_argument("--work-dir", type=Path, default=Path(".work/toy-sdxl-train"), help="Checkpoints and caches.")
    p.add_argument("--vae", type=Path, default=TOY_VAE_PATH, help="The VAE (a diffusers AutoencoderKL directory).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=positive_int, default=30_000, help="All buckets together (half square).")
    p.add_argument("--captions-per-image", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=5500)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100, help="Warm-up steps (at most a tenth of --steps).")
    p.add_argument(
        "--caption-dropout", type=float, default=0.1, help="Zeroed-caption rate (classifier-free guidance)."
    )
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--init-from", type=Path, default=None, help="Start from this exported model's weights (a fresh optimizer)."
    )
    add_cut_skips_argument(p)
    p.add_argument("--checkpoint-every", type=positive_int, default=100)
    p.add_argument(
        "--stop-after", type=positive_int, default=None, help="Stop after this many steps in this run (resumable)."
    )
    p.add_argument("--report", type=Path, default=None, help="Write the oracle report of the exported model here.")
    p.add_argument("--grid", type=Path, default=None, help="With --report: a PNG of 16 samples per bucket.")
    p.add_argument("--report-samples", type=positive_int, default=512, help="Samples per bucket.")
    p.add_argument("--report-steps", type=positive_int, default=25, help="Sampler steps (the saved DDIM scheduler).")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="Classifier-free guidance scale of the report.")
    p.add_argument("--report-seed", type=int, default=0)
    p.add_argument("--report-batch-size", type=positive_int, default=64)
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads; 1 is fastest on a busy 2-core machine."
    )
    args = p.parse_args(argv)
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Train, export, and report if asked; returns the report (or None)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    t0 = time.time()

    tokenizer = build_tokenizer()
    vae = load_vae(args.vae)
    buckets = prepare_buckets(args, vae, tokenizer, work)
    print(f"data ready ({time.time() - t0:.0f}s)")
    models, metadata = train(args, buckets, tokenizer, work)
    if models is None:
        print(
            f"stopped at step {metadata['step']} of {args.steps} ({metadata['train_seconds']}s, CPU "
            f"{metadata['train_cpu_seconds']}s, all runs); rerun to resume ({time.time() - t0:.0f}s in this run)"
        )
        return None
    print(
        f"trained {metadata['step']} steps in {metadata['train_seconds']}s (CPU {metadata['train_cpu_seconds']}s, "
        "all runs)"
    )
    export_pipeline(
        vae, models["ema_text_encoder"], models["ema_text_encoder_2"], tokenizer, models["ema_unet"], args.output
    )
    print(f"saved {args.output} ({time.time() - t0:.0f}s in this run)")
    if args.report is None:
        return None
    report = write_report(args, metadata)
    print(f"wrote {args.report} ({time.time() - t0:.0f}s in this run)")
    return report


if __name__ == "__main__":
    main()
