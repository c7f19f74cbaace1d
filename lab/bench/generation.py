"""Part 1, generation: every arm warmed up, one untimed call per arm counting its host-device synchronisations, then
timed rounds in alternating order; medians, guided / vanilla ratios of wall time and peak memory, the guidance step's
time and the synchronisations a guided step adds."""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch

from lab.bench.arms import GenerationScale, build_scale, run_arm, scale_rounds, toy_model_missing
from lab.bench.config import BenchConfig
from lab.bench.measuring import GuidanceStepTimer, PeakMemory, _log, alternating_order, ratio, run_worker, timed


def generation_memory_worker(config: BenchConfig, scale_name: str, arm: str) -> dict[str, Any]:
    scale = build_scale(config, scale_name)
    with PeakMemory(config.device) as memory:
        wall = timed(lambda: run_arm(scale, arm, config), config.device)
    return {**memory.as_dict(), "wall_s": wall, "build_s": scale.build_s}


def step_summary(samples_ms: list[float], rows: int) -> dict[str, Any]:
    if not samples_ms:
        return {"available": False, "reason": "no UNet call reached the first up block"}
    return {
        "available": True,
        "rows": rows,
        "calls": len(samples_ms),
        "ms_median": statistics.median(samples_ms),
        "ms_min": min(samples_ms),
    }


def classifier_on_device(scale: GenerationScale, config: BenchConfig) -> Any:
    from pipeline_balancing_act import HClassifier

    classifier = scale.classifier
    if isinstance(classifier, str):
        classifier = HClassifier.from_pretrained(classifier)
    return copy.deepcopy(classifier).to(config.device).eval()


def count_host_syncs(scale: GenerationScale, arm: str, config: BenchConfig) -> dict[str, Any]:
    """Host-device synchronisations of one call of `arm`, counted two ways around the whole call:

    - `counter`: the tensor operations that would make the host wait for a GPU (`host_syncs.HostSyncCounter`, a
      TorchFunctionMode: works on any device, so also on a CPU run), with `events` per operation name;
    - `cuda_sync_debug`: on CUDA, the synchronisations torch itself reports (`torch.cuda.set_sync_debug_mode`).

    Both include the UNet's and the scheduler's own operations; the difference to the vanilla arm isolates guidance,
    but also holds what a guided call does once, before its loop. `in_step` counts only inside the guided call's
    steps (its h function and its step end, `_GuidanceRun.on_h` / `end_step`): what the loop itself waits for.
    """
    import warnings
    from collections import Counter

    import pipeline_balancing_act as pba
    from h_classifiers.host_syncs import HostSyncCounter

    in_step: list[str] = []

    def counted(method):
        def wrapper(*args, **kwargs):
            with HostSyncCounter() as step_counter:
                result = method(*args, **kwargs)
            in_step.extend(step_counter.events)
            return result

        return wrapper

    originals = {name: getattr(pba._GuidanceRun, name) for name in ("on_h", "end_step")}
    cuda = config.device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncCounter() as counter:
                for name, method in originals.items():
                    setattr(pba._GuidanceRun, name, counted(method))
                run_arm(scale, arm, config)
        finally:
            for name, method in originals.items():
                setattr(pba._GuidanceRun, name, method)
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return {
        "counter": counter.count,
        "events": dict(Counter(counter.events).most_common()),
        "in_step": len(in_step) if arm != "vanilla" else None,
        "in_step_events": dict(Counter(in_step).most_common()),
        "cuda_sync_debug": sum("synchroniz" in str(w.message) for w in caught) if cuda else None,
    }


def syncs_per_guided_step(guided: dict[str, Any], vanilla: dict[str, Any], guided_steps: int) -> dict[str, Any]:
    """(guided - vanilla) synchronisations per call / guided steps per call, for each way of counting, and the
    synchronisations inside the guided steps per guided step (`in_step`)."""
    added = {
        key: None
        if guided.get(key) is None or vanilla.get(key) is None
        else (guided[key] - vanilla[key]) / guided_steps
        for key in ("counter", "cuda_sync_debug")
    }
    added["in_step"] = None if guided.get("in_step") is None else guided["in_step"] / guided_steps
    return added


def memory_mode(config: BenchConfig, scale_name: str) -> str:
    if config.device.startswith("cuda"):
        return "inprocess"
    if config.memory != "auto":
        return config.memory
    # A fresh worker at full SD1.5 (or google/ddpm-celebahq-256) size costs one more minute-long UNet call per arm on
    # a 2-core CPU.
    return "inprocess" if (scale_name in ("sd15", "celebahq") and not config.quick) else "subprocess"


def bench_generation_scale(config: BenchConfig, scale_name: str) -> dict[str, Any]:
    scale = build_scale(config, scale_name)
    rounds, warmup = scale_rounds(config, scale_name)
    arm_names, guided_arms = list(scale.arms), list(scale.arms[1:])
    # Warm-up: every arm untimed first (first-call costs: the classifier's loading and caching, allocator pools,
    # kernel choices), so that no arm is timed from cold.
    warmup_order = alternating_order(arm_names, warmup)
    for round_order in warmup_order:
        for arm in round_order:
            run_arm(scale, arm, config)
    # One more untimed call per arm counts its host-device synchronisations (a warm call, outside the timed rounds:
    # the counting slows every torch call down).
    syncs = {arm: count_host_syncs(scale, arm, config) for arm in arm_names}
    walls: dict[str, list[float]] = {arm: [] for arm in arm_names}
    peaks: dict[str, list[dict]] = {arm: [] for arm in arm_names}
    hook_ms: dict[str, list[float]] = {arm: [] for arm in arm_names}
    order = alternating_order(arm_names, rounds)
    rows = scale.num_images * (2 if scale.guidance_scale > 1 else 1)
    # Both pipelines share the UNet: the step timer sees every arm alike (two timestamps per UNet call).
    with GuidanceStepTimer(scale.stock.unet, config.device) as step_timer:
        for round_order in order:
            for arm in round_order:
                with PeakMemory(config.device) as memory:
                    walls[arm].append(timed(lambda: run_arm(scale, arm, config), config.device))
                peaks[arm].append(memory.as_dict())
                hook_ms[arm] += step_timer.collect()
        on_device: dict[str, dict[str, Any]] = {}
        if config.device.startswith("cuda"):
            # What moving the classifier to the UNet's device before the call would save (one untimed call each).
            classifier = classifier_on_device(scale, config)
            for arm in guided_arms:
                timed(lambda: run_arm(scale, arm, config, classifier), config.device)
                on_device[arm] = step_summary(step_timer.collect(), rows)

    mode = memory_mode(config, scale_name)
    arms: dict[str, Any] = {}
    for arm in arm_names:
        median = statistics.median(walls[arm])
        inprocess = max(peaks[arm], key=lambda m: m["peak_bytes"])
        arms[arm] = {
            "wall_s": walls[arm],
            "median_s": median,
            "s_per_step": median / scale.steps,
            "s_per_image": median / scale.num_images,
            "inprocess_memory": inprocess,
            "inprocess_memory_per_run": peaks[arm],
        }
        if mode == "subprocess":
            arms[arm]["memory"] = dict(run_worker({"kind": "generation", "scale": scale_name, "arm": arm}, config))
            arms[arm]["memory"]["measured_in"] = "fresh worker process, one call"
        else:
            arms[arm]["memory"] = dict(inprocess, measured_in="this process, max over the timed runs")
        arms[arm]["host_syncs_per_call"] = syncs[arm]
        arms[arm]["guidance_step"] = step_summary(hook_ms[arm], rows)
        if arm in on_device:
            arms[arm]["guidance_step_classifier_on_device"] = on_device[arm]

    # The pipeline's default `guidance_steps=(0.0, 1.0)` guides every denoising step.
    guided_steps = scale.steps
    vanilla = arms["vanilla"]
    ratios = {}
    for arm in guided_arms:
        step, vanilla_step = arms[arm]["guidance_step"], vanilla["guidance_step"]
        estimate = None
        if step.get("available") and vanilla_step.get("available"):
            # The UNet is called once per step (classifier-free guidance batches both branches).
            estimate = 1 + ((step["ms_median"] - vanilla_step["ms_median"]) / 1000) / vanilla["s_per_step"]
        ratios[arm] = {
            "wall": ratio(arms[arm]["median_s"], vanilla["median_s"]),
            "peak_memory": ratio(arms[arm]["memory"]["peak_bytes"], vanilla["memory"]["peak_bytes"]),
            "peak_increment": ratio(arms[arm]["memory"]["increment_bytes"], vanilla["memory"]["increment_bytes"]),
            "wall_from_guidance_step": estimate,
            "syncs_per_guided_step": syncs_per_guided_step(syncs[arm], syncs["vanilla"], guided_steps),
        }
    return {
        "num_images": scale.num_images,
        "unet_rows": rows,
        "steps": scale.steps,
        "guidance_scale": scale.guidance_scale,
        "h_shape": scale.h_shape,
        "dtype": config.dtype,
        "arm_names": arm_names,
        "classifier": scale.classifier_info,
        "guided_steps_per_call": guided_steps,
        "warmup_rounds": warmup,
        "warmup_order": warmup_order,
        "rounds": rounds,
        "order": order,
        "memory_mode": mode,
        "build_s": scale.build_s,
        "notes": scale.notes,
        "arms": arms,
        "ratios": ratios,
    }


def bench_generation(config: BenchConfig) -> dict[str, Any]:
    results = {}
    for name in config.scales:
        missing = toy_model_missing(config) if name == "toy" else None
        results[name] = {"skipped": missing} if missing else bench_generation_scale(config, name)
        _log(f"generation {name}: {'skipped' if missing else 'done'}")
    return results
