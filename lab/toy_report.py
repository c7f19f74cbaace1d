"""Measure the committed toy model with the pixel oracle: class fractions and valid rates per prompt, and a grid.

    python lab/toy_report.py                          # 1,000 samples per prompt, DDIM 25 steps
    python lab/toy_report.py --num-samples 128 --output /tmp/report.json --grid /tmp/grid.png

Prompts: the neutral prompt and the explicit prompt of every class of every attribute. For each, the oracle's
class fractions over all samples, the valid rate, and for an explicit prompt its adherence (the fraction of samples
read as the asked class). Also the oracle's accuracy and valid rate on the dataset itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from h_classifiers.arguments import positive_int  # noqa: E402
from h_classifiers.generation import generate_batches  # noqa: E402
from h_classifiers.io_utils import atomic_save_image, atomic_write_json  # noqa: E402
from h_classifiers.toy_world import (  # noqa: E402
    ATTRIBUTES,
    DATA_BIAS,
    NEUTRAL_PROMPT,
    TOY_MODEL_PATH,
    ToyOracle,
    class_fractions,
    explicit_prompts,
    make_toy_dataset,
)
from lab import LAB_DOCS  # noqa: E402


def load_toy_pipeline(path: str | Path = TOY_MODEL_PATH):
    """The committed toy model as a stock `StableDiffusionPipeline` (offline, CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(
    pipe, prompt: str, num_samples: int, batch_size: int, steps: int, guidance_scale: float, seed: int
) -> torch.Tensor:
    """`num_samples` images [N, 3, H, W] in [0, 1]; image i uses seed `seed + i` (`generate_batches`), so runs are
    reproducible whatever the batch size."""
    batches = generate_batches(
        pipe,
        [prompt] * num_samples,
        seed,
        batch_size,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="pt",
    )
    return torch.cat([batch.output.images.float().cpu() for batch in batches])


def prompt_table() -> list[tuple[str, str | None, str | None]]:
    """(prompt, attribute, class_name) rows: the neutral prompt, then every explicit prompt."""
    rows: list[tuple[str, str | None, str | None]] = [(NEUTRAL_PROMPT, None, None)]
    for attribute, prompts in explicit_prompts().items():
        rows += [(prompt, attribute, class_name) for class_name, prompt in prompts.items()]
    return rows


def summarise(read: dict[str, torch.Tensor], attribute: str | None, class_name: str | None) -> dict:
    row = {
        "num_samples": int(read["valid"].numel()),
        "valid_rate": float(read["valid"].float().mean()),
        "fractions": {a: dict(zip(ATTRIBUTES[a], f)) for a, f in class_fractions(read).items()},
        "fractions_of_valid": {
            a: dict(zip(ATTRIBUTES[a], f)) for a, f in class_fractions(read, only_valid=True).items()
        },
    }
    if attribute is not None:
        row["attribute"], row["class_name"] = attribute, class_name
        row["adherence"] = row["fractions"][attribute][class_name]
        row["adherence_of_valid"] = row["fractions_of_valid"][attribute][class_name]
    return row


def dataset_check(num_samples: int, seed: int) -> dict:
    data = make_toy_dataset(num_samples, seed=seed)
    read = ToyOracle().read(data.images)
    return {
        "num_samples": num_samples,
        "seed": seed,
        "valid_rate": float(read["valid"].float().mean()),
        "oracle_accuracy": {a: float((read[a] == data.labels[a]).float().mean()) for a in ATTRIBUTES},
        "fractions": {a: dict(zip(ATTRIBUTES[a], f)) for a, f in class_fractions(read).items()},
    }


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path, columns: int, scale: int = 2) -> None:
    """One row of `columns` samples per prompt with its text on the left; written atomically."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageOps

    size = rows[0][1].shape[-1] * scale
    label_width, pad = 280, 2
    cells = []  # each tile carries its white padding on the right and at the bottom; blank tiles complete a row
    for _, images in rows:
        tiles = [
            Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).resize(
                (size, size), Image.NEAREST
            )
            for image in images[:columns]
        ]
        tiles += [Image.new("RGB", (size, size), "white")] * (columns - len(tiles))
        cells += [ImageOps.expand(tile, (0, 0, pad, pad), "white") for tile in tiles]
    grid = Image.new("RGB", (label_width + columns * (size + pad), len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, _) in enumerate(rows):
        draw.text((4, r * (size + pad) + size // 2 - 6), label, fill="black")
    grid.paste(make_image_grid(cells, len(rows), columns), (label_width, 0))
    atomic_save_image(grid, path)


def repository_relative(path: Path) -> str:
    """A path inside this repository as written from its root (committed reports name no folder of the machine)."""
    root = Path(__file__).resolve().parent.parent
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Measure the toy model's prompts with the oracle; write JSON and a grid.")
    p.add_argument("--model", type=Path, default=TOY_MODEL_PATH, help="Diffusers directory of the toy model.")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="Samples per prompt.")
    p.add_argument("--batch-size", type=positive_int, default=250)
    p.add_argument("--steps", type=positive_int, default=25, help="DDIM steps.")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-samples", type=positive_int, default=10_000, help="Dataset images for the oracle check.")
    p.add_argument("--output", type=Path, default=LAB_DOCS / "toy_world_report.json")
    p.add_argument("--grid", type=Path, default=LAB_DOCS / "toy_world_grid.png")
    p.add_argument("--grid-columns", type=positive_int, default=16)
    p.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads; 1 is fastest on a busy 2-core machine."
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = load_toy_pipeline(args.model)
    oracle = ToyOracle()
    report = {
        "model": repository_relative(args.model),
        "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "data_bias": {a: dict(zip(ATTRIBUTES[a], p)) for a, p in DATA_BIAS.items()},
        "dataset": dataset_check(args.dataset_samples, seed=10_000 + args.seed),
        "prompts": [],
    }
    grid_rows = []
    for prompt, attribute, class_name in tqdm(prompt_table(), desc="prompts"):
        images = sample_images(
            pipe, prompt, args.num_samples, args.batch_size, args.steps, args.guidance_scale, args.seed
        )
        row = {"prompt": prompt, **summarise(oracle.read(images), attribute, class_name)}
        report["prompts"].append(row)
        grid_rows.append((prompt, images))
        shown = f"adherence {row['adherence']:.3f}" if attribute else json.dumps(row["fractions"])
        tqdm.write(f"{prompt!r}: valid {row['valid_rate']:.3f}, {shown}")
    neutral = report["prompts"][0]["fractions"]
    report["neutral_minus_data_bias"] = {
        a: {c: neutral[a][c] - report["data_bias"][a][c] for c in ATTRIBUTES[a]} for a in ATTRIBUTES
    }
    report["seconds"] = round(time.time() - t0, 1)

    atomic_write_json(args.output, report, indent=2)
    save_grid(grid_rows, args.grid, args.grid_columns)
    print(f"wrote {args.output} and {args.grid} ({report['seconds']}s)")
    return report


if __name__ == "__main__":
    main()
