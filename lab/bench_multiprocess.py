"""Several processes on this machine: `generate` throughput on 1 and 2 processes, and the cost of the per-step collective
of a global batch (a research tool, not installed).

python lab/bench_multiprocess.py [--num-images 128] [--batch-size 64] [--steps 25] [--repeats 2] [--quick]

1. generate: the `balancing-act generate` command on the committed toy model (vanilla + distribution mode, the same
   global batch), as 1 process with 1 thread, 1 process with 2 threads, and 2 processes x 1 thread launched with
   `accelerate launch` (CPU, gloo, loopback). First one untimed warm-up run of every setup (1 step: imports, file
   cache, launcher), then the timed runs, the setups in alternating order (forward, reversed, ...). Images/s of each
   set from the command's own timing (`generate_results.json`: generation and the gather, no model loading; the
   command warms both sets up before timing them), and the wall time of the whole command.
2. collective: what `global_batch=True` adds per guided step: one `all_gather` of every process's calibrated and raw
   logits, `[n, 2K]` float32 (the pipeline's own `_all_gather_rows`), timed between 2 gloo processes for several
   per-process batches n and class counts K, plus the size gather made once per call. The logits do not depend on h's
   shape, so these are the tensors of an SD1.5 run. Every case is warmed up, then the calls are timed in rounds that
   alternate the order of the cases. Compared with an SD1.5 UNet step of this machine when `docs/lab/bench/bench.json`
   (python -m lab.bench) holds one.

Output: `<output-dir>/multiprocess.json` and the Markdown table `<output-dir>/multiprocess.md`, both generated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from h_classifiers.io_utils import atomic_write_json, atomic_write_text  # noqa: E402


DEFAULT_OUTPUT_DIR = REPO_ROOT / "docs" / "lab" / "bench"
# (label, processes, torch threads per process)
GENERATE_SETUPS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
COLLECTIVE_ROWS = [1, 4, 16, 64]  # images per process and call
COLLECTIVE_CLASSES = [2, 7]  # e.g. a binary attribute; 7 classes
COLLECTIVE_WARMUP = 10  # untimed calls per case before the timed rounds
COLLECTIVE_ROUNDS = 5  # the timed calls of each case are spread over this many rounds, cases in alternating order
NOTES = [
    "On this 2-core CPU machine two processes share the same two cores that one process with two threads uses: the "
    "processes gain only from running the small toy kernels, the text encoder and the VAE side by side instead of "
    "splitting each op across threads, and they pay a second copy of the model, the per-step all_gather of a global "
    "batch and the final gather of the images. Other jobs on the machine (see the load average) share the cores too. "
    "With one process per GPU each process has its own device (not measured here).",
    "One process with 2 threads suffers most from other jobs on the cores: its threads wait for each other at every "
    "op (why the commands use 1 thread for the toy model, `_common.apply_threads`); its runs vary widely (in brackets: "
    "each run).",
    "Images/s come from the command's own generation time (vanilla and balanced sets, gather included, model loading "
    "excluded); the whole command adds start-up (imports, model loading, for 2 processes also the launcher).",
    "The collective is gloo over loopback on CPU; NCCL between GPUs is another measurement (not made here).",
]


def loopback_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return env | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}


def generate_command(
    processes: int, threads: int, args: argparse.Namespace, out: Path, steps: int | None = None
) -> list[str]:
    steps = args.steps if steps is None else steps
    command = ["-m", "h_classifiers.cli", "generate", "--num-images", str(args.num_images), "--steps", str(steps)]
    command += ["--batch-size", str(args.batch_size // processes), "--threads", str(threads), "--output-dir", str(out)]
    if processes == 1:
        return [sys.executable, *command]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # port 0: the rendezvous binds a free port itself (a port picked here could be taken before the launcher binds it)
    return [*launcher, "--main_process_ip", "127.0.0.1", "--main_process_port", "0", *command]


def _run_generate(label: str, processes: int, threads: int, args, out: Path, workdir: Path, steps=None):
    start = time.perf_counter()
    result = subprocess.run(
        generate_command(processes, threads, args, out, steps),
        cwd=workdir,
        env=loopback_env(threads),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{result.stderr[-3000:]}")
    report = json.loads((out / "generate_results.json").read_text())
    return {"wall_s": wall, **{k: v["seconds"] for k, v in report["results"].items()}}


def bench_generate(args: argparse.Namespace, workdir: Path) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Every setup warmed up once (1 step), then `args.repeats` timed runs each, the setups in alternating order."""
    from lab.bench.measuring import alternating_order

    setups = {label: (processes, threads) for label, processes, threads in GENERATE_SETUPS}
    for label, (processes, threads) in setups.items():
        out = workdir / f"warmup-{processes}x{threads}"
        print(f"  generate, {label}, warm-up: {_run_generate(label, processes, threads, args, out, workdir, 1)}")
    order = alternating_order(list(setups), args.repeats)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in setups}
    for repeat, round_order in enumerate(order):
        for label in round_order:
            processes, threads = setups[label]
            out = workdir / f"generate-{processes}x{threads}-{repeat}"
            runs[label].append(_run_generate(label, processes, threads, args, out, workdir))
            print(f"  generate, {label}, run {repeat + 1}: {runs[label][-1]}", flush=True)
    rows = []
    for label, (processes, threads) in setups.items():
        median = {k: statistics.median(run[k] for run in runs[label]) for k in runs[label][0]}
        rows.append(
            {
                "setup": label,
                "processes": processes,
                "threads_per_process": threads,
                "batch_size_per_process": args.batch_size // processes,
                "runs": runs[label],
                "median_s": median,
                "images_per_s": {k: args.num_images / median[k] for k in ("vanilla", "balanced")},
            }
        )
    return rows, order


def _collective_worker(rank: int, store: str, result_path: str, iterations: int) -> None:
    import torch.distributed as dist

    from pipeline_balancing_act import _all_gather_rows

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        cases = [("size gather (once per call)", 1, 1)]
        cases += [(f"logits, {k} classes", n, 2 * k) for k in COLLECTIVE_CLASSES for n in COLLECTIVE_ROWS]
        tensors = [torch.randn(n, width) if width > 1 else torch.tensor([n]) for _, n, width in cases]
        for index in range(len(cases)):
            for _ in range(COLLECTIVE_WARMUP):
                _all_gather_rows(tensors[index], [cases[index][1]] * 2)
        times: list[list[float]] = [[] for _ in cases]
        rounds = max(1, min(COLLECTIVE_ROUNDS, iterations))
        for r, round_order in enumerate(collective_order(len(cases), rounds)):
            calls = iterations // rounds + (r < iterations % rounds)
            for index in round_order:
                for _ in range(calls):
                    dist.barrier()
                    start = time.perf_counter()
                    _all_gather_rows(tensors[index], [cases[index][1]] * 2)
                    times[index].append(time.perf_counter() - start)
        rows = []
        for (name, n, width), case_times in zip(cases, times):
            rows.append(
                {
                    "case": name,
                    "rows_per_process": n,
                    "width": width,
                    "calls": len(case_times),
                    "median_us": statistics.median(case_times) * 1e6,
                    "p90_us": sorted(case_times)[int(0.9 * (len(case_times) - 1))] * 1e6,
                }
            )
        if rank == 0:
            Path(result_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def collective_order(num_cases: int, rounds: int) -> list[list[int]]:
    """The order of the cases in each timed round of the collective: forward, reversed, ..."""
    return [list(range(num_cases)) if r % 2 == 0 else list(reversed(range(num_cases))) for r in range(rounds)]


def bench_collective(iterations: int, workdir: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    result = workdir / "collective.json"
    mp.start_processes(
        _collective_worker,
        args=(str(workdir / "store"), str(result), iterations),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return json.loads(result.read_text())


def unet_step_reference(path: Path) -> dict[str, Any] | None:
    """The vanilla pipeline step (UNet at the measured rows) of the toy model and of SD1.5 on this machine, measured
    by python -m lab.bench, if its output is there."""
    try:
        bench = json.loads(path.read_text())
        scales = {
            name: {"s_per_step": scale["arms"]["vanilla"]["s_per_step"], "unet_rows": scale["unet_rows"]}
            for name, scale in bench["generation"].items()
        }
        return {"source": str(path.relative_to(REPO_ROOT)), "device": bench["machine"]["device"], "scales": scales}
    except (OSError, KeyError, ValueError, AttributeError):
        return None


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs; torch {machine['torch']}, accelerate "
        f"{machine['accelerate']}; load average at start {machine['load_average_start'][0]:.2f}, at end "
        f"{results['load_average_end'][0]:.2f}. Run: {results['started_utc']}, {results['total_wall_s']:.0f} s.",
        "",
    ]
    config = results["config"]
    if results.get("generate"):
        order = results.get("generate_order")
        lines += [
            f"`generate` on the toy model: {config['num_images']} images per set, {config['steps']} steps, global batch "
            f"{config['batch_size']}, median of {config['repeats']} run(s)"
            + (f" after one warm-up run (1 step) of every setup; setups in alternating order {order}" if order else "")
            + ".",
            "",
            "| Setup | Batch per process | Vanilla images/s | Balanced images/s | Whole command (s) |",
            "|---|---|---|---|---|",
        ]
        for row in results["generate"]:
            rates = {
                subset: f"{row['images_per_s'][subset]:.1f} ("
                + ", ".join(f"{config['num_images'] / run[subset]:.1f}" for run in row["runs"])
                + ")"
                for subset in ("vanilla", "balanced")
            }
            lines.append(
                f"| {row['setup']} | {row['batch_size_per_process']} | {rates['vanilla']} | {rates['balanced']} | "
                f"{row['median_s']['wall_s']:.1f} |"
            )
        lines.append("")
    lines += [
        f"Per-step collective of a global batch (2 gloo processes, loopback), median of {config['iterations']} calls"
        + (
            f" per case after {config['collective_warmup']} warm-up calls, in {config['collective_rounds']} rounds "
            "alternating the order of the cases"
            if "collective_rounds" in config
            else ""
        )
        + ":",
        "",
        "| Gathered | Rows per process | Tensor per process | Median (us) | p90 (us) |",
        "|---|---|---|---|---|",
    ]
    for row in results["collective"]:
        lines.append(
            f"| {row['case']} | {row['rows_per_process']} | [{row['rows_per_process']}, {row['width']}] | "
            f"{row['median_us']:.0f} | {row['p90_us']:.0f} |"
        )
    reference = results.get("unet_step_reference")
    if reference:
        worst = max(row["median_us"] for row in results["collective"]) / 1e6
        lines += [
            "",
            "| One denoising step on this machine (from " + reference["source"] + ") | s/step | slowest "
            "collective / step |",
            "|---|---|---|",
        ]
        for name, scale in reference["scales"].items():
            lines.append(
                f"| {name}, {reference['device']}, {scale['unet_rows']} UNet rows | {scale['s_per_step']:.3f} | "
                f"{worst / scale['s_per_step']:.1e} |"
            )
    lines += ["", *[f"- {note}" for note in NOTES]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python lab/bench_multiprocess.py",
        description="generate on 1 vs 2 processes (toy model) and the per-step all_gather of a global batch; writes "
        "multiprocess.json and multiprocess.md.",
    )
    parser.add_argument("--num-images", type=int, default=128, help="Images per set (default: 128).")
    parser.add_argument("--batch-size", type=int, default=64, help="Global batch (default: 64).")
    parser.add_argument("--steps", type=int, default=25, help="Denoising steps (default: 25).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per setup (default: 2).")
    parser.add_argument("--iterations", type=int, default=200, help="Timed all_gather calls per case (default: 200).")
    parser.add_argument("--quick", action="store_true", help="16 images, 5 steps, 1 run, 20 calls; no generate.")
    parser.add_argument("--skip-generate", action="store_true", help="Only the collective.")
    parser.add_argument(
        "--markdown-only", action="store_true", help="Only write multiprocess.md again from multiprocess.json."
    )
    parser.add_argument(
        "--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="Where the outputs go (default: docs/lab/bench)."
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import accelerate

    from lab.bench.measuring import cpu_model

    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.markdown_only:
        results = json.loads((output_dir / "multiprocess.json").read_text())
        atomic_write_text(output_dir / "multiprocess.md", markdown(results) + "\n")
        return results
    if args.quick:
        args.num_images, args.steps, args.repeats, args.iterations = 16, 5, 1, 20
    start = time.perf_counter()
    results: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu_model": cpu_model(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_start": list(os.getloadavg()),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
        },
        "config": {k: getattr(args, k) for k in ("num_images", "batch_size", "steps", "repeats", "iterations")}
        | {"collective_warmup": COLLECTIVE_WARMUP, "collective_rounds": min(COLLECTIVE_ROUNDS, args.iterations)},
    }
    with tempfile.TemporaryDirectory(prefix="bench-multiprocess-") as tmp:
        if not (args.quick or args.skip_generate):
            results["generate"], results["generate_order"] = bench_generate(args, Path(tmp))
        results["collective"] = bench_collective(args.iterations, Path(tmp))
    results["unet_step_reference"] = unet_step_reference(DEFAULT_OUTPUT_DIR / "bench.json")
    results["load_average_end"] = list(os.getloadavg())
    results["total_wall_s"] = time.perf_counter() - start
    results["notes"] = NOTES
    atomic_write_json(output_dir / "multiprocess.json", results, indent=1)
    atomic_write_text(output_dir / "multiprocess.md", markdown(results) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
