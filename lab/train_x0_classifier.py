"""Train the x0 classifier of one toy attribute for the image-space guidance baseline (`lab.image_guidance`).

    python lab/train_x0_classifier.py --attribute skin --compare  # -> lab/assets/toy-ddpm-x0/skin
    python lab/train_x0_classifier.py --attribute hair --compare --report .work/x0.json --output .work/x0-hair

The classifier reads the predicted clean image x0_hat, which early in sampling is a blurry, off-range guess rather than
a clean face. The data: toy faces (`make_toy_dataset`, labels from the toy world) and, per `--augmentation`:

- `none`: the clean faces only;
- `noise`: half of every batch with Gaussian pixel noise (sigma uniform in [0, `--noise-max`]);
- `x0hat`: half of every batch replaced by the toy DDPM's x0_hat of the face, noised at a uniform random timestep (the
  input the guidance gives the classifier; computed once per image and cached under `--work-dir`).

Held-out faces (another seed) measure the accuracy on clean images and on the DDPM's x0_hat at several timesteps;
`--compare` trains every augmentation on the same data and reports them all (the one named by `--augmentation` is
saved). The report (`--report`, default docs/lab/x0_classifiers.json) holds one entry per attribute: the command, the
recipe and the accuracies. CPU, one thread, a few minutes per attribute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from h_classifiers.arguments import positive_int  # noqa: E402
from h_classifiers.io_utils import atomic_save_file, atomic_write_json, portable_path  # noqa: E402
from h_classifiers.toy_world import ATTRIBUTES, TOY_DDPM_PATH, make_toy_dataset  # noqa: E402
from lab import LAB_DOCS  # noqa: E402
from lab.image_guidance import TOY_X0_CLASSIFIERS_PATH, X0Classifier, predicted_x0  # noqa: E402


AUGMENTATIONS = ("none", "noise", "x0hat")
# Timesteps at which the held-out accuracy on x0_hat is measured (the DDPM has 1,000).
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)
REPORT_PATH = LAB_DOCS / "x0_classifiers.json"


# ---------------------------------------------------------------------------------------------------------------
# Data: clean faces, and the DDPM's x0_hat of them (cached)
# ---------------------------------------------------------------------------------------------------------------


def load_ddpm(path: Path):
    from diffusers import DDIMPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    pipe = DDIMPipeline.from_pretrained(str(path), local_files_only=True)
    return pipe.unet.eval().requires_grad_(False), pipe.scheduler


def ddpm_fingerprint(path: Path) -> str:
    """The first 12 hex digits of the sha256 of the UNet weights: the cache key of the x0_hat made with them."""
    digest = hashlib.sha256((path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def x0_hat_of(unet, scheduler, images: torch.Tensor, timesteps: torch.Tensor, seed: int, batch_size: int = 64):
    """The DDPM's x0_hat (`predicted_x0`, as the guidance reads it) of clean `images` [N, 3, H, W] in [-1, 1],
    noised at `timesteps` [N] with noise drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    out = []
    for first in range(0, len(images), batch_size):
        rows = slice(first, first + batch_size)
        abar = scheduler.alphas_cumprod[timesteps[rows]].float()[:, None, None, None]
        noisy = abar.sqrt() * images[rows] + (1 - abar).sqrt() * noise[rows]
        out.append(predicted_x0(noisy, unet(noisy, timesteps[rows]).sample, abar))
    return torch.cat(out)


def cached(work: Path, name: str, make) -> dict[str, torch.Tensor]:
    """`make()` (a dict of tensors), saved under `work/name` once and loaded from there afterwards."""
    path = work / name
    if path.exists():
        return load_file(str(path))
    tensors = make()
    atomic_save_file(tensors, path)
    return tensors


def build_data(args: argparse.Namespace) -> dict[str, dict[str, torch.Tensor]]:
    """Train and test faces in [-1, 1] with every attribute's labels; the DDPM's x0_hat where it is needed."""
    train = make_toy_dataset(args.num_train, seed=args.seed)
    test = make_toy_dataset(args.num_test, seed=args.test_seed)
    data = {
        "train": {"images": train.images * 2 - 1, **{f"label_{a}": v for a, v in train.labels.items()}},
        "test": {"images": test.images * 2 - 1, **{f"label_{a}": v for a, v in test.labels.items()}},
    }
    needs_train_x0 = args.augmentation == "x0hat" or args.compare
    if args.eval_images == 0 and not needs_train_x0:
        return data
    unet, scheduler = load_ddpm(args.ddpm)
    key = ddpm_fingerprint(args.ddpm)
    if needs_train_x0:
        name = f"x0hat-train-{key}-n{args.num_train}-s{args.seed}.safetensors"

        def make_train():
            generator = torch.Generator().manual_seed(args.seed + 1)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.num_train,), generator=generator)
            images = x0_hat_of(unet, scheduler, data["train"]["images"], timesteps, args.seed + 2)
            return {"images": images, "timesteps": timesteps}

        data["train_x0hat"] = cached(args.work_dir, name, make_train)
    if args.eval_images:
        n = min(args.eval_images, args.num_test)
        name = f"x0hat-test-{key}-n{n}-s{args.test_seed}.safetensors"

        def make_test():
            clean = data["test"]["images"][:n]
            return {
                f"t{t}": x0_hat_of(unet, scheduler, clean, torch.full((n,), t), args.test_seed + t)
                for t in EVAL_TIMESTEPS
            }

        data["test_x0hat"] = cached(args.work_dir, name, make_test)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Training and measuring
# ---------------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, data: dict, augmentation: str) -> X0Classifier:
    from diffusers.optimization import get_scheduler

    torch.manual_seed(args.seed)
    classifier = X0Classifier(
        attribute=args.attribute, class_names=ATTRIBUTES[args.attribute], block_out_channels=args.widths
    )
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.steps // 20, num_training_steps=args.steps)
    images, labels = data["train"]["images"], data["train"][f"label_{args.attribute}"]
    generator = torch.Generator().manual_seed(args.seed + 3)
    half = args.batch_size // 2
    for _ in range(args.steps):
        rows = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        batch = images[rows].clone()
        if augmentation == "noise":
            sigma = args.noise_max * torch.rand(half, 1, 1, 1, generator=generator)
            batch[:half] += sigma * torch.randn(batch[:half].shape, generator=generator)
        elif augmentation == "x0hat":
            batch[:half] = data["train_x0hat"]["images"][rows[:half]]
        loss = F.cross_entropy(classifier(batch), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
    return classifier.eval()


@torch.no_grad()
def accuracy(classifier: X0Classifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and balanced accuracy (the mean recall over the classes: red hair is 15 % of the faces)."""
    predicted = torch.cat([classifier(chunk).argmax(1) for chunk in images.split(256)])
    recalls = [float((predicted[labels == k] == k).float().mean()) for k in range(classifier.num_classes)]
    return {
        "accuracy": round(float((predicted == labels).float().mean()), 4),
        "balanced_accuracy": round(sum(recalls) / len(recalls), 4),
    }


def measure(classifier: X0Classifier, data: dict, attribute: str) -> dict:
    labels = data["test"][f"label_{attribute}"]
    result = {"clean": accuracy(classifier, data["test"]["images"], labels)}
    if "test_x0hat" in data:
        result["x0_hat"] = {
            f"t={t}": accuracy(classifier, data["test_x0hat"][f"t{t}"], labels[: len(data["test_x0hat"][f"t{t}"])])
            for t in EVAL_TIMESTEPS
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a toy attribute's x0 classifier for image-space guidance (CPU).")
    p.add_argument("--attribute", required=True, choices=list(ATTRIBUTES), help="The toy attribute to read.")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Classifier folder (default: lab/assets/toy-ddpm-x0/ATTRIBUTE).",
    )
    p.add_argument("--report", type=Path, default=REPORT_PATH, help="JSON report, one entry per attribute (merged).")
    p.add_argument("--augmentation", default="x0hat", choices=AUGMENTATIONS, help="What the training images are.")
    p.add_argument("--compare", action="store_true", help="Train and measure every augmentation; save --augmentation.")
    p.add_argument("--ddpm", type=Path, default=TOY_DDPM_PATH, help="The DDPM whose x0_hat is used (x0hat, eval).")
    p.add_argument("--work-dir", type=Path, default=Path(".work/x0-classifier"), help="Cache of the x0_hat images.")
    p.add_argument("--num-train", type=positive_int, default=8000, help="Training faces.")
    p.add_argument("--num-test", type=positive_int, default=2000, help="Held-out faces (another seed).")
    p.add_argument(
        "--eval-images", type=int, default=1000, help="Held-out faces measured on x0_hat per timestep (0: none)."
    )
    p.add_argument("--seed", type=int, default=0, help="Training data and initialisation seed.")
    p.add_argument("--test-seed", type=int, default=100_000, help="Held-out data seed.")
    p.add_argument("--steps", type=positive_int, default=500)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--widths", type=positive_int, nargs="+", default=[16, 32, 64, 64], help="block_out_channels.")
    p.add_argument("--noise-max", type=float, default=0.5, help="noise augmentation: the largest sigma.")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 is fastest on a busy CPU).")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = TOY_X0_CLASSIFIERS_PATH / args.attribute
    if args.eval_images < 0:
        p.error(f"`--eval-images` must be >= 0, got {args.eval_images}.")
    return args


def command_line(argv: list[str]) -> str:
    """The command as run, with paths inside the repository relative to it."""
    return " ".join(["python lab/train_x0_classifier.py", *(portable_path(a) for a in argv)])


def main(argv: list[str] | None = None) -> dict:
    """Train (and compare), save the classifier, merge its entry into the report; returns the entry."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    data = build_data(args)
    print(f"data: {args.num_train} train / {args.num_test} held-out faces ({time.time() - t0:.0f}s)")
    comparison, saved = {}, None
    for augmentation in AUGMENTATIONS if args.compare else (args.augmentation,):
        start = time.time()
        classifier = train(args, data, augmentation)
        comparison[augmentation] = {**measure(classifier, data, args.attribute), "seconds": round(time.time() - start)}
        print(f"{augmentation}: {json.dumps(comparison[augmentation])}")
        if augmentation == args.augmentation:
            saved = classifier
    saved.save_pretrained(args.output)
    entry = {
        "command": command_line(argv),
        "output": portable_path(args.output),
        "class_names": ATTRIBUTES[args.attribute],
        "parameters": sum(p.numel() for p in saved.parameters()),
        "recipe": {
            key: portable_path(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
            if key not in ("attribute", "output", "report", "work_dir", "threads", "compare")
        },
        "ddpm_unet_sha256": ddpm_fingerprint(args.ddpm) if "test_x0hat" in data or "train_x0hat" in data else None,
        "eval_timesteps": list(EVAL_TIMESTEPS),
        "held_out": comparison[args.augmentation],
    }
    if args.compare:
        entry["comparison"] = comparison
    report = json.loads(args.report.read_text()) if args.report.exists() else {}
    report[args.attribute] = entry
    atomic_write_json(args.report, dict(sorted(report.items())), indent=1)
    print(f"saved {args.output}; report {args.report} ({time.time() - t0:.0f}s)")
    return entry


if __name__ == "__main__":
    main()
