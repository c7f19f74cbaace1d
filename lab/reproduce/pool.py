"""Selection in the table: vanilla images kept while their class (a joint row: their cell) has room, drawn from the
sampler's vanilla pool: the vanilla job's images, then more vanilla jobs on the next seeds (`pool_job`), generated
after the other jobs and only as far as some row's counts need (`run_selection_jobs`); a selection job's file holds the
kept images' readings and the images it generated (`select_from_pool`)."""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from h_classifiers.io_utils import atomic_write_json
from h_classifiers.metrics import class_counts
from h_classifiers.toy_world import ATTRIBUTES
from lab.reproduce.jobs import Job, run_jobs
from lab.reproduce.measures import joint_cells
from lab.reproduce.rows import Sampler


# The smallest chunk of a vanilla pool after the vanilla job's: one call at the table's batch size (a tiny run's
# chunks of --num-images would each be a call of a few images).
POOL_CHUNK = 64


def pool_chunks(num_images: int, max_images: int) -> list[range]:
    """The image indices of each chunk of a vanilla pool: the vanilla job's images, then chunks of
    max(num_images, POOL_CHUNK) images, the last one cut at `max_images`."""
    size = max(num_images, POOL_CHUNK)
    return [range(num_images)] + [range(s, min(s + size, max_images)) for s in range(num_images, max_images, size)]


def pool_job(sampler: Sampler, seed: int, chunk: range) -> Job:
    """The vanilla job of a pool chunk: its images are those of one vanilla run of the sampler (image i with seed
    `seed + i`); the first chunk is the vanilla job itself. Shared by every row of the sampler."""
    return Job("vanilla", sampler, len(chunk), seed + chunk.start)


def select_from_pool(job: Job, jobs_dir: Path) -> tuple[dict[str, Any] | None, list[int]]:
    """The result of a selection job from its sampler's vanilla pool in `jobs_dir` and [], or None and the pool
    chunks its next round still needs. The images are offered in seed order, in the rounds `balancing-act evaluate`
    would generate them (`selection.selection_rounds`: vanilla's images, then batches of the row's batch size), each
    kept while its class (a joint row: its cell) has room; invalid images never are. The result holds the kept
    images' readings and the selection report (what it cost: the images generated per image kept)."""
    from h_classifiers.selection import Selector, default_max_images, selection_rounds

    row, n = job.row, job.num_images
    max_images = default_max_images(n)
    target = torch.tensor(row.target, dtype=torch.float64).flatten().tolist()
    selector = Selector(class_counts(target, n), max_images)
    pool = pool_chunks(n, max_images)
    starts = [chunk.start for chunk in pool]
    chunks: dict[int, dict[str, Any]] = {}  # loaded chunk index -> its job's result

    def reading(i: int) -> dict[str, Any]:
        """Image i's cell, validity and labels, from its chunk."""
        k = bisect.bisect_right(starts, i) - 1
        chunk, j = chunks[k], i - starts[k]
        labels = {a: values[j] for a, values in chunk["labels"].items()}
        return {"cell": int(chunk["cells"][j]), "valid": chunk["valid"][j], "labels": labels}

    for images in selection_rounds(n, row.batch_size, max_images):
        needed = range(bisect.bisect_right(starts, images.start) - 1, bisect.bisect_right(starts, images.stop - 1))
        paths = {k: jobs_dir / f"{pool_job(job.sampler, job.seed, pool[k]).key}.json" for k in needed}
        missing = [k for k, path in paths.items() if k not in chunks and not path.exists()]
        if missing:
            return None, missing
        for k in needed:
            if k not in chunks:
                chunk = json.loads(paths[k].read_text())
                labels = {a: torch.tensor(v) for a, v in chunk["labels"].items()}
                chunk["cells"] = torch.where(torch.tensor(chunk["valid"]).bool(), joint_cells(row, labels), -1)
                chunks[k] = chunk
        selector.offer([reading(i)["cell"] for i in images])
        if selector.filled:
            break
    readings = [reading(i) for i in selector.kept]
    result = {
        "key": job.key,
        "configuration": job.configuration,
        "row": row.name,
        "sampler": asdict(job.sampler),
        "num_images": len(readings),
        "seed": job.seed,
        "settings": dict(job.settings),
        "valid": [r["valid"] for r in readings],
        "labels": {a: [r["labels"][a] for r in readings] for a in ATTRIBUTES},
        "asked": None,
        "selection": selector.report(),
    }
    return result, []


def run_selection_jobs(jobs: list[Job], jobs_dir: Path, output_dir: Path) -> None:
    """The selection jobs, after the other jobs (their pools start with the vanilla jobs): while one still needs a
    pool chunk, the missing chunks are generated (with several processes, as many chunks ahead as processes), and
    the main process writes each selection job as soon as its counts are filled or its cap is reached. Every process
    takes the same decisions: they depend only on the chunk files, written before `run_jobs` returns."""
    from h_classifiers.distributed import is_main, num_processes, process_state
    from h_classifiers.selection import default_max_images

    state = process_state(cpu=True)
    while True:
        missing: dict[str, Job] = {}
        for job in jobs:
            path = jobs_dir / f"{job.key}.json"
            if path.exists():
                continue
            result, needed = select_from_pool(job, jobs_dir)
            if result is not None:
                if is_main(state):
                    atomic_write_json(path, result)
                continue
            pool = pool_chunks(job.num_images, default_max_images(job.num_images))
            # With several processes, also the next chunks: the processes work side by side.
            ahead = range(needed[-1] + 1, min(needed[-1] + num_processes(state), len(pool)))
            for k in [*needed, *ahead]:
                extra = pool_job(job.sampler, job.seed, pool[k])
                missing[extra.key] = extra
        if not missing:
            return
        run_jobs(list(missing.values()), jobs_dir, output_dir, {})
