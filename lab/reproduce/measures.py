"""What a job's readings measure against its row's target and vanilla's: fractions over the valid images, FD, the
valid rate, hit rates, entanglement; the targets each row checks; and the merge of a table's job files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from h_classifiers.metrics import TARGET_FD, class_counts, class_fractions, fairness_discrepancy, hit_rates
from h_classifiers.toy_world import ATTRIBUTES
from lab.reproduce.jobs import Job
from lab.reproduce.rows import TARGET_ENTANGLEMENT, TARGET_HIT, TARGET_JOB_FD, TARGET_VALID_DROP, Row


def fractions(labels: Any, valid: torch.Tensor, num_classes: int) -> list[float]:
    """`metrics.class_fractions` over the valid images; zeros when there is none."""
    return class_fractions(labels, num_classes, valid) or [0.0] * num_classes


def joint_cells(row: Row, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each image's class of the row's attribute, or for a joint row its cell of the attributes' classes (row-major,
    as the target table flattens)."""
    cells = torch.zeros(len(labels[row.attributes[0]]), dtype=torch.long)
    for a in row.attributes:
        cells = cells * len(ATTRIBUTES[a]) + labels[a].long()
    return cells


def measure(result: dict[str, Any], row: Row, vanilla: dict[str, Any]) -> dict[str, Any]:
    """Fractions, FD, valid rate, hit rates and entanglement of one job against its row's target and vanilla."""
    valid = torch.tensor(result["valid"]).bool()
    labels = {a: torch.tensor(v) for a, v in result["labels"].items()}
    van_valid = torch.tensor(vanilla["valid"]).bool()
    valid_rate = float(valid.float().mean()) if len(valid) else 0.0  # selection may keep no image
    summary = {"valid_rate": valid_rate, "num_images": len(valid), "fractions": {}}
    for a in ATTRIBUTES:
        summary["fractions"][a] = fractions(labels[a], valid, len(ATTRIBUTES[a]))
    if len(row.attributes) == 1:
        summary["fd"] = fairness_discrepancy(list(row.target), summary["fractions"][row.attributes[0]])
    elif row.marginal:  # one target per attribute: each attribute's FD, and the row's is the largest
        per_attribute = {
            a: fairness_discrepancy(list(t), summary["fractions"][a]) for a, t in zip(row.attributes, row.target)
        }
        summary["fd_per_attribute"] = per_attribute
        summary["fd"] = max(per_attribute.values())
    else:
        # A joint row: one "class" per cell of the attributes' classes.
        target = torch.tensor(row.target, dtype=torch.float64).flatten().tolist()
        measured = fractions(joint_cells(row, labels), valid, len(target))
        summary["cell_fractions"] = measured
        summary["fd"] = fairness_discrepancy(target, measured)
    if result.get("asked") is not None:
        # The asked class of the row's attribute; an invalid image is a miss in the strict rate.
        asked_labels = torch.where(valid, labels[row.attributes[0]], -1)
        hit_valid, hit_strict = hit_rates(asked_labels, result["asked"])
        summary["hit_strict"], summary["hit_valid"] = hit_strict, hit_valid or 0.0
    entanglement = {}
    for a in ATTRIBUTES:
        if a not in row.attributes:
            base = torch.tensor(fractions(torch.tensor(vanilla["labels"][a]), van_valid, len(ATTRIBUTES[a])))
            entanglement[a] = float((torch.tensor(summary["fractions"][a]) - base).abs().max())
    summary["entanglement"] = entanglement
    summary["entanglement_max"] = max(entanglement.values()) if entanglement else None
    if "balance_state_counts" in result:
        # The counts distribution guidance aims at: the pipeline's largest-remainder apportionment (sums to n).
        target_counts = class_counts(row.target, result["num_images"])
        summary["balance_state_counts"] = result["balance_state_counts"]
        summary["oracle_counts"] = torch.bincount(labels[row.attributes[0]][valid], minlength=len(row.target)).tolist()
        summary["target_counts"] = target_counts
    if "selection" in result:  # what keeping images to the target cost (`select_from_pool`)
        summary["selection"] = result["selection"]
    return summary


def check_targets(row: Row, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The project's targets for one row: value, threshold and whether it is met (None: not applicable)."""
    vanilla, default = measured["vanilla"], measured.get("distribution")
    checks: dict[str, Any] = {}
    if default is not None:
        fd_target = TARGET_JOB_FD if row.balance_state else TARGET_FD
        checks["distribution FD"] = (default["fd"], fd_target, default["fd"] <= fd_target)
        drop = vanilla["valid_rate"] - default["valid_rate"]
        checks["valid drop (points)"] = (100 * drop, 100 * TARGET_VALID_DROP, drop <= TARGET_VALID_DROP)
        if default["entanglement_max"] is not None:
            e = default["entanglement_max"]
            checks["entanglement (points)"] = (100 * e, 100 * TARGET_ENTANGLEMENT, e <= TARGET_ENTANGLEMENT)
        image_space = measured.get("image_guidance")
        if image_space is not None:  # lower FD than image-space guidance (its cost: docs/lab/benchmark.md)
            shown = (default["fd"], image_space["fd"])
            checks["beats image-space guidance"] = (shown, None, default["fd"] < image_space["fd"])
        peer = measured.get("fair_diffusion")
        if peer is not None:
            # Lower FD at no lower valid rate: both are shown (FDs, then valid rates).
            better = default["fd"] < peer["fd"] and default["valid_rate"] >= peer["valid_rate"]
            shown = (default["fd"], peer["fd"], default["valid_rate"], peer["valid_rate"])
            checks["beats Fair Diffusion"] = (shown, None, better)
    sample = measured.get("sample")
    if sample is not None:
        checks["sample strict hit"] = (sample["hit_strict"], TARGET_HIT, sample["hit_strict"] >= TARGET_HIT)
    return checks


def merge(rows: list[Row], by_row: dict[str, dict[str, Job]], jobs_dir: Path) -> dict[str, Any]:
    results = {}
    for row in rows:
        loaded = {c: json.loads((jobs_dir / f"{job.key}.json").read_text()) for c, job in by_row[row.name].items()}
        measured = {c: measure(result, row, loaded["vanilla"]) for c, result in loaded.items()}
        results[row.name] = {
            "title": row.title,
            "attributes": list(row.attributes),
            "target": row.target,
            "sampler": row.sampler.label,
            "classifiers": row.classifiers,
            "batch_size": row.batch_size,
            "balance_state": row.balance_state,
            "configurations": measured,
            "targets": check_targets(row, measured),
        }
    return results
