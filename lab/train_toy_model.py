"""Train the toy world's miniature Stable Diffusion from a seed: data, VAE, text encoder and UNet.

    python lab/train_toy_model.py                      # ~34 min on 2 shared CPU cores; rerun to resume
    python lab/train_toy_model.py --output /tmp/toy-sd --work-dir .work/toy-train

Phases: (1) the VAE on the toy faces; (2) the dataset's latents, encoded once and cached; (3) a tiny CLIP text encoder
trained jointly with the UNet on varied captions with classifier-free-guidance caption dropout; (4) export of a
standard diffusers `StableDiffusionPipeline` directory (safetensors, DDIM scheduler, no safety checker).
Checkpoints (safetensors) go under `--work-dir`; a rerun resumes from the last one of the unfinished phase.
The model's architecture (tokenizer, VAE, text encoder, UNet, scheduler) is `lab.toy_model`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
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
from h_classifiers.io_utils import atomic_save_file, make_temp_dir  # noqa: E402
from h_classifiers.toy_world import ATTRIBUTES, TOY_MODEL_PATH, caption_for, make_toy_dataset  # noqa: E402
from lab.toy_model import (  # noqa: E402
    MAX_TOKENS,
    TRAIN_SCHEDULER_CONFIG,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors only, written atomically)
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer,
    step: int,
    lr_scheduler=None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Modules, optimizer (and learning-rate schedule) at `step` in one safetensors file; `extra_metadata` (strings)
    is stored alongside and read back by `checkpoint_metadata`."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{idx}.{key}"] = torch.as_tensor(value)
    metadata = {**(extra_metadata or {}), "step": str(step), "param_groups": json.dumps(opt["param_groups"])}
    if lr_scheduler is not None:
        metadata["lr_scheduler"] = json.dumps(lr_scheduler.state_dict())
    atomic_save_file(tensors, path, metadata)


def checkpoint_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (a checkpoint's step, schedule and extra metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler=None) -> int:
    """Restore modules, optimizer (and learning-rate schedule) from `path`; returns the step it was saved at."""
    metadata = checkpoint_metadata(path)
    tensors = load_file(str(path))
    for name, m in modules.items():
        prefix = f"{name}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    if lr_scheduler is not None and "lr_scheduler" in metadata:
        lr_scheduler.load_state_dict(json.loads(metadata["lr_scheduler"]))
    return int(metadata["step"])


def cosine_schedule(optimizer, total_steps: int, warmup: int = 100):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total_steps` (diffusers' "cosine")."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    # Every step draws from its own generator, so a resumed run draws the same batches as an uninterrupted one.
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_000_007 + step)


# ---------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------


def train_vae(args, images: torch.Tensor, work: Path):
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    final = work / "vae_final.safetensors"
    if final.exists():
        vae.load_state_dict(load_file(str(final)))
        return vae
    lr_scheduler = cosine_schedule(optimizer, args.vae_steps)
    ckpt = work / "vae_checkpoint.safetensors"
    start = load_checkpoint(ckpt, {"vae": vae}, optimizer, lr_scheduler) if ckpt.exists() else 0
    vae.train()
    bar = tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="VAE", mininterval=5)
    for step in bar:
        g = _step_generator(args.seed, 1, step)
        x = images[torch.randint(len(images), (args.vae_batch_size,), generator=g)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
        if (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(ckpt, {"vae": vae}, optimizer, step + 1, lr_scheduler)
    atomic_save_file(vae.state_dict(), final, {"step": str(args.vae_steps)})
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, work: Path, batch_size: int = 500) -> torch.Tensor:
    """Posterior means of the whole dataset (cached); sets the VAE's scaling factor to 1 / std of the latents."""
    path = work / "latents.safetensors"
    if path.exists():
        latents = load_file(str(path))["latents"]
    else:
        vae.eval()
        chunks = [
            vae.encode(images[i : i + batch_size] * 2 - 1).latent_dist.mean
            for i in tqdm(range(0, len(images), batch_size), desc="encode latents")
        ]
        latents = torch.cat(chunks)
        atomic_save_file({"latents": latents}, path, {})
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents


def make_caption_pool(labels: dict[str, torch.Tensor], seed: int, per_image: int) -> list[list[str]]:
    """`per_image` captions per image (neutral or naming some of its attributes), fixed by the seed."""
    rng = random.Random(seed + 7)
    names = {a: [ATTRIBUTES[a][int(k)] for k in labels[a]] for a in ATTRIBUTES}
    n = len(labels["skin"])
    return [[caption_for({a: names[a][i] for a in ATTRIBUTES}, rng) for _ in range(per_image)] for i in range(n)]


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    # Exactly as StableDiffusionPipeline.encode_prompt does: pad to model_max_length, no attention mask.
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_unet(args, latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor, tokenizer, work: Path):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    unet = build_unet(args.text_hidden_size, args.unet_layers_per_block)
    text_encoder = build_text_encoder(tokenizer, args.text_hidden_size)
    # Copies that hold the EMA weights in checkpoints and in the exported model.
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-4)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    final = work / "unet_final.safetensors"
    if final.exists():
        tensors = load_file(str(final))
        for name in ("ema_unet", "ema_text_encoder"):
            modules[name].load_state_dict(
                {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            )
        return ema_unet, ema_text
    lr_scheduler = cosine_schedule(optimizer, args.unet_steps)
    ckpt = work / "unet_checkpoint.safetensors"
    start = load_checkpoint(ckpt, modules, optimizer, lr_scheduler) if ckpt.exists() else 0
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    ema = EMAModel(ema_params, decay=args.ema_decay)  # starts from the (restored) EMA weights
    ema.load_state_dict({"optimization_step": start})

    scheduler = DDPMScheduler(**TRAIN_SCHEDULER_CONFIG)
    num_images, per_image = token_ids.shape[:2]
    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, args.unet_steps), initial=start, total=args.unet_steps, desc="UNet+text", mininterval=5)
    for step in bar:
        g = _step_generator(args.seed, 2, step)
        b = args.unet_batch_size
        idx = torch.randint(num_images, (b,), generator=g)
        ids = token_ids[idx, torch.randint(per_image, (b,), generator=g)]
        drop = torch.rand(b, generator=g) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None], ids)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        context = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.step(params)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0:
            ema.copy_to(ema_params)
            save_checkpoint(ckpt, modules, optimizer, step + 1, lr_scheduler)
    ema.copy_to(ema_params)
    tensors = {f"{n}.{k}": v for n in ("ema_unet", "ema_text_encoder") for k, v in modules[n].state_dict().items()}
    atomic_save_file(tensors, final, {"step": str(args.unet_steps)})
    return ema_unet, ema_text


def export_pipeline(vae, text_encoder, tokenizer, unet, output: Path) -> None:
    """Save a stock `StableDiffusionPipeline` directory, swapped in place of `output` only once complete."""
    from diffusers import StableDiffusionPipeline

    scheduler = build_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, output)


def save_pipeline(pipe, output: Path) -> None:
    """`pipe.save_pretrained(output)` (safetensors) into a temporary directory, swapped in place of `output` only once
    complete."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(output.parent, f".{output.name}-")
    pipe.save_pretrained(tmp, safe_serialization=True)
    old = output.with_name(output.name + ".old")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the toy world's miniature Stable Diffusion (CPU, ~34 min).")
    p.add_argument("--output", type=Path, default=TOY_MODEL_PATH, help="Where the diffusers directory is saved.")
    p.add_argument("--work-dir", type=Path, default=Path(".work/toy-train"), help="Checkpoints and caches.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=positive_int, default=30_000)
    p.add_argument("--captions-per-image", type=int, default=4)
    p.add_argument("--vae-steps", type=positive_int, default=1600)
    p.add_argument("--vae-batch-size", type=positive_int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl-weight", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=positive_int, default=4000)
    p.add_argument("--unet-batch-size", type=positive_int, default=128)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-layers-per-block", type=int, default=1)
    p.add_argument("--text-hidden-size", type=int, default=64, help="Text encoder width = cross_attention_dim.")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="Empty-caption rate (classifier-free guidance).")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads; 1 is fastest on a busy 2-core machine."
    )
    args = p.parse_args(argv)
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    t0 = time.time()

    data = make_toy_dataset(args.num_images, seed=args.seed)
    tokenizer = build_tokenizer()
    pool = make_caption_pool(data.labels, args.seed, args.captions_per_image)
    token_ids = tokenize(tokenizer, [c for caps in pool for c in caps]).view(args.num_images, -1, MAX_TOKENS)
    empty_ids = tokenize(tokenizer, [""])[0]
    print(f"data: {args.num_images} images, {token_ids.shape[1]} captions each ({time.time() - t0:.0f}s)")

    vae = train_vae(args, data.images, work)
    latents = encode_latents(vae, data.images, work)
    print(f"latents {tuple(latents.shape)}, scaling factor {vae.config.scaling_factor:.4f} ({time.time() - t0:.0f}s)")
    latents = latents * vae.config.scaling_factor
    unet, text_encoder = train_unet(args, latents, token_ids, empty_ids, tokenizer, work)
    export_pipeline(vae, text_encoder, tokenizer, unet, args.output)
    print(f"saved {args.output} ({time.time() - t0:.0f}s in this run)")


if __name__ == "__main__":
    main()
