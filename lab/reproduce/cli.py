"""The command line: `python -m lab.reproduce [--world sd|ddpm] [--sweep NAME] [--render] ...` (module docstring of
`lab.reproduce`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from h_classifiers.io_utils import atomic_write_text
from lab import LAB_DOCS
from lab.reproduce.render import render_file
from lab.reproduce.rows import DDPM_BATCH, SWEEPS, TABLE_SEED, TUNING_SEED, WORLDS
from lab.reproduce.runner import run_sweep, run_table, write_reach_comparison


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab.reproduce",
        description="The reproduction table on the toy world (docs/lab/results/), or a sweep that chose a default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", default="", help="Comma-separated subset of the table's rows (default: all).")
    parser.add_argument("--num-images", type=int, default=None, help="Images per job (table 512, sweeps 256).")
    parser.add_argument(
        "--seed", type=int, default=None, help=f"First seed (table {TABLE_SEED}, sweeps {TUNING_SEED})."
    )
    parser.add_argument(
        "--world",
        choices=tuple(WORLDS),
        default="sd",
        help="sd: the toy Stable Diffusion model; ddpm: the unconditional toy DDPM (the paper's setting).",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="Where results go (sd: docs/lab/results, ddpm: docs/lab/results/unconditional).",
    )
    parser.add_argument(
        "--jobs-dir",
        default=None,
        help="Where each job's per-image results go (sd: .work/reproduce-jobs, ddpm: .work/reproduce-jobs-ddpm).",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="Rewrite the world's table.md from its results.json, or with --sweep the sweep's page from its JSON "
        "(runs nothing).",
    )
    parser.add_argument(
        "--reach-comparison",
        action="store_true",
        help="Write docs/lab/results/reach_comparison.md from the reach sweeps' results (runs nothing).",
    )
    parser.add_argument(
        "--sweep",
        choices=SWEEPS,
        default=None,
        help="Run a sweep instead (ddpm: strength, reach and hold).",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    from h_classifiers.commands._parser import silence_known_notices

    silence_known_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reach_comparison:
        write_reach_comparison(Path(args.output_dir or LAB_DOCS / "results") / "reach_comparison.md")
        return None
    world = WORLDS[args.world]
    args.output_dir = args.output_dir or str(world.output_dir)
    if args.render:
        results = Path(args.output_dir) / (f"sweep_{args.sweep}.json" if args.sweep else "results.json")
        page, text = render_file(results)
        atomic_write_text(page, text)
        return json.loads(results.read_text())
    args.jobs_dir = args.jobs_dir or str(world.jobs_dir)
    unknown = [n for n in args.rows.split(",") if n and n not in world.rows_by_name]
    if unknown:
        parser.error(f"--rows: unknown rows {unknown}; rows: {', '.join(world.rows_by_name)}")
    if args.sweep == "fair-diffusion" and args.world != "sd":
        parser.error(f"--sweep {args.sweep} tunes the text-to-image world's defaults; use --world sd.")
    if args.sweep:
        args.num_images = args.num_images or 256
        args.seed = TUNING_SEED if args.seed is None else args.seed
        return run_sweep(args)
    args.num_images = args.num_images or (DDPM_BATCH if args.world == "ddpm" else 512)
    args.seed = TABLE_SEED if args.seed is None else args.seed
    return run_table(args)
