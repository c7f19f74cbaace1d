"""Running a table or a sweep: its jobs (`jobs.run_jobs`, then selection's pools), the merge of their results, and
the files written (`results.json` and `table.md`, or `sweep_<name>.{json,md}`); the sweeps' choice rule."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

from h_classifiers.io_utils import atomic_write_json, atomic_write_text
from lab.reproduce.jobs import Job, run_jobs, table_jobs
from lab.reproduce.measures import measure, merge
from lab.reproduce.pool import run_selection_jobs
from lab.reproduce.render import (
    reach_comparison_page,
    sweep_markdown,
    table_markdown,
    write_figures,
    write_front_page_figure,
)
from lab.reproduce.rows import (
    DDPM_HOLD_ROWS,
    DDPM_REACH_ROWS,
    DDPM_REACH_STRENGTHS,
    DDPM_STRENGTH_ROWS,
    DDPM_STRENGTHS,
    FAIR_DIFFUSION_GRID,
    FAIR_DIFFUSION_ROWS,
    HOLD_GRID,
    HOLD_ROWS,
    POOLED_CLASSIFIERS,
    REACH_ROWS,
    REACH_STRENGTHS,
    README_CLASSIFIERS,
    STRENGTH_ROWS,
    STRENGTHS,
    TARGET_VALID_DROP,
    WORLDS,
)


def settings_summary(world: str) -> dict[str, Any]:
    import pipeline_balancing_act as pba
    from h_classifiers.baselines import DEFAULT_FAIR_DIFFUSION_SETTINGS
    from lab.image_guidance import DEFAULT_IMAGE_GUIDANCE_SCALE
    from pipeline_balancing_act_unconditional import DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH

    return {
        "guidance_strength": DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH
        if world == "ddpm"
        else pba.DEFAULT_GUIDANCE_STRENGTH,
        "guidance_margin": pba.GUIDANCE_MARGIN,
        "switch_penalty": pba.SWITCH_PENALTY,
        "guided_branches": "cond",
        "soft_solver_temperature": pba.DEFAULT_TEMPERATURE,
        "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE,
        "fair_diffusion": DEFAULT_FAIR_DIFFUSION_SETTINGS,
    }


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def run_table(args: argparse.Namespace) -> dict[str, Any] | None:
    from h_classifiers.distributed import is_main, num_processes

    world = WORLDS[args.world]
    rows = [world.rows_by_name[n] for n in args.rows.split(",")] if args.rows else list(world.rows)
    if any(r.classifiers == "readme" for r in rows) and not (README_CLASSIFIERS / "skin").is_dir():
        raise SystemExit(
            f"The README-recipe classifiers are missing: run lab/readme_recipe.sh (-> {README_CLASSIFIERS})."
        )
    if any(r.classifiers == "pooled" for r in rows) and not (POOLED_CLASSIFIERS / "skin").is_dir():
        raise SystemExit(f"The pooled classifiers are missing: run lab/pooled_recipe.sh (-> {POOLED_CLASSIFIERS}).")
    output_dir = Path(args.output_dir)
    jobs, by_row = table_jobs(rows, args.num_images, args.seed)
    grids: dict[str, list[str]] = {}  # job key -> names of the grids of its first 64 images
    for r in ("skin-50-50", "glasses-50-50", "hair-uniform"):
        for c in ("vanilla", "distribution", "fair_diffusion", "image_guidance") if r in by_row else ():
            if c in by_row[r]:
                grids.setdefault(by_row[r][c].key, []).append(f"{r}_{c}")
    selection = [job for job in jobs if job.configuration == "selection"]
    state = run_jobs([job for job in jobs if job.configuration != "selection"], Path(args.jobs_dir), output_dir, grids)
    run_selection_jobs(selection, Path(args.jobs_dir), output_dir)
    if not is_main(state):
        return None
    report = {
        "world": args.world,
        "num_images": args.num_images,
        "seed": args.seed,
        "settings": settings_summary(args.world),
        "processes": num_processes(state),
        "machine": machine(),
        "rows": merge(rows, by_row, Path(args.jobs_dir)),
    }
    atomic_write_json(output_dir / "results.json", report)
    atomic_write_text(output_dir / "table.md", table_markdown(report))
    write_figures(report, output_dir)
    write_front_page_figure(output_dir)
    return report


def run_sweep(args: argparse.Namespace) -> dict[str, Any] | None:
    from h_classifiers.distributed import is_main

    ddpm = args.world == "ddpm"
    if args.sweep == "strength":
        rows, strengths = (DDPM_STRENGTH_ROWS, DDPM_STRENGTHS) if ddpm else (STRENGTH_ROWS, STRENGTHS)
        grid = [(("guidance_strength", s),) for s in strengths]
    elif args.sweep == "reach":
        rows, strengths = (DDPM_REACH_ROWS, DDPM_REACH_STRENGTHS) if ddpm else (REACH_ROWS, REACH_STRENGTHS)
        grid = [(("guidance_strength", s),) for s in strengths]
    elif args.sweep == "hold":
        rows, grid = DDPM_HOLD_ROWS if ddpm else HOLD_ROWS, list(HOLD_GRID)
    else:
        rows, grid = FAIR_DIFFUSION_ROWS, list(FAIR_DIFFUSION_GRID)
    jobs_dir = Path(args.jobs_dir)
    jobs, entries = {}, []
    for row in rows:
        vanilla = Job("vanilla", row.sampler, args.num_images, args.seed)
        jobs[vanilla.key] = vanilla
        for settings in grid:
            for configuration in row.configurations:
                job = Job(configuration, row.sampler, args.num_images, args.seed, row, settings)
                jobs[job.key] = job
                entries.append((row, configuration, settings, job, vanilla))
    if not is_main(run_jobs(list(jobs.values()), jobs_dir, Path(args.output_dir), {})):
        return None
    load = lambda job: json.loads((jobs_dir / f"{job.key}.json").read_text())  # noqa: E731
    results = []
    for row, configuration, settings, job, vanilla in entries:
        summary = measure(load(job), row, load(vanilla))
        van = measure(load(vanilla), row, load(vanilla))
        result = {"row": row.name, "configuration": configuration, "settings": dict(settings), **summary}
        result["vanilla_valid"] = van["valid_rate"]
        if 1.0 in row.target:  # one class asked of every image: how many reached it, against vanilla
            asked, attribute = row.target.index(1.0), row.attributes[0]
            result["reached"] = summary["fractions"][attribute][asked]
            result["vanilla_reached"] = van["fractions"][attribute][asked]
        results.append(result)
    report = {
        "sweep": args.sweep,
        "num_images": args.num_images,
        "seed": args.seed,
        "results": results,
    }
    if args.sweep in ("strength", "fair-diffusion"):
        report["choice"] = choose(results)
    report["world"] = args.world
    atomic_write_json(Path(args.output_dir) / f"sweep_{args.sweep}.json", report)
    atomic_write_text(Path(args.output_dir) / f"sweep_{args.sweep}.md", sweep_markdown(report))
    return report


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting with the lowest mean FD over the rows (distribution mode for the strength sweep), among those
    whose mean valid rate is at most one point below vanilla's; without such a setting, the lowest mean FD."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["configuration"] in ("distribution", "fair_diffusion"):
            by_setting.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r)
    scores = []
    for key, rs in by_setting.items():
        mean_fd = sum(r["fd"] for r in rs) / len(rs)
        drop = sum(r["vanilla_valid"] - r["valid_rate"] for r in rs) / len(rs)
        scores.append((drop > TARGET_VALID_DROP, mean_fd, key, drop))
    scores.sort()
    _, mean_fd, key, drop = scores[0]
    return {"settings": json.loads(key), "mean_fd": mean_fd, "mean_valid_drop": drop}


def write_reach_comparison(output: Path) -> str:
    text = reach_comparison_page()
    atomic_write_text(output, text)
    return text
