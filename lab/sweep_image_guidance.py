"""The sweep that chose `DEFAULT_IMAGE_GUIDANCE_SCALE` (image-space guidance, `lab.image_guidance`).

    python lab/sweep_image_guidance.py          # -> docs/lab/results/sweep_image_guidance.{json,md}

The toy DDPM with the lab's x0 classifiers, distribution mode towards 50/50 per attribute, DDIM with eta 1 (the
paper's) and eta 0 (DDIMPipeline's default) and `balancing-act evaluate`'s 25 steps, one batch per setting, on the
tuning seeds (`TUNING_SEED` + i, as `python -m lab.reproduce --sweep`: disjoint from the evaluation's seeds 0 + i).
The oracle reads every image. At eta 1 the toy DDPM draws few valid faces (docs/lab/toy_world.md), so the FD that decides
is over every image with the oracle's best-guess class (FD over the valid ones is reported beside it). Choice rule
(`choose`): over the (eta, attribute) pairs, the guided scale with the lowest mean FD plus mean loss of valid rate
against unguided sampling (both fractions of the images: a scale may not buy fairness with broken faces).

Each setting is saved to the JSON as soon as it is measured, and a rerun skips the settings already there, so the
sweep can be run in pieces.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from h_classifiers.arguments import positive_int  # noqa: E402
from h_classifiers.io_utils import atomic_write_json, atomic_write_text, portable_path  # noqa: E402
from h_classifiers.metrics import fairness_discrepancy  # noqa: E402
from h_classifiers.toy_world import ATTRIBUTES, TOY_DDPM_PATH, ToyOracle  # noqa: E402
from lab import LAB_DOCS  # noqa: E402
from lab.image_guidance import TOY_X0_CLASSIFIERS_PATH, ImageSpaceGuidance  # noqa: E402


TUNING_SEED = 1_000_000  # the sweeps' seeds (lab/reproduce/rows.py): disjoint from the evaluation's
RESULTS = LAB_DOCS / "results"


def fractions(classes: torch.Tensor, num_classes: int) -> list[float] | None:
    if len(classes) == 0:
        return None
    return (torch.bincount(classes, minlength=num_classes).float() / len(classes)).tolist()


def run_setting(pipe, eta: float, attribute: str, scale: float, args: argparse.Namespace) -> dict:
    sampler = ImageSpaceGuidance(pipe, TOY_X0_CLASSIFIERS_PATH / attribute, scale)
    target = [1 / len(ATTRIBUTES[attribute])] * len(ATTRIBUTES[attribute])
    generators = [torch.Generator().manual_seed(TUNING_SEED + i) for i in range(args.num_images)]
    start = time.time()
    images = sampler(
        batch_size=args.num_images,
        generator=generators,
        eta=eta,
        num_inference_steps=args.steps,
        output_type="pt",
        target_distribution=target,
    ).images
    seconds = time.time() - start
    read = ToyOracle().read(images)
    k = len(target)
    every, valid = fractions(read[attribute], k), fractions(read[attribute][read["valid"]], k)
    return {
        "eta": eta,
        "attribute": attribute,
        "scale": scale,
        "target": target,
        "valid_rate": float(read["valid"].float().mean()),
        "fractions_all": every,
        "fd_all": fairness_discrepancy(target, every),
        "fractions_valid": valid,
        "fd_valid": None if valid is None else fairness_discrepancy(target, valid),
        "seconds": round(seconds, 1),  # wall time on the machine that ran it (shared: not a benchmark)
    }


def score(rows: list[dict], unguided: list[dict]) -> float:
    """Mean FD (every image) plus the mean valid rate lost against unguided sampling: lower is better."""
    fd = sum(row["fd_all"] for row in rows) / len(rows)
    lost = (sum(row["valid_rate"] for row in unguided) - sum(row["valid_rate"] for row in rows)) / len(rows)
    return fd + lost


def choose(rows: list[dict]) -> float | None:
    """The guided scale with the lowest `score`; None until scale 0 and another scale are measured for every (eta,
    attribute) pair."""
    by_scale: dict[float, list[dict]] = {}
    for row in rows:
        by_scale.setdefault(row["scale"], []).append(row)
    pairs = {(row["eta"], row["attribute"]) for row in rows}
    complete = {s: r for s, r in by_scale.items() if {(row["eta"], row["attribute"]) for row in r} == pairs}
    if 0.0 not in complete or len(complete) < 2:
        return None
    return min((s for s in complete if s > 0), key=lambda s: score(complete[s], complete[0.0]))


def summary_lines(rows: list[dict]) -> list[str]:
    """Per scale, over the (eta, attribute) pairs: mean FD, mean valid rate and the score `choose` ranks by."""
    by_scale: dict[float, list[dict]] = {}
    for row in rows:
        by_scale.setdefault(row["scale"], []).append(row)
    if 0.0 not in by_scale:
        return []
    lines = ["| Scale | Mean FD (all) | Mean valid | Score |", "|---|---|---|---|"]
    for scale, group in sorted(by_scale.items()):
        fd = sum(row["fd_all"] for row in group) / len(group)
        valid = sum(row["valid_rate"] for row in group) / len(group)
        lines.append(f"| {scale:g} | {fd:.3f} | {valid:.1%} | {score(group, by_scale[0.0]):.3f} |")
    return lines


def markdown(report: dict) -> str:
    """The sweep's page, from its JSON alone (`--render` rewrites it; a test checks the committed one)."""
    lines = [
        "<!-- generated by lab/sweep_image_guidance.py: do not edit by hand -->",
        "# Sweep: image-space guidance scale",
        "",
        f"Toy DDPM (`{report['model']}`), the lab's x0 classifiers, distribution mode towards a uniform target, "
        f"{report['num_images']} images per setting in one batch (seeds {TUNING_SEED}+, disjoint from the "
        f"evaluation's), DDIM {report['steps']} steps. FD over every image uses the oracle's best-guess class; FD "
        "over valid images is noisy where few faces are valid (eta 1). Choice rule: the guided scale with the lowest "
        "mean FD (every image) plus mean valid rate lost against scale 0, over the (eta, attribute) pairs. Chosen: "
        f"**{report['chosen']}**. One image is 1/{report['num_images']} of a fraction: differences of one or two "
        "images are noise.",
        "",
        *summary_lines(report["rows"]),
        "",
        "| Eta | Attribute | Scale | FD (all) | FD (valid) | Valid | Fractions (all) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(report["rows"], key=lambda r: (-r["eta"], r["attribute"], r["scale"])):
        fd_valid = "-" if row["fd_valid"] is None else f"{row['fd_valid']:.3f}"
        shown = ", ".join(f"{f:.2f}" for f in row["fractions_all"])
        lines.append(
            f"| {row['eta']:g} | {row['attribute']} | {row['scale']:g} | {row['fd_all']:.3f} | {fd_valid} | {row['valid_rate']:.1%} "
            f"| {shown} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: Path) -> None:
    atomic_write_text(path, markdown(report))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Sweep the image-space guidance scale on the toy DDPM (CPU).")
    p.add_argument("--attributes", nargs="+", default=["skin", "glasses"], choices=list(ATTRIBUTES))
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--num-images", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=25)
    p.add_argument("--etas", type=float, nargs="+", default=[1.0, 0.0])
    p.add_argument("--model", type=Path, default=TOY_DDPM_PATH)
    p.add_argument("--output", type=Path, default=RESULTS / "sweep_image_guidance.json")
    p.add_argument("--max-settings", type=int, default=None, help="Stop after this many new settings (resumable).")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--render", action="store_true", help="Rewrite the page from --output's JSON (runs nothing).")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(args.output.read_text())
        write_markdown(report, args.output.with_suffix(".md"))
        return report
    torch.set_num_threads(args.threads)
    from diffusers import DDIMPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    pipe = DDIMPipeline.from_pretrained(str(args.model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "model": portable_path(args.model),
        "num_images": args.num_images,
        "steps": args.steps,
    }
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    rows = report.get("rows", []) if all(report.get(k) == v for k, v in settings.items()) else []
    done = {(row["eta"], row["attribute"], row["scale"]) for row in rows}
    new = 0
    for eta, attribute, scale in itertools.product(args.etas, args.attributes, args.scales):
        if (eta, attribute, scale) in done or (args.max_settings is not None and new >= args.max_settings):
            continue
        row = run_setting(pipe, eta, attribute, scale, args)
        rows.append(row)
        new += 1
        print(json.dumps(row), flush=True)
        report = {**settings, "chosen": choose(rows), "rows": rows}
        atomic_write_json(args.output, report, indent=1)
    report = {**settings, "chosen": choose(rows), "rows": rows}
    atomic_write_json(args.output, report, indent=1)
    write_markdown(report, args.output.with_suffix(".md"))
    print(f"chosen scale: {report['chosen']} ({args.output})")
    return report


if __name__ == "__main__":
    main()
