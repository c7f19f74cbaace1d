"""Several processes (one per GPU, or several CPU processes) with accelerate: who does what, and putting it together.

A command launched with `accelerate launch --num_processes N -m h_classifiers.cli <command> ...` (or torchrun) runs
in N processes. `process_state()` gives their accelerate `PartialState` (None for a plain one-process run, which then
never touches accelerate's state or torch.distributed). The work is split with accelerate's `split_between_processes`
(`share`): generation by rounds of images (`generation.generate_batches`), extraction by chunks
(`feature_store._run_chunks`). Results come together with torch.distributed collectives: `gather_objects` (accelerate's
`gather_object`) for images and records; the pipeline's `global_batch=True` gathers the guidance logits at each step.

Rule for every collective: all processes reach it in the same order; a decision that changes how many collectives a
process makes (what to skip on resume, which chunks are pending) is taken from a state all processes see alike,
before any process writes (`wait`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def process_state(cpu: bool = False):
    """The accelerate `PartialState` of a run launched in several processes (`WORLD_SIZE` > 1: `accelerate launch`,
    torchrun), else None.

    With `cpu`, on a machine without CUDA or with `ACCELERATE_USE_CPU` set, the processes are CPU processes and talk
    over gloo.
    Note: accelerate's own `--cpu` flag launches one process unless MPI is set up; on CPU launch with
    `accelerate launch --multi_gpu --num_processes N` (torchrun underneath), see docs/multi_gpu.md.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    cpu = (
        cpu
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )
    state = PartialState(cpu=cpu)
    return state if state.num_processes > 1 else None


def num_processes(state) -> int:
    return 1 if state is None else int(state.num_processes)


def process_index(state) -> int:
    return 0 if state is None else int(state.process_index)


def is_main(state) -> bool:
    return state is None or bool(state.is_main_process)


def wait(state) -> None:
    """Barrier: every process waits for the others (nothing for one process)."""
    if num_processes(state) > 1:
        state.wait_for_everyone()


def process_device(state, requested: torch.device) -> torch.device:
    """The device of this process: with several processes, `auto`/`cuda` (a device without index) means this process's
    own accelerator (`state.device`, e.g. cuda:LOCAL_RANK); a CPU stays the CPU."""
    if num_processes(state) == 1 or requested.index is not None or requested.type != state.device.type:
        return requested
    return torch.device("cpu") if state.device.type == "cpu" else state.device


def share(items: Sequence, state) -> list:
    """This process's contiguous part of `items` (accelerate's `split_between_processes`: the first `len % N`
    processes take one more), in order; all of them for one process."""
    items = list(items)
    if num_processes(state) == 1:
        return items
    with state.split_between_processes(items) as mine:
        return list(mine)


def share_range(indices: range, state) -> range:
    """`share` for a range of image indices, as a range."""
    mine = share(indices, state)
    return range(mine[0], mine[-1] + 1) if mine else range(indices.start, indices.start)


def gather_objects(objects: list, state) -> list:
    """Every process's list of `objects` (picklable), concatenated in process order, on every process
    (`accelerate.utils.gather_object`, i.e. `torch.distributed.all_gather_object`)."""
    if num_processes(state) == 1:
        return list(objects)
    from accelerate.utils import gather_object

    return list(gather_object(list(objects)))


def gather_indexed(pairs: Iterable[tuple[int, Any]], state) -> list[Any]:
    """The values of every process's `(index, value)` pairs, in index order, on every process (an index must not
    come twice)."""
    gathered = sorted(gather_objects(list(pairs), state), key=lambda pair: pair[0])
    indices = [index for index, _ in gathered]
    if len(set(indices)) != len(indices):
        raise RuntimeError(f"Two processes produced the same image index: {sorted(indices)}.")
    return [value for _, value in gathered]
