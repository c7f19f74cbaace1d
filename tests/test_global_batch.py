"""`global_batch=True`: distribution guidance over the batches of several processes (torch.distributed, gloo).

Two processes started here with `torch.multiprocessing` (spawn) and `init_process_group("gloo")` on a file store
(their sockets on the loopback interface only) each run the tiny in-process pipeline on their share of the images; the
moved h must be that of one process guiding all the images in one batch.
"""

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import HRecorder, tiny_classifier, tiny_components

import h_classifiers
import pipeline_balancing_act as pba
from pipeline_balancing_act import BalanceState, BalancingActPipeline


ROOT = Path(__file__).resolve().parent.parent
JOIN_TIMEOUT_S = 240  # for the spawned processes' whole run, far above what it takes on a busy 2-core machine
PROMPT = "a photo of a face"
STEPS = 3
# (name, images of process 0 and 1, guidance arguments); 1 x sum(rows) is the reference of each.
SCENARIOS = [
    ("assign", [2, 2], {"target_distribution": [0.25, 0.75]}),
    ("assign_unequal_rows_with_state", [3, 1], {"target_distribution": [0.5, 0.5], "balance_state": True}),
    ("kl", [2, 2], {"target_distribution": [0.25, 0.75], "distribution_solver": "kl", "guidance_strength": 40.0}),
]


def make_pipe() -> BalancingActPipeline:
    pipe = BalancingActPipeline(**tiny_components(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guided_run(pipe, indices: range, kwargs: dict, **extra) -> dict:
    """The conditional rows of h after guidance at each step, the output latents and the state's counts."""
    kwargs = dict(kwargs)
    state = BalanceState() if kwargs.pop("balance_state", False) else None
    with HRecorder(pipe.unet) as recorder:
        latents = pipe(
            [PROMPT] * len(indices),
            num_inference_steps=STEPS,
            generator=[torch.Generator().manual_seed(i) for i in indices],
            output_type="latent",
            h_classifier=tiny_classifier(),
            guidance_mode="distribution",
            balance_state=state,
            **kwargs,
            **extra,
        ).images
    n = len(indices)
    return {
        "h": [h[n:] for h in recorder.after],  # rows [uncond; cond]: the images are the conditional rows
        "latents": latents,
        "counts": None if state is None else [c.tolist() for c in state.counts],
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        pipe = make_pipe()
        results = {}
        for name, rows, kwargs in SCENARIOS:
            start = sum(rows[:rank])
            results[name] = guided_run(pipe, range(start, start + rows[rank]), kwargs, global_batch=True)
        results["files"] = {"pipeline": pba.__file__, "h_classifiers": h_classifiers.__file__}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def start_and_join(worker, args: tuple, nprocs: int, timeout: float = JOIN_TIMEOUT_S) -> None:
    """`torch.multiprocessing.start_processes` (spawn) joined with a deadline: a process that hangs (a collective
    waiting for a peer that died, say) is killed and fails the test instead of hanging it; one that raises fails it
    with its error."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # False: some process still runs
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {nprocs} spawned processes did not finish within {timeout:g} s")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("global-batch")
    start_and_join(_worker, (str(root / "store"), str(root)), nprocs=2)
    return [torch.load(root / f"rank{r}.pt") for r in range(2)]


def test_the_spawned_processes_import_this_checkout(two_process_results):
    for result in two_process_results:
        assert Path(result["files"]["pipeline"]).resolve() == (ROOT / "pipeline_balancing_act.py").resolve()
        assert Path(result["files"]["h_classifiers"]).resolve() == (ROOT / "h_classifiers" / "__init__.py").resolve()


@pytest.mark.parametrize("name, rows, kwargs", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_two_processes_guide_like_one_process_with_the_whole_batch(two_process_results, name, rows, kwargs):
    pipe = make_pipe()
    reference = guided_run(pipe, range(sum(rows)), kwargs)
    parts = [result[name] for result in two_process_results]
    for step, expected in enumerate(reference["h"]):
        moved = torch.cat([part["h"][step] for part in parts])
        # Only the UNet's batch size differs (4 rows vs 2 + 2): float rounding, not a different move.
        torch.testing.assert_close(moved, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([p["latents"] for p in parts]), reference["latents"], atol=1e-4, rtol=1e-4)
    # The balance state counts every process's images and is the same on both.
    assert parts[0]["counts"] == parts[1]["counts"] == reference["counts"]
    if reference["counts"] is not None:
        assert sum(reference["counts"][0]) == sum(rows)
    # Each process guiding its own batch alone would move h elsewhere: the global batch is what made them equal.
    local = [guided_run(pipe, range(sum(rows[:r]), sum(rows[: r + 1])), kwargs) for r in range(2)]
    alone = torch.cat([part["h"][-1] for part in local])
    assert not torch.allclose(alone, reference["h"][-1], atol=1e-3)


def test_a_single_process_call_never_touches_torch_distributed(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was used by a single-process call")

    for name in ("is_initialized", "is_available", "get_backend", "get_rank", "get_world_size", "all_gather"):
        monkeypatch.setattr(dist, name, forbidden)
    result = guided_run(make_pipe(), range(2), {"target_distribution": [0.5, 0.5], "balance_state": True})
    assert sum(result["counts"][0]) == 2


def test_global_batch_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        guided_run(make_pipe(), range(2), {"target_distribution": [0.5, 0.5]}, global_batch=True)
    with pytest.raises(TypeError, match="`global_batch` must be True or False"):
        guided_run(make_pipe(), range(2), {"target_distribution": [0.5, 0.5]}, global_batch="yes")


def test_global_batch_without_a_mode_is_an_error(ba_pipe):
    with pytest.raises(ValueError, match="`global_batch` given without `guidance_mode`"):
        ba_pipe([PROMPT] * 2, num_inference_steps=2, global_batch=True)
