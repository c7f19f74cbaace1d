"""The targets judged on a run's figures: a target is judged only on a figure of at least `MIN_TIMED_ROUNDS` timed
rounds, at the sizes it is set for; any other is reported as "not judged"."""

from __future__ import annotations

from typing import Any

from lab.bench.config import (
    MIN_TIMED_ROUNDS,
    TARGET_CPU_SD15_WALL_RATIO,
    TARGET_EXTRACTION_SPEEDUP,
    TARGET_GPU_SD15_BATCH,
    TARGET_GPU_SD15_DTYPE,
    TARGET_GPU_SD15_MEMORY_RATIO,
    TARGET_GPU_SD15_WALL_RATIO,
    TARGET_GPU_TOY_WALL_RATIO,
    TARGET_TRAINING_SLICES,
)


def generation_limits(device: str, scale: str) -> dict[str, float]:
    """The guided / vanilla limits of one scale on one device type (an empty dict: no target there)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return {
        ("cuda", "sd15"): {"wall": TARGET_GPU_SD15_WALL_RATIO, "peak_memory": TARGET_GPU_SD15_MEMORY_RATIO},
        ("cuda", "toy"): {"wall": TARGET_GPU_TOY_WALL_RATIO},
        ("cpu", "sd15"): {"wall": TARGET_CPU_SD15_WALL_RATIO},
    }.get((kind, scale), {})


def why_not_judged(rounds: int | None, config: dict[str, Any], scale: str | None = None, data: dict | None = None):
    """Why a target is not judged on this run, or None when it is: too few timed rounds, the --quick sizes, or (on
    CUDA at SD1.5 shapes) another batch or dtype than the target's."""
    if rounds is not None and rounds < MIN_TIMED_ROUNDS:
        return f"not judged ({rounds} rounds < {MIN_TIMED_ROUNDS})"
    if config.get("quick"):
        return "not judged (--quick sizes)"
    if scale == "sd15" and data is not None and config["device"].startswith("cuda"):
        batch, cfg = data["num_images"], data["guidance_scale"] > 1
        if batch != TARGET_GPU_SD15_BATCH or not cfg or data["dtype"] != TARGET_GPU_SD15_DTYPE:
            return (
                f"not judged (batch {batch}{' + CFG' if cfg else ''}, {data['dtype']}; the target is set for batch "
                f"{TARGET_GPU_SD15_BATCH} + CFG, {TARGET_GPU_SD15_DTYPE})"
            )
    return None


def _target(name: str, value: float | None, limit: float, at_most: bool, reason: str | None) -> dict[str, Any]:
    met = None
    if value is not None and reason is None:
        met = value <= limit if at_most else value >= limit
    verdict = reason or ("-" if met is None else ("yes" if met else "no"))
    return {
        "name": name,
        "value": value,
        "limit": f"{'<=' if at_most else '>='} {limit}",
        "met": met,
        "judged": reason is None and met is not None,
        "verdict": verdict,
    }


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value; `met` is None (and `verdict` says why) where it is not judged."""
    config = results["config"]
    targets = []
    for scale, data in results.get("generation", {}).items():
        if "ratios" not in data:
            continue
        limits = generation_limits(config["device"], scale)
        reason = why_not_judged(data["rounds"], config, scale, data)
        for arm, values in data["ratios"].items():
            for key, limit in limits.items():
                name = f"generation {scale} {arm}: guided/vanilla {key.replace('_', ' ')}"
                targets.append(_target(name, values[key], limit, True, reason))
    extraction = results.get("extraction", {})
    if extraction.get("speedup") is not None:
        largest, smallest = extraction["speedup_of"]
        name = f"extraction: images/s at batch {largest} / batch {smallest}"
        reason = why_not_judged(len(extraction["order"]), config)
        targets.append(_target(name, extraction["speedup"], TARGET_EXTRACTION_SPEEDUP, False, reason))
    training = results.get("training", {})
    if training.get("increment_over_slice_plus_model") is not None:
        whole = training["feature_set_bytes_nominal"] / (training["slice_bytes"] + training["model_bytes"])
        target = _target(
            "training: peak memory increment / (one timestep slice + model)",
            training["increment_over_slice_plus_model"],
            TARGET_TRAINING_SLICES,
            True,
            why_not_judged(None, config),  # a memory figure of one run, not a timing: no rounds
        )
        target["limit"] += f" (the whole feature set is {whole:.0f})"
        targets.append(target)
    return targets
