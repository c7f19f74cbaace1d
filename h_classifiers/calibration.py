"""What guidance needs of a trained head besides its weights: a calibration and class anchors.

- `fit_calibration`: temperature scaling with per-class offsets (`calibrated = logits * scale + bias`), fitted on the
  held-out images by maximum likelihood, so that softmax(calibrated logits) estimates the probability of each class
  of the image that will come out. Balanced training (the default) shifts the heads' biases away from the data's
  class frequencies; the offsets put them back, so the mean calibrated probability over a batch estimates the
  batch's class fractions.
- `class_anchors`: the points in h guidance moves between: the class means of the training images, spread around
  their centroid by a factor that depends on how well the classes separate (see `ANCHOR_SEPARATION`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Working-memory unit: rows per block so that a float32 block holds about this many values (16 MB).
BLOCK_ELEMENTS = 4 * 2**20
# Weak Gaussian priors on log(scale) and the offsets: a perfectly separated held-out split would otherwise drive the
# scale to infinity.
PRIOR_PRECISION = 1e-3
# The anchors are the class means spread around their centroid by sqrt(ANCHOR_SEPARATION / d), where d is the mean
# separation of two classes' means in within-class standard deviations (along the line through them). A step in plain
# class gaps is too weak for an attribute that is subtle in h (overlapping classes, small d: on the toy world,
# glasses) and a step in plain standard deviations too strong for it (pushed past the data, h makes the attribute's
# features out of nothing); the square root is the compromise measured on the toy world's tuning seeds
# (docs/guidance.md). For d = ANCHOR_SEPARATION the anchors are the class means.
ANCHOR_SEPARATION = 4.0


def block_rows(dim: int) -> int:
    """Rows per block so that a float32 block of `dim` features holds about BLOCK_ELEMENTS values."""
    return max(1, BLOCK_ELEMENTS // dim)


def class_means(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of x[rows] ([N, D], any float dtype), float64 accumulators, a block at a time. A class absent
    from `rows` gets the mean of all rows. Returns float32 [K, D]."""
    dim = x.shape[1]
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    block = block_rows(dim)
    for i in range(0, len(rows), block):
        idx = rows[i : i + block]
        sums.index_add_(0, y[idx], x[idx].to(torch.float64))
    counts = torch.bincount(y[rows], minlength=num_classes).to(torch.float64)
    overall = sums.sum(0) / counts.sum().clamp_min(1)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], overall)
    return means.float()


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """
    `(scale, bias)` minimising the negative log-likelihood of `labels` under softmax(logits * scale + bias) (plus a
    weak prior). Without labelled rows, or with one class only, the identity `(1.0, [0, ..., 0])`.
    """
    num_classes = logits.shape[1]
    labels = labels.long()
    if labels.numel() == 0 or labels.unique().numel() < 2:
        return 1.0, [0.0] * num_classes
    logits = logits.detach().double()
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        nll = F.cross_entropy(logits * log_scale.exp() + bias, labels)
        loss = nll + PRIOR_PRECISION * (log_scale**2 + (bias**2).sum()) / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    scale = float(log_scale.detach().exp())
    if not math.isfinite(scale) or not bool(torch.isfinite(bias).all()):
        return 1.0, [0.0] * num_classes
    return scale, bias.detach().tolist()


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, scale: float, bias: list[float]) -> dict:
    """Held-out negative log-likelihood before and after calibration, and how far the mean calibrated probability is
    from the true class fractions (L1): what distribution guidance relies on."""
    if labels.numel() == 0:
        return {"nll_raw": float("nan"), "nll_calibrated": float("nan"), "fraction_error": float("nan")}
    logits, labels = logits.double(), labels.long()
    calibrated = logits * scale + torch.tensor(bias, dtype=torch.float64)
    fractions = torch.bincount(labels, minlength=logits.shape[1]).double() / labels.numel()
    return {
        "nll_raw": float(F.cross_entropy(logits, labels)),
        "nll_calibrated": float(F.cross_entropy(calibrated, labels)),
        "fraction_error": float((torch.softmax(calibrated, 1).mean(0) - fractions).abs().sum()),
    }


def class_separation(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, means: torch.Tensor) -> float:
    """Mean over the pairs of classes present of |mu_a - mu_b| / (within-class standard deviation along mu_b - mu_a,
    averaged over the two classes), on x[rows]."""
    y_rows = y[rows]
    present = [k for k in range(means.shape[0]) if bool((y_rows == k).any())]
    separations = []
    block = block_rows(x.shape[1])
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            direction = (means[b] - means[a]).double()
            gap = float(direction.norm())
            if gap == 0:
                continue
            unit = direction / gap
            spreads = []
            for k in (a, b):
                members = rows[y_rows == k]
                projection = torch.cat(
                    [x[members[j : j + block]].double() @ unit for j in range(0, len(members), block)]
                )
                spreads.append(float(projection.std()) if len(projection) > 1 else 0.0)
            spread = sum(spreads) / 2
            if spread > 0:
                separations.append(gap / spread)
    return sum(separations) / len(separations) if separations else ANCHOR_SEPARATION


def class_anchors(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The anchors of one head: the class means of x[rows], spread around their centroid (see ANCHOR_SEPARATION)."""
    means = class_means(x, y, rows, num_classes)
    centroid = means.mean(0)
    factor = math.sqrt(ANCHOR_SEPARATION / class_separation(x, y, rows, means))
    return centroid + (means - centroid) * factor
