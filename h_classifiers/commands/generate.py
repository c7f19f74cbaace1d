"""`balancing-act generate`: vanilla vs balanced images from the same seeds, side by side, with measured fractions.

With no arguments it runs on the committed toy model with the shipped skin classifier, distribution mode toward
50/50, and measures both sets of images with the toy world's pixel oracle.

Several processes / GPUs: `accelerate launch --num_processes N -m h_classifiers.cli generate ...` (docs/multi_gpu.md).
Image i keeps seed --seed + i; each round of --batch-size x N images is shared between the processes and, in
distribution mode, guided as one global batch. `--save-images DIR` writes every image and a manifest, and resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, replace
from pathlib import Path

from h_classifiers.commands import _common, _errors, _model_kind
from h_classifiers.commands._parser import CommandParser, silence_known_notices


# The parser and the checks import no torch: the modules that generate are imported in `main` once they have passed
# (a bad argument is one quick argparse error).


MODES = ("distribution", "sample")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="balancing-act generate",
        description="Generate the same seeds without and with Balancing Act guidance; write a side-by-side grid and "
        "print the measured class fractions of both.",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="Prompt of a text-to-image model (default: the neutral one; an unconditional model takes none).",
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
        help="Images per pipeline call in each process (default: 64); distribution mode balances each batch (with N "
        "processes: each global batch of N x --batch-size images).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i, in both sets (default: 0).")
    parser.add_argument("--output-dir", default="outputs", help="Where the grid and results go (default: outputs/).")
    parser.add_argument(
        "--save-images",
        default=None,
        metavar="DIR",
        help="Also write every image as DIR/<set>/<index>_seed<seed>.png and DIR/manifest.jsonl; running the same "
        "command again resumes (default: images not saved).",
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    _common.add_guidance_arguments(parser)
    _common.add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    silence_known_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    _model_kind.resolve_model_kind(parser, args, _common.text_defaults())
    run = _common.start_run(parser, args, distribution=args.mode == "distribution")
    state, device, classifier, class_names, target = run.state, run.device, run.classifier, run.class_names, run.target
    from tqdm.auto import tqdm

    from h_classifiers import evaluation
    from h_classifiers.distributed import is_main, num_processes, wait
    from h_classifiers.io_utils import atomic_save_image, atomic_write_json, portable_path
    from h_classifiers.metrics import format_probabilities, summarize_labels
    from h_classifiers.saved_images import ImageSet, write_manifest

    with _errors.argument_errors(parser):
        labeller = _common.build_labeller(args, classifier, device)
        pipe = evaluation.load_pipeline(args.model, device, args.dtype, args.scheduler, not args.no_safety_checker)

    spec = _common.evaluation_spec(args, target)
    sets = (("vanilla", "vanilla"), ("balanced", args.mode))
    # Neither set is timed from cold: both are warmed up first, in the reverse of the timed order. A classifier that
    # does not fit the model, or another input the pipeline refuses, is one argparse error here.
    with _errors.pipeline_input_errors(parser):
        warm_up(pipe, classifier, spec, [configuration for _, configuration in reversed(sets)], state)
    start = time.perf_counter()
    runs, images, saved = {}, {}, {}
    bar = tqdm(total=2 * args.num_images, desc="generate", unit="img", disable=args.no_progress or not is_main(state))
    for name, configuration in sets:
        options, reading = {"state": state, "progress": bar.update}, contextlib.nullcontext()
        if args.save_images is not None:
            settings = saved_settings(args, target, configuration, state)
            try:
                saved[name] = ImageSet(
                    args.save_images,
                    name,
                    [spec.prompt] * spec.num_images,
                    spec.seed,
                    settings,
                    state,
                    args.batch_size,
                )
            except ValueError as error:
                parser.error(str(error))
            options.update(saved[name].generation_options(pipe, classifier))
            reading = saved[name].reading
        with reading, _errors.pipeline_input_errors(parser):
            runs[name] = evaluation.run_configuration(pipe, classifier, spec, configuration, **options)
        images[name] = runs[name].images  # every process's images, gathered
    bar.close()
    wait(state)
    if not is_main(state):
        return None
    for name, image_set in saved.items():  # resumed runs: the images made earlier come from the files
        records, images[name] = image_set.load()
        saved[name] = records

    output_dir = Path(args.output_dir)
    grid_path = output_dir / "generate_grid.png"
    panels = [
        ("vanilla", evaluation.make_grid(images["vanilla"])),
        (f"balanced ({args.mode} mode)", evaluation.make_grid(images["balanced"])),
    ]
    atomic_save_image(evaluation.side_by_side(panels), grid_path)

    results, manifest = {}, []
    print(
        f"attribute {classifier.config.attribute!r}, classes {class_names}, target "
        f"{format_probabilities(target)}, {args.num_images} images, {args.scheduler} {args.steps} steps"
        + _common.eta_note(args)
    )
    for name, run in runs.items():
        labels = labeller(images[name]) if labeller is not None else None
        if labeller is not None:
            summary = summarize_labels(labels, target, run.asked, run.blacked_out)
        else:
            summary = {"num_images": len(images[name])}
            if run.blacked_out is not None:
                summary["num_blacked_out"] = len(run.blacked_out)
        manifest += [
            predicted(record, labels, j, labeller, class_names) for j, record in enumerate(saved.get(name, []))
        ]
        summary["seconds"] = run.seconds
        results[name] = summary
        if labeller is not None:
            print(_common.format_summary(name, summary, class_names))
        else:
            note = _common.blacked_out_note(name, summary.get("num_blacked_out"), summary["num_images"])
            if note is not None:
                print(note)
    if labeller is None:
        print("No labeller: fractions not measured (pass --labeller to measure them).")
    report = {
        "model": portable_path(args.model),
        "classifier": portable_path(args.classifier),
        "mode": args.mode,
        "scheduler": args.scheduler,
        "labeller": getattr(labeller, "source", None),
        "class_names": class_names,
        "spec": asdict(spec),
        "num_processes": num_processes(state),
        "results": results,
        "total_seconds": time.perf_counter() - start,
    }
    if saved:
        report["save_images"] = str(write_manifest(args.save_images, manifest))
    atomic_write_json(output_dir / "generate_results.json", report, indent=2)
    print(f"grid: {grid_path}  (left: vanilla, right: balanced, same seeds)")
    if saved:
        print(f"images: {args.save_images}/{{vanilla,balanced}}/, manifest: {report['save_images']}")
    return report


def warm_up(pipe, classifier, spec, configurations: list[str], state) -> None:
    """One untimed call of each configuration before the timed sets, so that first-call costs (the classifier's
    loading and caching, allocations, kernel choices) fall on no set's time: one batch (with several processes, one
    global batch) of the run's shape, 1 denoising step, nothing kept."""
    from h_classifiers.distributed import num_processes
    from h_classifiers.evaluation import run_configuration

    short = replace(
        spec, num_images=min(spec.num_images, spec.batch_size * num_processes(state)), num_inference_steps=1
    )
    for configuration in configurations:
        run_configuration(pipe, classifier, short, configuration, state=state)


def saved_settings(args: argparse.Namespace, target: list[float], configuration: str, state) -> dict:
    """What defines the saved images of a set: a resumed run must match it (`saved_images.ImageSet`)."""
    settings = {
        "configuration": configuration,
        "model": args.model,
        "prompt": args.prompt,
        "num_images": args.num_images,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "dtype": args.dtype,
    }
    if args.eta is not None:  # an unconditional model
        settings["eta"] = args.eta
    for name in ("height", "width"):  # only when asked: runs saved before these options resume unchanged
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if configuration != "vanilla":
        settings.update(classifier=args.classifier, target=target, guidance=_common.guidance_kwargs(args))
    if configuration == "distribution":  # the images of a global batch depend on its size
        from h_classifiers.distributed import num_processes

        settings["global_batch_size"] = args.batch_size * num_processes(state)
    return settings


def predicted(record: dict, labels, j: int, labeller, class_names: list[str]) -> dict:
    """A manifest line: the image's record and its predicted class (the labeller's, else the h-classifier's
    reading at the last step; None for an image the labeller cannot label)."""
    line = dict(record)
    if labeller is not None:
        k = int(labels[j])
        line.update(predicted_class=class_names[k] if k >= 0 else None, predicted_by=labeller.source)
    elif "classifier_class" in record:
        line.update(predicted_class=record["classifier_class"], predicted_by="h-classifier (last step)")
    return line


if __name__ == "__main__":
    main()
