"""`balancing-act generate`: vanilla vs balanced images from the same seeds, side by side, with measured fractions.

With no arguments it runs on the committed toy model with the shipped skin classifier, distribution mode toward
50/50, and measures both sets of images with the toy world's pixel oracle.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from h_classifiers.commands import _common
from h_classifiers.commands._parser import CommandParser
from h_classifiers.evaluation import (
    load_pipeline,
    make_grid,
    resolve_device,
    run_configuration,
    side_by_side,
    summarize_labels,
)
from h_classifiers.io_utils import atomic_save_image, atomic_write_json


MODES = ("distribution", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="balancing-act generate",
        description="Generate the same seeds without and with Balancing Act guidance; write a side-by-side grid and "
        "print the measured class fractions of both.",
    )
    parser.add_argument(
        "--prompt", default=_common.toy_defaults()["prompt"], help="Prompt (default: the neutral one)."
    )
    parser.add_argument(
        "--mode",
        default="distribution",
        choices=list(MODES),
        help="distribution: steer the batch toward --target; sample: steer image i to a class, classes drawn to "
        "match --target (default: distribution).",
    )
    parser.add_argument("--num-images", type=_common.positive_int, default=64, help="Images per set (default: 64).")
    parser.add_argument(
        "--batch-size",
        type=_common.positive_int,
        default=64,
        help="Images per pipeline call (default: 64); distribution mode balances each batch.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i, in both sets (default: 0).")
    parser.add_argument("--output-dir", default="outputs", help="Where the grid and results go (default: outputs/).")
    _common.add_guidance_arguments(parser)
    _common.add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # what can be checked before anything is loaded
        _common.check_classifier_path(args.classifier)
        if args.mode == "distribution":
            _common.check_distribution_images(args.num_images)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    _common.apply_threads(args)
    _common.quiet_loading()
    try:
        device = resolve_device(args.device)
        classifier = _common.load_classifier(args.classifier)
        class_names = list(classifier.config.class_names)
        target = _common.resolve_target(args.target, classifier)
        labeller = _common.build_labeller(args, classifier, device)
        pipe = load_pipeline(args.model, device, args.dtype, args.scheduler)
    except (ValueError, FileNotFoundError, OSError) as error:
        parser.error(str(error))

    spec = _common.evaluation_spec(args, target)
    start = time.perf_counter()
    runs = {"vanilla": run_configuration(pipe, classifier, spec, "vanilla")}
    runs["balanced"] = run_configuration(pipe, classifier, spec, args.mode)

    output_dir = Path(args.output_dir)
    grid_path = output_dir / "generate_grid.png"
    panels = [
        ("vanilla", make_grid(runs["vanilla"].images)),
        (f"balanced ({args.mode} mode)", make_grid(runs["balanced"].images)),
    ]
    atomic_save_image(side_by_side(panels), grid_path)

    results = {}
    print(
        f"attribute {classifier.config.attribute!r}, classes {class_names}, target "
        f"{[round(p, 3) for p in target]}, {args.num_images} images, {args.scheduler} {args.steps} steps"
    )
    for name, run in runs.items():
        if labeller is not None:
            summary = summarize_labels(labeller(run.images), target, run.asked)
        else:
            summary = {"num_images": len(run.images)}
        summary["seconds"] = run.seconds
        results[name] = summary
        if labeller is not None:
            print(_common.format_summary(name, summary, class_names))
    if labeller is None:
        print("No labeller: fractions not measured (pass --labeller to measure them).")
    report = {
        "model": args.model,
        "classifier": args.classifier,
        "mode": args.mode,
        "scheduler": args.scheduler,
        "labeller": getattr(labeller, "source", None),
        "class_names": class_names,
        "spec": asdict(spec),
        "results": results,
        "total_seconds": time.perf_counter() - start,
    }
    atomic_write_json(output_dir / "generate_results.json", report, indent=2)
    print(f"grid: {grid_path}  (left: vanilla, right: balanced, same seeds)")
    return report


if __name__ == "__main__":
    main()
