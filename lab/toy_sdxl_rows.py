"""The toy SDXL's bucket rows: skin 30/70 and 50/50 in every aspect-ratio bucket, with pooled classifiers trained on
the square bucket only (a research tool: the SDXL targets of the lab).

    python lab/toy_sdxl_rows.py     # docs/lab/toy_sdxl_rows.json + .md; each job's result cached in .work/toy-sdxl-rows

Per bucket (`lab.toy_sdxl.BUCKETS`: square 32x32, wide 32x48, tall 48x32): vanilla, then each row in distribution mode
(the default settings) and in sample mode, `--num-images` images in batches of 64 from the table's seeds (image i:
seed `--seed` + i; the defaults were never tuned on this model), the toy SD table's sampler (DDIM 25 steps, CFG 7.5).
The toy oracle reads each image's centre square. The classifiers are `lab/toy_sdxl_classifiers.sh`'s: the same
files guide every bucket. Measured as the reproduction table measures (`lab.reproduce.measures.measure`): FD over
the valid images, the valid rate against vanilla's, and the other attributes' drift (entanglement).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from h_classifiers.io_utils import atomic_write_json, portable_path  # noqa: E402
from h_classifiers.metrics import TARGET_FD, asked_classes  # noqa: E402
from h_classifiers.toy_world import ATTRIBUTES, NEUTRAL_PROMPT  # noqa: E402
from lab import LAB_DOCS, ROOT, write_record  # noqa: E402
from lab.reproduce.jobs import generate_images  # noqa: E402
from lab.reproduce.measures import measure  # noqa: E402
from lab.reproduce.rows import TABLE_SEED, Row, Sampler  # noqa: E402
from lab.toy_sdxl import BUCKETS  # noqa: E402


TOY_SDXL = ROOT / "lab" / "assets" / "toy-sdxl"
TOY_SDXL_CLASSIFIERS = ROOT / "lab" / "assets" / "toy-sdxl-classifiers"  # lab/toy_sdxl_classifiers.sh
WEIGHTS = "diffusion_pytorch_model.safetensors"
SAMPLER = Sampler()  # the toy SD table's: DDIM 25 steps, CFG 7.5
BATCH_SIZE = 64
TARGET_VALID_DROP = 0.02  # the SDXL bucket target: valid within 2 points of vanilla, per bucket
ROWS = (
    Row("skin-30-70", ("skin",), (0.3, 0.7), SAMPLER, configurations=("distribution", "sample")),
    Row("skin-50-50", ("skin",), (0.5, 0.5), SAMPLER, configurations=("distribution", "sample")),
)


def weights_digest(args: argparse.Namespace) -> list[str]:
    """The model's and the skin classifier's weights, hashed: part of every job's key (computed once per run)."""
    weights = [args.model / "unet" / WEIGHTS, args.classifiers / "skin" / WEIGHTS]
    return [hashlib.sha1(path.read_bytes()).hexdigest()[:10] for path in weights]


def job_file(
    cache: Path, bucket: str, configuration: str, row: Row | None, args: argparse.Namespace, digests: list[str]
) -> Path:
    """A job's cached result, keyed by everything that makes its images (the model and classifier by `digests`)."""
    strength = None if row is None else args.guidance_strength  # vanilla does not depend on it
    key = [bucket, configuration, row.target if row else None, args.num_images, args.seed, digests]
    text = json.dumps(key + ([strength] if strength is not None else []))
    name = "vanilla" if row is None else f"{row.name}-{configuration}"
    return cache / f"{bucket}-{name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"


def run_job(pipe, oracle, bucket: str, configuration: str, row: Row | None, classifier, args) -> dict[str, Any]:
    """Generate one job's images in the bucket's size and read them with the oracle."""
    height, width = BUCKETS[bucket]
    n = args.num_images
    call: dict[str, Any] = {
        "num_inference_steps": SAMPLER.steps,
        "guidance_scale": SAMPLER.guidance_scale,
        "height": height,
        "width": width,
    }
    per_image, asked = None, None
    if row is not None and args.guidance_strength is not None:
        call["guidance_strength"] = args.guidance_strength
    if configuration == "sample":
        asked = asked_classes(list(row.target), n)
        call.update(h_classifier=classifier, guidance_mode="sample")
        per_image = {"target_classes": asked}
    elif configuration == "distribution":
        call.update(h_classifier=classifier, guidance_mode="distribution", target_distribution=list(row.target))
    start = time.perf_counter()
    images = generate_images(pipe, [NEUTRAL_PROMPT] * n, args.seed, n, BATCH_SIZE, per_image, **call)
    reading = oracle.read(images)
    return {
        "bucket": bucket,
        "size": [height, width],
        "configuration": configuration,
        "row": row.name if row else None,
        "num_images": n,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "valid": reading["valid"].int().tolist(),
        "labels": {a: reading[a].tolist() for a in ATTRIBUTES},
        "asked": asked,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from h_classifiers.evaluation import load_pipeline
    from h_classifiers.toy_world import ToyOracle
    from pipeline_balancing_act import HClassifier

    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    pipe, oracle = load_pipeline(args.model, "cpu", "float32"), ToyOracle()
    classifier = HClassifier.from_pretrained(str(args.classifiers / "skin")).eval()
    results: dict[str, Any] = {}
    digests = weights_digest(args)
    for bucket in BUCKETS:
        jobs = [("vanilla", None)] + [(c, row) for row in ROWS for c in row.configurations]
        loaded = {}
        for configuration, row in jobs:
            path = job_file(args.cache, bucket, configuration, row, args, digests)
            if not path.exists():
                atomic_write_json(path, run_job(pipe, oracle, bucket, configuration, row, classifier, args))
            result = loaded[configuration, row.name if row else None] = json.loads(path.read_text())
            print(f"{bucket} {configuration} {row.name if row else ''}: {result['seconds']:.0f} s", flush=True)
        vanilla = loaded["vanilla", None]
        rows = {}
        for row in ROWS:
            measured = {"vanilla": measure(vanilla, row, vanilla)}
            measured.update({c: measure(loaded[c, row.name], row, vanilla) for c in row.configurations})
            default = measured["distribution"]
            drop = measured["vanilla"]["valid_rate"] - default["valid_rate"]
            rows[row.name] = {
                "target": list(row.target),
                "configurations": measured,
                "fd_met": default["fd"] <= TARGET_FD,
                "valid_drop": drop,
                "valid_met": drop <= TARGET_VALID_DROP,
            }
        results[bucket] = {"size": list(BUCKETS[bucket]), "rows": rows}
    return {
        "model": portable_path(args.model),
        "classifier": portable_path(args.classifiers / "skin"),
        "pool_size": classifier.config.pool_size,
        "h_shape": classifier.config.h_shape,
        "sampler": asdict(SAMPLER),
        "num_images": args.num_images,
        "batch_size": BATCH_SIZE,
        "seed": args.seed,
        "guidance_strength": args.guidance_strength,
        "buckets": results,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "<!-- generated by python lab/toy_sdxl_rows.py: do not edit by hand -->",
        "# The toy SDXL's aspect-ratio buckets, guided with one square-trained pooled classifier",
        "",
        f"Model `{report['model']}`; skin classifier `{report['classifier']}` (pooled to "
        f"{report['pool_size']}x{report['pool_size']}, trained on the square bucket's h {report['h_shape']} only). "
        f"DDIM {report['sampler']['steps']} steps, CFG {report['sampler']['guidance_scale']:g}, "
        f"{report['num_images']} images per job in batches of {report['batch_size']}, seeds {report['seed']} to "
        f"{report['seed'] + report['num_images'] - 1}. "
        + (
            "Default guidance settings (these seeds were never used to tune anything). "
            if report.get("guidance_strength") is None
            else f"Default guidance settings but `guidance_strength` {report['guidance_strength']:g}. "
        )
        + "Read by the toy oracle on each image's centre square; fractions are over the valid images.",
        "",
        f"Targets: distribution-mode FD <= {TARGET_FD} and valid within {100 * TARGET_VALID_DROP:g} points of vanilla, "
        "in every bucket.",
        "",
        "| bucket (h x w px) | row | vanilla light/dark | vanilla valid | distribution FD | valid | sample FD | "
        "sample valid | entanglement (points) | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bucket, b in report["buckets"].items():
        for name, r in b["rows"].items():
            m = r["configurations"]
            van, dist, sample = m["vanilla"], m["distribution"], m["sample"]
            skin = "/".join(f"{100 * p:.0f}" for p in van["fractions"]["skin"])
            met = (
                "met"
                if r["fd_met"] and r["valid_met"]
                else "missed: " + ", ".join(n for n, ok in (("FD", r["fd_met"]), ("valid", r["valid_met"])) if not ok)
            )
            lines.append(
                f"| {bucket} ({b['size'][0]}x{b['size'][1]}) | {name} | {skin} | {100 * van['valid_rate']:.1f}% | "
                f"{dist['fd']:.3f} | {100 * dist['valid_rate']:.1f}% | {sample['fd']:.3f} | "
                f"{100 * sample['valid_rate']:.1f}% | {100 * (dist['entanglement_max'] or 0):.1f} | {met} |"
            )
    flags = ""
    if report.get("guidance_strength") is not None:
        flags = (
            f" --guidance-strength {report['guidance_strength']:g} --seed {report['seed']} --output {report['output']}"
        )
    lines += ["", f"Regenerate: `python lab/toy_sdxl_rows.py{flags}` (after `bash lab/toy_sdxl_classifiers.sh`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=TOY_SDXL)
    parser.add_argument("--classifiers", type=Path, default=TOY_SDXL_CLASSIFIERS)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=TABLE_SEED)
    parser.add_argument(
        "--guidance-strength", type=float, default=None, help="Guided jobs' strength (default: the pipeline's)."
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=ROOT / ".work" / "toy-sdxl-rows")
    parser.add_argument("--output", type=Path, default=LAB_DOCS / "toy_sdxl_rows.json")
    args = parser.parse_args(argv)
    report = run(args)
    if args.guidance_strength is not None:
        report["output"] = portable_path(args.output)
    print(write_record(args.output, report, markdown))
    return report


if __name__ == "__main__":
    main()
