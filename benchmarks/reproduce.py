"""The reproduction table on the toy world (and the strength / branches tuning sweep).

Rows (toy model, neutral prompt, the shipped toy classifiers, the toy oracle as labeller): skin 50/50, skin 30/70,
glasses 50/50, hair uniform over 3 (DDIM 25), and skin 50/50 with PNDM 50, DPM-Solver++ 20 and Euler 30 (the
"skin 50/50 with DDIM 25" row is the first row). Configurations: vanilla, sample mode, distribution mode, prompt
baseline, at batch 64; distribution mode again at batch 8.

Work is shared where the images cannot differ (image i always uses seed + i):
- vanilla depends only on the scheduler and step count, so it is generated once per scheduler and labelled for
  each row's attribute;
- vanilla, sample mode and the prompt baseline do not couple the images of a batch, so they are generated once at
  the first batch size; only distribution mode (whose statistic is the batch mean) is re-run at the other sizes.

`--sweep` runs the tuning sweep instead: skin 50/50, DDIM 25, seeds disjoint from the table's, distribution and
sample mode for each guidance strength and each `guided_branches` value.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from h_classifiers.commands import _common  # noqa: E402
from h_classifiers.evaluation import (  # noqa: E402
    EvaluationSpec,
    load_pipeline,
    make_grid,
    run_configuration,
    save_fraction_chart,
    set_scheduler,
    summarize_labels,
)
from h_classifiers.io_utils import atomic_save_image, atomic_write_json, atomic_write_text  # noqa: E402


# The guidance settings of the published table (chosen on the tuning sweep, seeds disjoint from the table's; see
# docs/readme/evaluation.md). Passed explicitly so the table does not move when the pipeline's defaults change.
TABLE_STRENGTH = 600.0
TABLE_BRANCHES = "cond"
TABLE_TEMPERATURE = None
TABLE_WINDOW = (0.0, 1.0)
TABLE_GUIDANCE_SCALE = 7.5
TABLE_SEED = 0
SWEEP_SEED = 1_000_000
SWEEP_STRENGTHS = (100.0, 300.0, 600.0, 1000.0)
SWEEP_TEMPERATURES = (8.0, 2.0)
FULL_WINDOW = (0.0, 1.0)
SWEEP_WINDOWS = (FULL_WINDOW,)

# Targets of issue 4, section 5.
TARGET_FD = 0.03
TARGET_VALID_DROP = 0.01
TARGET_HIT_RATE = 0.98

SCHEDULER_LABELS = {"ddim": "DDIM", "pndm": "PNDM", "dpm++": "DPM-Solver++", "euler": "Euler", "euler_a": "Euler a"}
GRID_ROWS = ("skin-50-50", "hair-uniform")
BATCH_INDEPENDENT = ("vanilla", "sample", "prompt")


@dataclass(frozen=True)
class Row:
    name: str
    attribute: str
    target: tuple[float, ...]
    scheduler: str = "ddim"
    steps: int = 25

    @property
    def title(self) -> str:
        if len(self.target) > 2 and len(set(self.target)) == 1:
            split = f"uniform over {len(self.target)}"
        else:
            split = "/".join(f"{round(100 * p)}" for p in self.target)
        return f"{self.attribute} {split}"

    @property
    def sampler(self) -> str:
        return f"{SCHEDULER_LABELS.get(self.scheduler, self.scheduler)} {self.steps}"


ROWS = (
    Row("skin-50-50", "skin", (0.5, 0.5)),
    Row("skin-30-70", "skin", (0.3, 0.7)),
    Row("glasses-50-50", "glasses", (0.5, 0.5)),
    Row("hair-uniform", "hair", (1 / 3, 1 / 3, 1 / 3)),
    Row("skin-50-50-pndm50", "skin", (0.5, 0.5), "pndm", 50),
    Row("skin-50-50-dpm20", "skin", (0.5, 0.5), "dpm++", 20),
    Row("skin-50-50-euler30", "skin", (0.5, 0.5), "euler", 30),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/reproduce.py",
        description="Produce the reproduction table on the toy world (docs/results/), or with --sweep the tuning "
        "sweep of guidance strength and guided_branches.",
    )
    defaults = _common.toy_defaults()
    parser.add_argument("--model", default=defaults["model"], help="The toy model directory.")
    parser.add_argument(
        "--classifiers-dir",
        default=str(Path(defaults["classifier"]).parent),
        help="Directory holding one h-classifier per attribute (skin/, glasses/, hair/).",
    )
    parser.add_argument("--rows", default=",".join(ROWS_BY_NAME), help="Comma-separated subset of the rows.")
    parser.add_argument("--num-images", type=_common.positive_int, default=512, help="Images per configuration.")
    parser.add_argument(
        "--batch-sizes", default="64,8", help="Comma-separated batch sizes; the first is the main one (default 64,8)."
    )
    parser.add_argument("--strength", type=_common.non_negative_float, default=TABLE_STRENGTH)
    parser.add_argument("--guided-branches", choices=list(_common.GUIDED_BRANCHES), default=TABLE_BRANCHES)
    parser.add_argument(
        "--temperature",
        type=_common.positive_float,
        default=TABLE_TEMPERATURE,
        help="classifier_temperature (default: %(default)s; unset: each classifier's config.temperature).",
    )
    parser.add_argument(
        "--guidance-window",
        default="-".join(f"{x:g}" for x in TABLE_WINDOW),
        help="guidance_steps as START-END fractions of the denoising steps (default: %(default)s).",
    )
    parser.add_argument("--guidance-scale", type=float, default=TABLE_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=None, help="First image seed (default: table 0, sweep 1000000).")
    parser.add_argument(
        "--workers", type=_common.positive_int, default=2, help="Worker processes (default: 2; 1 runs in-process)."
    )
    parser.add_argument(
        "--threads", type=_common.positive_int, default=1, help="torch CPU threads per worker (default: 1)."
    )
    parser.add_argument("--output-dir", default="docs/results", help="Where results go (default: docs/results).")
    parser.add_argument("--sweep", action="store_true", help="Run the tuning sweep instead of the table.")
    parser.add_argument(
        "--sweep-strengths",
        default=",".join(str(s) for s in SWEEP_STRENGTHS),
        help="Comma-separated guidance strengths for --sweep.",
    )
    parser.add_argument(
        "--sweep-branches", default="cond,both", help="Comma-separated guided_branches values for --sweep."
    )
    parser.add_argument(
        "--sweep-windows",
        default=",".join("-".join(f"{x:g}" for x in w) for w in SWEEP_WINDOWS),
        help="Comma-separated guidance_steps windows START-END for --sweep.",
    )
    parser.add_argument(
        "--sweep-temperatures",
        default=",".join(f"{t:g}" for t in SWEEP_TEMPERATURES),
        help="Comma-separated classifier temperatures for --sweep.",
    )
    return parser


def parse_list(text: str, cast, argument: str, accepted: str) -> list:
    try:
        values = [cast(part.strip()) for part in text.split(",") if part.strip()]
    except (ValueError, argparse.ArgumentTypeError):
        values = []
    if not values:
        raise ValueError(f"`{argument}` must be {accepted}, got {text!r}.")
    return values


def parse_rows(text: str) -> list[Row]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS_BY_NAME]
    if unknown or not names:
        raise ValueError(f"`--rows` must be a comma-separated subset of {list(ROWS_BY_NAME)}, got {text!r}.")
    return [ROWS_BY_NAME[n] for n in names]


class Toolkit:
    """The toy model, the shipped classifiers, the oracle labellers and the explicit prompts, loaded once."""

    def __init__(self, model: str, classifiers_dir: str):
        from h_classifiers import HClassifier
        from h_classifiers.labellers import ToyOracleLabeller
        from h_classifiers.toy_world import ATTRIBUTES, NEUTRAL_PROMPT, attribute_prompt

        self.pipe = load_pipeline(model, "cpu", "float32")
        self.base_scheduler_config = dict(self.pipe.scheduler.config)
        self.prompt = NEUTRAL_PROMPT
        self.labellers = {attribute: ToyOracleLabeller(attribute) for attribute in ATTRIBUTES}
        self.classifiers, self.class_prompts = {}, {}
        for attribute, class_names in ATTRIBUTES.items():
            path = Path(classifiers_dir) / attribute
            if not path.exists():
                continue  # only the attributes of the rows asked for are checked (`check_classifiers`)
            classifier = HClassifier.from_pretrained(path)
            if list(classifier.config.class_names) != class_names:
                raise ValueError(
                    f"The classifier at {path} has classes {classifier.config.class_names}; the toy world's "
                    f"{attribute!r} classes are {class_names}."
                )
            self.classifiers[attribute] = classifier
            self.class_prompts[attribute] = [attribute_prompt(attribute, c) for c in class_names]


def check_classifiers(classifiers_dir: str, attributes: set[str]) -> None:
    missing = [a for a in sorted(attributes) if not (Path(classifiers_dir) / a / "config.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"`--classifiers-dir` {classifiers_dir!r} has no h-classifier for {missing} (expected <dir>/<attribute>/ "
            "written by HClassifier.save_pretrained)."
        )


@dataclass(frozen=True)
class Job:
    """One configuration to generate and label: everything a worker process needs besides the Toolkit."""

    key: str
    configuration: str
    scheduler: str
    steps: int
    attribute: str | None  # the guided / prompted attribute; None for vanilla
    target: tuple[float, ...]
    num_images: int
    batch_size: int
    seed: int
    guidance_scale: float
    guidance: tuple[tuple[str, Any], ...]
    label_attributes: tuple[str, ...]
    keep_images: int = 0  # images returned for the grids


def execute(job: Job, toolkit: Toolkit) -> dict[str, Any]:
    """Generate and label one job; returns labels per attribute, the asked classes, seconds and kept images."""
    set_scheduler(toolkit.pipe, job.scheduler, config=toolkit.base_scheduler_config)
    spec = EvaluationSpec(
        prompt=toolkit.prompt,
        target=list(job.target),
        num_images=job.num_images,
        batch_size=job.batch_size,
        seed=job.seed,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        class_prompts=toolkit.class_prompts.get(job.attribute),
        guidance=dict(job.guidance),
    )
    generation = run_configuration(toolkit.pipe, toolkit.classifiers.get(job.attribute), spec, job.configuration)
    return {
        "labels": {a: toolkit.labellers[a](generation.images).tolist() for a in job.label_attributes},
        "asked": generation.asked,
        "seconds": generation.seconds,
        "images": generation.images[: job.keep_images],
    }


_WORKER_TOOLKIT: Toolkit | None = None


def _init_worker(model: str, classifiers_dir: str, threads: int) -> None:
    global _WORKER_TOOLKIT
    torch.set_num_threads(threads)
    _common.quiet_loading()
    _WORKER_TOOLKIT = Toolkit(model, classifiers_dir)


def _execute_in_worker(job: Job) -> dict[str, Any]:
    return execute(job, _WORKER_TOOLKIT)


def run_jobs(jobs: list[Job], args: argparse.Namespace, description: str) -> dict[str, dict[str, Any]]:
    """
    Run the jobs, in this process (`--workers 1`) or in worker processes of `--threads` threads each (on a few
    cores, processes of one thread each beat one process of many threads). Results do not depend on the number of
    workers: each job is deterministic from its seeds.
    """
    results = {}
    # Longest first, so that the workers finish together.
    ordered = sorted(jobs, key=lambda j: -j.steps * j.num_images * (2 if j.batch_size < 16 else 1))
    with tqdm(total=sum(j.num_images for j in jobs), desc=description, unit="img") as bar:
        if args.workers == 1:
            toolkit = Toolkit(args.model, args.classifiers_dir)
            for job in ordered:
                results[job.key] = execute(job, toolkit)
                bar.update(job.num_images)
            return results
        context = multiprocessing.get_context("spawn")
        initargs = (args.model, args.classifiers_dir, args.threads)
        with ProcessPoolExecutor(args.workers, context, initializer=_init_worker, initargs=initargs) as pool:
            futures = {pool.submit(_execute_in_worker, job): job for job in ordered}
            for future in as_completed(futures):
                job = futures[future]
                results[job.key] = future.result()
                bar.update(job.num_images)
    return results


def measure(result: dict[str, Any], attribute: str, target: tuple[float, ...]) -> dict[str, Any]:
    summary = summarize_labels(torch.tensor(result["labels"][attribute]), target, result["asked"])
    summary["seconds"] = result["seconds"]
    return summary


def table_jobs(args: argparse.Namespace, rows: list[Row], batch_sizes: list[int], seed: int) -> list[Job]:
    """Vanilla once per sampler (labelled for every attribute of its rows); per row sample, distribution and prompt at
    the first batch size, distribution again at the others."""
    guidance = guidance_settings(args.strength, args.guided_branches, args.temperature, args.window)
    common = {"num_images": args.num_images, "seed": seed, "guidance_scale": args.guidance_scale}
    jobs = []
    for scheduler, steps in dict.fromkeys((r.scheduler, r.steps) for r in rows):
        attributes = tuple(sorted({r.attribute for r in rows if (r.scheduler, r.steps) == (scheduler, steps)}))
        keep = 64 if any(r.name in GRID_ROWS for r in rows if (r.scheduler, r.steps) == (scheduler, steps)) else 0
        jobs.append(
            Job(
                f"vanilla/{scheduler}{steps}",
                "vanilla",
                scheduler,
                steps,
                None,
                (),
                batch_size=batch_sizes[0],
                guidance=(),
                label_attributes=attributes,
                keep_images=keep,
                **common,
            )
        )
    for row in rows:
        keep = 64 if row.name in GRID_ROWS else 0
        for configuration in ("sample", "distribution", "prompt"):
            jobs.append(
                Job(
                    f"{row.name}/{configuration}/b{batch_sizes[0]}",
                    configuration,
                    row.scheduler,
                    row.steps,
                    row.attribute,
                    row.target,
                    batch_size=batch_sizes[0],
                    guidance=guidance,
                    label_attributes=(row.attribute,),
                    keep_images=keep,
                    **common,
                )
            )
        for batch_size in batch_sizes[1:]:
            jobs.append(
                Job(
                    f"{row.name}/distribution/b{batch_size}",
                    "distribution",
                    row.scheduler,
                    row.steps,
                    row.attribute,
                    row.target,
                    batch_size=batch_size,
                    guidance=guidance,
                    label_attributes=(row.attribute,),
                    **common,
                )
            )
    return jobs


def run_table(args: argparse.Namespace, rows: list[Row], batch_sizes: list[int], seed: int) -> dict[str, Any]:
    from h_classifiers.toy_world import ATTRIBUTES

    check_classifiers(args.classifiers_dir, {row.attribute for row in rows})
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    results = run_jobs(table_jobs(args, rows, batch_sizes, seed), args, "reproduce")
    main = batch_sizes[0]
    report_rows = []
    for row in rows:
        vanilla_key = f"vanilla/{row.scheduler}{row.steps}"
        generated = {"vanilla": results[vanilla_key]}
        generated.update({c: results[f"{row.name}/{c}/b{main}"] for c in ("sample", "distribution", "prompt")})
        batches = {str(main): {name: measure(r, row.attribute, row.target) for name, r in generated.items()}}
        for batch_size in batch_sizes[1:]:
            result = results[f"{row.name}/distribution/b{batch_size}"]
            batches[str(batch_size)] = {"distribution": measure(result, row.attribute, row.target)}
        report_rows.append(
            {
                "row": row.name,
                "title": row.title,
                "attribute": row.attribute,
                "class_names": ATTRIBUTES[row.attribute],
                "target": list(row.target),
                "scheduler": row.scheduler,
                "steps": row.steps,
                "batches": batches,
            }
        )
        grids = {n: r["images"] for n, r in generated.items()} if row.name in GRID_ROWS else {}
        write_row_figures(row, report_rows[-1], grids, batch_sizes, output_dir)
    report = {
        "what": "Balancing Act reproduction table on the toy world (issue 4, section 5)",
        "command": "python benchmarks/reproduce.py " + " ".join(args.argv),
        **run_settings(args, seed, batch_sizes),
        "guidance": dict(guidance_settings(args.strength, args.guided_branches, args.temperature, args.window)),
        "shared_work": "vanilla is generated once per sampler and labelled for each row's attribute; vanilla, sample "
        "mode and the prompt baseline are generated at the first batch size only (their images do not depend on it)",
        "total_seconds": time.perf_counter() - start,
        "rows": report_rows,
    }
    atomic_write_json(output_dir / "results.json", report, indent=2)
    atomic_write_text(output_dir / "table.md", table_markdown(report))
    return report


def run_settings(args: argparse.Namespace, seed: int, batch_sizes: list[int]) -> dict[str, Any]:
    import diffusers

    return {
        "model": relative(args.model),
        "classifiers_dir": relative(args.classifiers_dir),
        "prompt": _common.toy_defaults()["prompt"],
        "num_images": args.num_images,
        "batch_sizes": batch_sizes,
        "first_seed": seed,
        "guidance_scale": args.guidance_scale,
        "labeller": "toy_world.ToyOracle (one-hot labels; invalid images excluded from fractions and FD)",
        "machine": {
            "cpu": cpu_model(),
            "workers": args.workers,
            "threads_per_worker": args.threads,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }


def write_row_figures(
    row: Row,
    result: dict[str, Any],
    images: dict[str, list[Image.Image]],
    batch_sizes: list[int],
    output_dir: Path,
) -> None:
    main = result["batches"][str(batch_sizes[0])]
    measured = {
        f"{name} (b{batch_sizes[0]})" if name == "distribution" else name: s["fractions"] for name, s in main.items()
    }
    for batch_size in batch_sizes[1:]:
        measured[f"distribution (b{batch_size})"] = result["batches"][str(batch_size)]["distribution"]["fractions"]
    title = f"{row.title}, {row.sampler}: class fractions of valid images (toy oracle)"
    save_fraction_chart(row.target, measured, result["class_names"], output_dir / f"fractions_{row.name}.png", title)
    for name, configuration_images in images.items():
        if configuration_images:
            atomic_save_image(make_grid(configuration_images), output_dir / f"grid_{row.name}_{name}.png")


def relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _temperature(value: float | None) -> str:
    return "the classifier's" if value is None else f"{value:g}"


def _fractions(summary: dict[str, Any], class_names: list[str]) -> str:
    if summary["fractions"] is None:
        return "n/a"
    return " / ".join(f"{c} {f:.3f}" for c, f in zip(class_names, summary["fractions"]))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def target_checks(result: dict[str, Any], batch_size: str) -> dict[str, bool | None]:
    """The issue's targets for one row: distribution FD, valid rate vs vanilla, sample-mode hit rate."""
    main = result["batches"][batch_size]
    vanilla, distribution, sample = main["vanilla"], main["distribution"], main["sample"]
    fd = distribution["fd"]
    return {
        "distribution_fd": None if fd is None else fd <= TARGET_FD,
        "distribution_valid": distribution["valid_rate"] >= vanilla["valid_rate"] - TARGET_VALID_DROP,
        "sample_hit": None if sample.get("hit_rate") is None else sample["hit_rate"] >= TARGET_HIT_RATE,
    }


def table_markdown(report: dict[str, Any]) -> str:
    batch_sizes = [str(b) for b in report["batch_sizes"]]
    main = batch_sizes[0]
    lines = [
        f'Toy world, prompt "{report["prompt"]}", {report["num_images"]} images per configuration (image i: seed '
        f"{report['first_seed']} + i), classifier-free guidance {report['guidance_scale']}, guidance_strength "
        f'{report["guidance"]["guidance_strength"]:g}, guided_branches "{report["guidance"]["guided_branches"]}", '
        f"classifier_temperature {_temperature(report['guidance'].get('classifier_temperature'))}. "
        "Fractions: one-hot toy-oracle labels over valid images; FD = ||p_ref - p||_2 over those fractions; valid: "
        "the oracle's validity rule; seconds: generation wall time of the configuration (VAE decode included) on "
        f"{report['machine']['cpu']}, {report['machine']['workers']} worker process(es) of "
        f"{report['machine']['threads_per_worker']} thread(s). Hit: sample mode's asked class "
        "(prompt baseline: the prompted class) among valid images.",
        "",
        f"### Batch {main}",
        "",
        "| Row | Scheduler | Configuration | Measured fractions | FD | Valid | Seconds | Hit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report["rows"]:
        row = ROWS_BY_NAME.get(result["row"], Row(result["row"], result["attribute"], tuple(result["target"])))
        for name in ("vanilla", "sample", "distribution", "prompt"):
            s = result["batches"][main][name]
            hit = _pct(s.get("hit_rate")) if "hit_rate" in s else ""
            lines.append(
                f"| {row.title} | {row.sampler} | {name} | {_fractions(s, result['class_names'])} | {_num(s['fd'])} | "
                f"{_pct(s['valid_rate'])} | {s['seconds']:.1f} | {hit} |"
            )
    for batch_size in batch_sizes[1:]:
        lines += [
            "",
            f"### Batch {batch_size} (distribution mode; the other configurations do not depend on the batch size)",
            "",
            f"| Row | Scheduler | Measured fractions | FD (b{batch_size}) | FD (b{main}) | Valid (b{batch_size}) | "
            f"Vanilla valid | Seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for result in report["rows"]:
            row = ROWS_BY_NAME.get(result["row"], Row(result["row"], result["attribute"], tuple(result["target"])))
            s = result["batches"][batch_size]["distribution"]
            lines.append(
                f"| {row.title} | {row.sampler} | {_fractions(s, result['class_names'])} | {_num(s['fd'])} | "
                f"{_num(result['batches'][main]['distribution']['fd'])} | {_pct(s['valid_rate'])} | "
                f"{_pct(result['batches'][main]['vanilla']['valid_rate'])} | {s['seconds']:.1f} |"
            )
    lines += [
        "",
        f"### Targets (batch {main}): distribution FD <= {TARGET_FD}, distribution valid rate at most "
        f"{round(100 * TARGET_VALID_DROP)} point below vanilla, sample mode >= {round(100 * TARGET_HIT_RATE)}% on the "
        "asked class",
        "",
        "| Row | Scheduler | Distribution FD | Valid vs vanilla | Sample hit |",
        "|---|---|---|---|---|",
    ]
    mark = {True: "met", False: "**missed**", None: "n/a"}
    for result in report["rows"]:
        row = ROWS_BY_NAME.get(result["row"], Row(result["row"], result["attribute"], tuple(result["target"])))
        checks = target_checks(result, main)
        s = result["batches"][main]
        lines.append(
            f"| {row.title} | {row.sampler} | {_num(s['distribution']['fd'])} ({mark[checks['distribution_fd']]}) | "
            f"{_pct(s['distribution']['valid_rate'])} vs {_pct(s['vanilla']['valid_rate'])} "
            f"({mark[checks['distribution_valid']]}) | {_pct(s['sample'].get('hit_rate'))} "
            f"({mark[checks['sample_hit']]}) |"
        )
    lines += ["", f"Total wall time: {report['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def guidance_settings(
    strength: float, branches: str, temperature: float | None, window: tuple[float, float] = FULL_WINDOW
) -> tuple[tuple[str, Any], ...]:
    """The pipeline's guidance arguments of one setting (temperature None: the classifier's own)."""
    settings = (("guidance_strength", strength), ("guided_branches", branches), ("guidance_steps", tuple(window)))
    return settings if temperature is None else settings + (("classifier_temperature", temperature),)


def parse_window(text: str, argument: str) -> tuple[float, float]:
    """`"0-0.3"` -> (0.0, 0.3): the fraction window of guided denoising steps."""
    try:
        start, end = (float(part) for part in text.split("-"))
    except ValueError:
        start = end = math.nan
    if not (0 <= start < end <= 1):
        raise ValueError(
            f"`{argument}` must be START-END fractions with 0 <= START < END <= 1 (e.g. 0-0.3), got {text!r}."
        )
    return (start, end)


def run_sweep(
    args: argparse.Namespace,
    seed: int,
    batch_size: int,
    strengths: list[float],
    branches: list[str],
    temperatures: list[float],
    windows: list[tuple[float, float]],
) -> dict[str, Any]:
    row = ROWS_BY_NAME["skin-50-50"]
    check_classifiers(args.classifiers_dir, {row.attribute})
    common = {
        "scheduler": row.scheduler,
        "steps": row.steps,
        "attribute": row.attribute,
        "target": row.target,
        "num_images": args.num_images,
        "batch_size": batch_size,
        "seed": seed,
        "guidance_scale": args.guidance_scale,
        "label_attributes": (row.attribute,),
    }
    settings = [(b, t, w, s) for b in branches for t in temperatures for w in windows for s in strengths]
    jobs = [Job("vanilla", "vanilla", guidance=(), **common)]
    for setting in settings:
        guidance = guidance_settings(setting[3], setting[0], setting[1], setting[2])
        for mode in ("distribution", "sample"):
            jobs.append(Job(f"{setting}/{mode}", mode, guidance=guidance, **common))
    start = time.perf_counter()
    results = run_jobs(jobs, args, "sweep")
    entries = [
        {
            "guidance_strength": setting[3],
            "guided_branches": setting[0],
            "classifier_temperature": setting[1],
            "guidance_steps": list(setting[2]),
            **{m: measure(results[f"{setting}/{m}"], row.attribute, row.target) for m in ("distribution", "sample")},
        }
        for setting in settings
    ]
    vanilla = measure(results["vanilla"], row.attribute, row.target)
    report = {
        "what": "Tuning sweep: guidance_strength x guided_branches on skin 50/50, DDIM 25 (seeds disjoint from the table)",
        "command": "python benchmarks/reproduce.py " + " ".join(args.argv),
        **run_settings(args, seed, [batch_size]),
        "vanilla": vanilla,
        "entries": entries,
        "choice": choose_default(entries, vanilla),
        "total_seconds": time.perf_counter() - start,
    }
    output_dir = Path(args.output_dir)
    atomic_write_json(output_dir / "sweep.json", report, indent=2)
    atomic_write_text(output_dir / "sweep.md", sweep_markdown(report))
    return report


SETTING_KEYS = ("guidance_strength", "guided_branches", "classifier_temperature", "guidance_steps")


def choose_default(entries: list[dict[str, Any]], vanilla: dict[str, Any]) -> dict[str, Any]:
    """
    The rules that pick defaults from the sweep (no row of the table is looked at):
    - `joint` (one setting for both modes): among settings whose valid rate stays at most one point below vanilla in
      both modes, the lowest distribution FD + sample-mode miss rate (1 - hit rate), ties to the smaller strength;
      if no setting keeps both valid rates, the constraint applies to distribution mode only;
    - `distribution`: among settings whose distribution-mode valid rate stays within that point, the lowest FD;
    - `sample`: among settings reaching the hit-rate target, the highest sample-mode valid rate (else the highest
      hit rate).
    """
    floor = vanilla["valid_rate"] - TARGET_VALID_DROP

    def pick(entry: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if entry is None else {key: entry[key] for key in SETTING_KEYS}

    def joint_score(e: dict[str, Any]) -> tuple[float, float]:
        return (e["distribution"]["fd"] + 1 - e["sample"]["hit_rate"], e["guidance_strength"])

    measured = [e for e in entries if e["distribution"]["fd"] is not None and e["sample"].get("hit_rate") is not None]
    feasible = [e for e in measured if e["distribution"]["valid_rate"] >= floor]
    both_valid = [e for e in feasible if e["sample"]["valid_rate"] >= floor]
    joint = min(both_valid or feasible, key=joint_score, default=None)
    distribution = min(feasible, key=lambda e: (e["distribution"]["fd"], e["guidance_strength"]), default=None)
    hitting = [e for e in measured if e["sample"]["hit_rate"] >= TARGET_HIT_RATE]
    sample = max(
        hitting or measured,
        key=lambda e: (e["sample"]["valid_rate"], e["sample"]["hit_rate"]) if hitting else e["sample"]["hit_rate"],
        default=None,
    )
    return {"joint": pick(joint), "distribution": pick(distribution), "sample": pick(sample)}


def _setting(choice: dict[str, Any] | None) -> str:
    if choice is None:
        return "none"
    window = "-".join(f"{x:g}" for x in choice["guidance_steps"])
    return (
        f'guidance_strength {choice["guidance_strength"]:g}, guided_branches "{choice["guided_branches"]}", '
        f"classifier_temperature {_temperature(choice['classifier_temperature'])}, guidance_steps {window}"
    )


def sweep_markdown(report: dict[str, Any]) -> str:
    v = report["vanilla"]
    lines = [
        f'Skin 50/50, DDIM 25, prompt "{report["prompt"]}", {report["num_images"]} images per setting (seeds '
        f"{report['first_seed']} + i, disjoint from the table's), batch {report['batch_sizes'][0]}, classifier-free "
        f"guidance {report['guidance_scale']}. Vanilla: fractions {_fractions(v, ['light', 'dark'])}, FD "
        f"{_num(v['fd'])}, valid {_pct(v['valid_rate'])}.",
        "",
        "| guided_branches | classifier_temperature | guidance_steps | guidance_strength | Distribution FD | "
        "Distribution valid | Sample hit | Sample valid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report["entries"]:
        d, s = e["distribution"], e["sample"]
        window = "-".join(f"{x:g}" for x in e["guidance_steps"])
        lines.append(
            f"| {e['guided_branches']} | {_temperature(e['classifier_temperature'])} | {window} | "
            f"{e['guidance_strength']:g} | {_num(d['fd'])} | {_pct(d['valid_rate'])} | "
            f"{_pct(s.get('hit_rate'))} | {_pct(s['valid_rate'])} |"
        )
    choice = report["choice"]
    lines += [
        "",
        "Rules (`choose_default`): joint = among settings whose valid rate is at most 1 point below vanilla in both "
        "modes, the lowest distribution FD + sample-mode miss rate; distribution = among settings whose distribution "
        "valid rate is within that point, the lowest FD; "
        f"sample = among settings with hit >= {round(100 * TARGET_HIT_RATE)}%, the highest sample valid rate.",
        "",
        f"- joint: {_setting(choice['joint'])}",
        f"- distribution mode: {_setting(choice['distribution'])}",
        f"- sample mode: {_setting(choice['sample'])}",
        "",
        f"Total wall time: {report['total_seconds'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    _common.quiet_loading()
    try:
        rows = parse_rows(args.rows)
        batch_sizes = parse_list(args.batch_sizes, _common.positive_int, "--batch-sizes", "positive integers")
        strengths = parse_list(args.sweep_strengths, _common.non_negative_float, "--sweep-strengths", "numbers >= 0")
        branches = parse_list(args.sweep_branches, str, "--sweep-branches", "a subset of cond,both")
        temperatures = parse_list(
            args.sweep_temperatures, _common.positive_float, "--sweep-temperatures", "numbers > 0"
        )
        windows = [parse_window(w, "--sweep-windows") for w in args.sweep_windows.split(",")]
        args.window = parse_window(args.guidance_window, "--guidance-window")
        if any(b not in _common.GUIDED_BRANCHES for b in branches):
            raise ValueError(
                f"`--sweep-branches` must be a subset of {list(_common.GUIDED_BRANCHES)}, got {branches}."
            )
    except ValueError as error:
        parser.error(str(error))
    if args.sweep:
        seed = SWEEP_SEED if args.seed is None else args.seed
        report = run_sweep(args, seed, batch_sizes[0], strengths, branches, temperatures, windows)
    else:
        report = run_table(args, rows, batch_sizes, TABLE_SEED if args.seed is None else args.seed)
    print((sweep_markdown if args.sweep else table_markdown)(report))
    return report


if __name__ == "__main__":
    main()
