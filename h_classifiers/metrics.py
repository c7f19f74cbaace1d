"""Targets and measures: a target distribution from the command line or code, the exact class counts and the classes
asked of each image, and the measures of a set of labelled images (class fractions, fairness discrepancy FD, valid and
hit rates) with the verdict on each configuration. The one definition of each, used by the evaluation, the commands,
the reproduction table and the toy report.

A labeller gives each image a class index, or -1 when it cannot label it. Class fractions are one-hot predictions
counted over the labelled images only; FD = || p_ref - p_measured ||_2 over those fractions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .preflight import TARGET_SUM_TOLERANCE


if TYPE_CHECKING:  # torch is imported where it is used: parsing and checking a target needs none (`preflight`)
    import torch


# A configuration meets its target when the fairness discrepancy FD of its images is at most this (`evaluate`'s
# verdict, and the FD target of the reproduction table, lab/reproduce/).
TARGET_FD = 0.03


# ----------------------------------------------------------------------------------------------------------------
# Targets and class assignment
# ----------------------------------------------------------------------------------------------------------------


def format_probabilities(values: Sequence[float]) -> str:
    """`[0.3, 0.7]`: each value with `:g` (no float32 noise such as 0.6000000238418579 in messages)."""
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _target_numbers(target: str | Sequence[float], argument: str, accepted: str) -> list[float] | None:
    """The numbers of a target given as numbers; None for a word ('uniform' or a class name)."""
    if not isinstance(target, str):
        return [float(v) for v in target]
    text = target.strip()
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        if "," in text or text.lstrip("+-").replace(".", "", 1).isdigit():
            raise ValueError(f"`{argument}` {target!r} is not valid; accepted: {accepted}.") from None
        return None


def _check_probabilities(values: list[float], argument: str, accepted: str) -> None:
    """Non-negative and summing to 1 (within the pipeline's `TARGET_SUM_TOLERANCE`)."""
    shown = format_probabilities(values)
    if any(math.isnan(v) or v < 0 for v in values):
        raise ValueError(
            f"`{argument}` {shown}: probabilities must be non-negative numbers (no NaN); accepted: {accepted}."
        )
    if abs(sum(values) - 1.0) > TARGET_SUM_TOLERANCE:
        raise ValueError(f"`{argument}` {shown} sums to {sum(values):.4g}, not 1; accepted: {accepted}.")


def _accepted_targets(class_names: Sequence[str] | None) -> str:
    if class_names is None:
        return "comma-separated probabilities summing to 1 (one per class), 'uniform', or one class name"
    names = list(class_names)
    return (
        f"{len(names)} comma-separated probabilities summing to 1 (one per class of {names}), 'uniform', "
        "or one class name"
    )


def check_target_values(target: str | Sequence[float], argument: str = "target") -> None:
    """What can be checked of a target before its classes are known: given as numbers, they must be non-negative and
    sum to 1 (a word, 'uniform' or a class name, waits for the class names). Raises a ValueError naming `argument`."""
    accepted = _accepted_targets(None)
    values = _target_numbers(target, argument, accepted)
    if values is not None:
        _check_probabilities(values, argument, accepted)


def parse_target(target: str | Sequence[float], class_names: Sequence[str], argument: str = "target") -> list[float]:
    """
    A target distribution over `class_names` from a K-vector, a comma-separated string of K numbers ("0.3,0.7"),
    `"uniform"`, or a class name (one-hot). Raises a ValueError naming `argument` and what is accepted.
    """
    names = list(class_names)
    accepted = _accepted_targets(names)
    if isinstance(target, str) and target.strip() == "uniform":
        return [1.0 / len(names)] * len(names)
    if isinstance(target, str) and target.strip() in names:
        return [1.0 if name == target.strip() else 0.0 for name in names]
    values = _target_numbers(target, argument, accepted)
    if values is None:
        raise ValueError(f"`{argument}` {target!r} is not valid; accepted: {accepted}.")
    if len(values) != len(names):
        raise ValueError(
            f"`{argument}` has {len(values)} values but there are {len(names)} classes; accepted: {accepted}."
        )
    _check_probabilities(values, argument, accepted)
    return values


def class_counts(target: Sequence[float], n: int) -> list[int]:
    """How many of `n` images each class gets: largest-remainder rounding of `n * target` (sums to n), the same
    apportionment distribution guidance uses."""
    from pipeline_balancing_act import largest_remainder

    return largest_remainder(target, n).tolist()


def asked_classes(target: Sequence[float], n: int) -> list[int]:
    """
    A deterministic class per image whose counts match `target` (`class_counts`), interleaved so that any run of
    consecutive images (a batch) also follows the target closely.
    """
    slots = []
    for k, count in enumerate(class_counts(target, n)):
        slots += [((j + 0.5) / count, k) for j in range(count)]
    return [k for _, k in sorted(slots)]


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def class_fractions(
    labels: torch.Tensor | Sequence[int], num_classes: int, keep: torch.Tensor | Sequence[bool] | None = None
) -> list[float] | None:
    """One-hot class fractions over the labelled images (label >= 0), or over the images `keep` marks (and labelled);
    None when there is none. The one definition the evaluation, the reproduction table and the toy report use."""
    import torch

    labels = torch.as_tensor(labels).long().flatten()
    counted = labels >= 0
    if keep is not None:
        counted &= torch.as_tensor(keep).bool().flatten()
    if not bool(counted.any()):
        return None
    counts = torch.bincount(labels[counted], minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"A label is out of range for {num_classes} classes: {int(labels[counted].max())}.")
    return (counts.double() / int(counted.sum())).tolist()


def fairness_discrepancy(p_ref: Sequence[float], p_measured: Sequence[float]) -> float:
    """FD = || p_ref - p_measured ||_2."""
    p_ref, p_measured = [float(p) for p in p_ref], [float(p) for p in p_measured]
    if len(p_ref) != len(p_measured):
        raise ValueError(f"`p_ref` has {len(p_ref)} classes but `p_measured` has {len(p_measured)}.")
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(p_ref, p_measured)))


def hit_rates(
    labels: torch.Tensor | Sequence[int], asked: torch.Tensor | Sequence[int]
) -> tuple[float | None, float | None]:
    """(hit rate over the labelled images, strict hit rate over all images: an unlabelled image is a miss) of the
    classes `asked` of each image; None where there is no image to count."""
    import torch

    labels = torch.as_tensor(labels).long().flatten()
    asked = torch.as_tensor(list(asked) if not isinstance(asked, torch.Tensor) else asked).long().flatten()
    if asked.shape != labels.shape:
        raise ValueError(f"`asked` has {asked.numel()} classes for {labels.numel()} images.")
    valid = labels >= 0
    hits, num_valid, n = int(((labels == asked) & valid).sum()), int(valid.sum()), labels.numel()
    return (hits / num_valid if num_valid else None, hits / n if n else None)


def summarize_labels(
    labels: torch.Tensor,
    target: Sequence[float],
    asked: Sequence[int] | None = None,
    blacked_out: Sequence[int] | None = None,
) -> dict[str, Any]:
    """
    Counts, fractions (over labelled images), FD to `target`, valid rate, and, when `asked` classes are given, the
    hit rate (labelled images of the asked class / labelled images) and the strict hit rate (invalid = miss).
    `blacked_out`: the indices of the images a safety checker replaced with black (None: no safety checker ran);
    they count as unlabelled, whatever the labeller read in a black image, and their number is reported.
    """
    import torch

    labels = torch.as_tensor(labels).long().flatten().clone()
    if blacked_out:
        labels[torch.as_tensor(list(blacked_out)).long()] = -1
    num_classes = len(target)
    valid = labels >= 0
    n, num_valid = labels.numel(), int(valid.sum())
    fractions = class_fractions(labels, num_classes)
    summary = {
        "num_images": n,
        "num_valid": num_valid,
        "valid_rate": num_valid / n if n else None,
        "counts": torch.bincount(labels[valid], minlength=num_classes).tolist(),
        "fractions": fractions,
        "fd": fairness_discrepancy(target, fractions) if fractions is not None else None,
    }
    if blacked_out is not None:
        summary["num_blacked_out"] = len(blacked_out)
    if asked is not None:
        summary["hit_rate"], summary["hit_rate_strict"] = hit_rates(labels, asked)
    return summary


def target_verdicts(results: dict[str, dict[str, Any]], threshold: float = TARGET_FD) -> dict[str, Any]:
    """Per configuration whether it met the target (FD <= `threshold`; None: no labelled image, not measured), and
    the configuration that came closest (lowest FD, the first of equals; None when none was measured)."""
    met = {name: None if s.get("fd") is None else bool(s["fd"] <= threshold) for name, s in results.items()}
    measured = [(s["fd"], i, name) for i, (name, s) in enumerate(results.items()) if s.get("fd") is not None]
    return {"threshold_fd": threshold, "met": met, "closest": min(measured)[2] if measured else None}
