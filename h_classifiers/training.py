"""Train an h-classifier (`HClassifier`: one linear head per timestep) from extracted h shards.

Heads are trained one timestep at a time: only that timestep's slice (read with `HFeatureStore.load_timestep`) and the
model are in memory. Features are standardised with the training split's per-feature mean and standard deviation
during optimisation (better conditioned), and the standardisation is folded back into the head afterwards, so the
saved head applies to raw h exactly as the pipeline sees it. The held-out split is drawn once per image (stratified
by class, seeded), so the same images are held out at every timestep and rows of both CFG branches of one image stay
on the same side.

Pooled heads (`TrainingConfig.pool_size`, `HClassifier(pool_size=g)`: one classifier for every resolution of a model)
train on h average-pooled to g x g: a store extracted with `pool_size` g holds only that; a flat store's h is pooled
here, one timestep's slice at a time.

Outputs (written to a temporary directory next to `output_dir`, then renamed into place):
`config.json` + `diffusion_pytorch_model.safetensors` (`HClassifier.save_pretrained`), `README.md` (model card),
`metrics.json` (per timestep: held-out accuracy, balanced accuracy and per-class recall, train accuracy, and the
calibration's effect: held-out negative log-likelihood before and after, and the error of the mean calibrated
probability against the class fractions), `accuracy.png` (plot). The weights file holds float32, or float16 where
`TrainingConfig.storage_dtype` says so (by default for pooled heads, which an SDXL-sized h makes large); loading
gives float32 either way, and guidance computes in float32.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


if TYPE_CHECKING:
    from pipeline_balancing_act import HClassifier

from .calibration import block_rows, calibration_metrics, class_anchors, class_means, fit_calibration
from .feature_store import HFeatureStore
from .io_utils import atomic_directory, atomic_write_json, atomic_write_text, store_weights_as
from .model_card import PLOT_NAME, model_card, plot_metrics, public_model_name


logger = logging.getLogger(__name__)

BALANCE_MODES = ("loss", "sampling", "none")
# The weights file's float type, named as `extract --storage-dtype` names the store's; "auto": fp16 for pooled heads,
# fp32 for flat ones (flat classifiers are saved as they always were).
STORAGE_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16}
HEAD_TYPES = ("class_mean", "logistic")
METRICS_NAME = "metrics.json"


def _pipeline():
    """The pipeline module, imported on first use (it imports diffusers: `balancing-act train --help` stays fast)."""
    import pipeline_balancing_act

    return pipeline_balancing_act


@dataclass
class TrainingConfig:
    """Hyper-parameters of the per-timestep heads (defaults suit the toy world and SD-sized h alike)."""

    # "logistic": a free linear head per timestep trained by cross-entropy (the paper's). "class_mean": each class's
    # weight is the direction of its mean h from the mean of the class means, with one scale and K biases fitted by
    # cross-entropy (fewer parameters, less accurate for subtle attributes). Guidance reads either head (calibrated)
    # and moves h between the class anchors, which do not depend on the head type.
    head: str = "logistic"
    epochs: int = 40
    # Small data sets get more epochs: at least this many optimiser steps per head.
    min_steps: int = 300
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    holdout_fraction: float = 0.2
    balance: str = "loss"
    seed: int = 0
    temperature: float = field(default_factory=lambda: _pipeline().DEFAULT_TEMPERATURE)
    branches: list[str] | None = None
    device: str = "cpu"
    # None: heads like the store's h (flat, or pooled for a store extracted with a pool size). g: heads reading h
    # average-pooled to g x g, from a flat store of spatial h (pooled here) or a store pooled to g.
    pool_size: int | None = None
    # The weights file's float type (STORAGE_DTYPES): float16 halves a pooled SDXL classifier's file.
    storage_dtype: str = "auto"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "min_steps", "pool_size"):
            value = getattr(self, name)
            if (value is not None or name != "pool_size") and (type(value) is not int or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("learning_rate", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if (
            not isinstance(self.weight_decay, (int, float))
            or not math.isfinite(self.weight_decay)
            or self.weight_decay < 0
        ):
            raise ValueError(f"`weight_decay` must be a non-negative number, got {self.weight_decay!r}.")
        if not isinstance(self.holdout_fraction, (int, float)) or not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"`holdout_fraction` must be in [0, 1), got {self.holdout_fraction!r}.")
        if self.head not in HEAD_TYPES:
            raise ValueError(f"`head` must be one of {list(HEAD_TYPES)}, got {self.head!r}.")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"`balance` must be one of {list(BALANCE_MODES)}, got {self.balance!r}.")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"`storage_dtype` must be one of {list(STORAGE_DTYPES)}, got {self.storage_dtype!r}.")

    def stored_dtype(self, pooled: bool) -> torch.dtype:
        """The float type of the saved weights (`storage_dtype`, "auto" resolved for a pooled or flat classifier)."""
        if self.storage_dtype == "auto":
            return torch.float16 if pooled else torch.float32
        return STORAGE_DTYPES[self.storage_dtype]


@dataclass
class TrainingResult:
    classifier: HClassifier
    metrics: list[dict]
    summary: dict = field(default_factory=dict)
    output_dir: Path | None = None


# ----------------------------------------------------------------------------------------------------------------
# Split, balance, metrics
# ----------------------------------------------------------------------------------------------------------------


def stratified_holdout(labels: torch.Tensor, image_index: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Image indices held out: `fraction` of each class's images (at least one when the class has two or more)."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    for k in labels.unique().tolist():
        ids = image_index[labels == k]
        ids = ids[torch.randperm(len(ids), generator=generator)]
        n = int(round(fraction * len(ids)))
        if fraction > 0 and n == 0 and len(ids) >= 2:
            n = 1
        held.append(ids[:n])
    return torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (N / (K_present * n_k)); absent classes get 0."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = (counts > 0).sum().clamp_min(1)
    return torch.where(counts > 0, labels.numel() / (present * counts.clamp_min(1)), torch.zeros_like(counts))


def accuracy_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present) and per-class recall."""
    if labels.numel() == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "recall": [float("nan")] * num_classes}
    correct = predictions == labels
    recall = []
    for k in range(num_classes):
        mask = labels == k
        recall.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
    present = [r for r in recall if not math.isnan(r)]
    return {
        "accuracy": float(correct.float().mean()),
        "balanced_accuracy": sum(present) / len(present),
        "recall": recall,
    }


# ----------------------------------------------------------------------------------------------------------------
# One head
# ----------------------------------------------------------------------------------------------------------------


def _feature_stats(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of x[rows] (x [N, D], any float dtype), float64 accumulators, a block at a time."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    block = block_rows(x.shape[1])
    for i in range(0, len(rows), block):
        part = x[rows[i : i + block]].to(torch.float64)
        total += part.sum(0)
        total_sq += (part * part).sum(0)
    mean = total / max(len(rows), 1)
    var = (total_sq / max(len(rows), 1) - mean * mean).clamp_min(0)
    std = var.sqrt()
    # Near-constant features would get huge weights once the standardisation is folded back: floor their scale.
    floor = 1e-2 * float(std.median()) + 1e-6
    return mean.float(), std.clamp_min(floor).float()


def train_head(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    num_classes: int,
    config: TrainingConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trains one linear head on the rows `rows` of x [N, D] (kept in its storage dtype; only mini-batches are
    converted to float32, so no copy of the slice is made), labels y [N].

    Returns (weight [K, D], bias [K]) acting on raw features.
    """
    device = torch.device(config.device)
    mean, std = _feature_stats(x, rows)
    mean, std = mean.to(device), std.to(device)
    weight = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=config.learning_rate, weight_decay=config.weight_decay)
    y_rows = y[rows]
    loss_weights = class_weights(y_rows, num_classes).to(device) if config.balance == "loss" else None
    if config.balance == "sampling":
        sample_probs = class_weights(y_rows, num_classes)[y_rows]
    n = len(rows)
    epochs = max(config.epochs, math.ceil(config.min_steps / math.ceil(n / config.batch_size)))
    # Mini-batch buffers allocated once per head: a fresh gather and float32 copy per step cost about half the time
    # of training at Stable Diffusion's h size (docs/lab/bench).
    gathered = torch.empty(min(config.batch_size, n), x.shape[1], dtype=x.dtype, device=x.device)
    standardised = torch.empty(min(config.batch_size, n), x.shape[1], dtype=torch.float32, device=device)
    for _ in range(epochs):
        if config.balance == "sampling":
            order = torch.multinomial(sample_probs, n, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
        for i in range(0, n, config.batch_size):
            idx = rows[order[i : i + config.batch_size]]
            part = torch.index_select(x, 0, idx, out=gathered[: len(idx)])
            batch = standardised[: len(idx)].copy_(part).sub_(mean).div_(std)
            logits = F.linear(batch, weight, bias)
            loss = F.cross_entropy(logits, y[idx].to(device), weight=loss_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        raw_weight = weight / std
        raw_bias = bias - raw_weight @ mean
    return raw_weight.detach().cpu(), raw_bias.detach().cpu()


def train_class_mean_head(
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, num_classes: int, config: TrainingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-mean head on the rows `rows` of x [N, D]: W_k = a * (mu_k - mean_j mu_j), with the scale a and the K
    biases fitted by (class-balanced, unless `balance="none"`) cross-entropy. Classes absent from `rows` get a zero
    direction. Returns (weight [K, D], bias [K]) acting on raw features."""
    block = block_rows(x.shape[1])
    present = torch.bincount(y[rows], minlength=num_classes) > 0
    means = class_means(x, y, rows, num_classes)
    directions = torch.where(present[:, None], means - means[present].mean(0), torch.zeros_like(means))
    # Projections [n, K] are all the 1 + K parameters need.
    z = torch.cat([x[rows[i : i + block]].float() @ directions.T for i in range(0, len(rows), block)])
    z_scale = float(z.std()) or 1.0
    z = z / z_scale
    y_rows = y[rows]
    weights = class_weights(y_rows, num_classes) if config.balance != "none" else None
    scale = torch.ones((), requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([scale, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * z + bias, y_rows, weight=weights)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (scale / z_scale * directions).detach(), bias.detach().clone()


def _pooling(store: HFeatureStore, asked: int | None) -> tuple[int | None, list[int], int | None]:
    """(the classifier's pool size, its `h_shape`, the pool size to apply to the stored features or None) for a store
    and the pool size asked for (`TrainingConfig.pool_size`)."""
    stored = store.pool_size
    if stored is not None:
        if asked not in (None, stored):
            raise ValueError(
                f"`pool_size` {asked}: this store holds h already average-pooled to {stored}x{stored} (extracted with "
                f"pool size {stored}); train it with pool size {stored} or none, or extract flat h."
            )
        pooled_from = store.manifest.get("pooled_from")
        if not (isinstance(pooled_from, list) and len(pooled_from) == 3):
            raise ValueError(
                f"This store holds pooled h but no `pooled_from` (h's shape before pooling): {pooled_from!r}."
            )
        return stored, pooled_from, None
    shape = store.h_shape
    if asked is not None and (len(shape) != 3 or asked > min(shape[1:])):
        raise ValueError(
            f"`pool_size` {asked} needs stored h of shape [C, H, W] with H and W at least {asked}; this store's h "
            f"has shape {shape}."
        )
    return asked, shape, asked


def pool_features(features: torch.Tensor, pool_size: int) -> torch.Tensor:
    """h `[N, C, H, W]` (any float dtype) average-pooled to `[N, C, g, g]` in float32, a block of rows at a time."""
    block = block_rows(features[0].numel()) if len(features) else 1
    parts = [F.adaptive_avg_pool2d(features[i : i + block].float(), pool_size) for i in range(0, len(features), block)]
    return torch.cat(parts) if parts else features.new_zeros(0, features.shape[1], pool_size, pool_size).float()


@torch.no_grad()
def _predict(classifier: HClassifier, h: torch.Tensor, rows: torch.Tensor, timestep: float) -> torch.Tensor:
    """Raw logits [n, K] of h[rows] with the classifier's own forward (what guidance reads), a block at a time."""
    block = block_rows(h[0].numel())
    logits = [classifier(h[rows[i : i + block]], timestep) for i in range(0, len(rows), block)]
    return torch.cat(logits) if logits else torch.zeros(0, classifier.num_classes)


# ----------------------------------------------------------------------------------------------------------------
# The whole classifier
# ----------------------------------------------------------------------------------------------------------------


def train_classifier(
    features_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    config: TrainingConfig | None = None,
    attribute: str | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainingResult:
    """Trains an `HClassifier` from the shards in `features_dir`, one timestep at a time.

    Args:
        features_dir: an extraction output directory (`h_classifiers.extraction`).
        output_dir: where to save (`save_pretrained` layout + README.md model card + metrics.json + accuracy.png);
            None trains without saving. An existing `output_dir` is refused unless `overwrite=True`.
        config: `TrainingConfig` (epochs, learning rate, weight decay, balance mode, held-out fraction, seed, ...).
        attribute: the attribute name stored in the config (default: the manifest's). When the store holds several
            label sets (generation with several labellers), naming one of them trains on its labels.
        base_model: the base model recorded in the config and the card (default: the manifest's model); a Hub id is
            recorded as given, a local directory by its folder name only.
    """
    config = config or TrainingConfig()
    config.validate()
    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None and output_dir.exists() and not overwrite:
        raise FileExistsError(f"`output_dir` {str(output_dir)!r} already exists; pass `overwrite=True` to replace it.")
    store = HFeatureStore(features_dir)
    if (
        attribute is not None
        and attribute != store.label_set
        and attribute in (store.manifest.get("label_sets") or {})
    ):
        store = HFeatureStore(features_dir, label_set=attribute)  # one of several label sets of one generation
    # What the model card reports about the data: the selected label set.
    manifest = dict(store.manifest, class_names=store.class_names, label_source=store.label_source)
    class_names = store.class_names
    num_classes = len(class_names)
    attribute = attribute or manifest.get("attribute") or "attribute"
    base_model = public_model_name(base_model if base_model is not None else manifest.get("model"))
    branches = store._check_branches(config.branches)

    labels, image_index = store.labels(drop_unlabelled=True)
    if labels.numel() == 0:
        raise ValueError(f"`features_dir` {str(features_dir)!r} holds no labelled rows to train on.")
    present = torch.bincount(labels, minlength=num_classes)
    if (present == 0).any():
        missing = [class_names[k] for k in range(num_classes) if present[k] == 0]
        logger.warning("Classes %s have no labelled image: their heads only learn to be unlikely.", missing)
    holdout_ids = stratified_holdout(labels, image_index, config.holdout_fraction, config.seed)
    pool_size, h_shape, pool_here = _pooling(store, config.pool_size)

    classifier = _pipeline().HClassifier(
        attribute=attribute,
        class_names=class_names,
        h_shape=h_shape,
        pool_size=pool_size,
        timesteps=store.timesteps,
        temperature=float(config.temperature),
        base_model=base_model,
        site=store.site,
    )
    generator = torch.Generator().manual_seed(config.seed)
    metrics = []
    anchors, scales, offsets = [], [], []
    for step in tqdm(range(store.num_steps), desc="train heads", unit="step", disable=not progress):
        data = store.load_timestep(step, branches=branches)
        if pool_here is not None:  # the features the classifier reads: h of a flat store, pooled
            data.features = pool_features(data.features, pool_here)
        held = torch.isin(data.image_index, holdout_ids)
        train_rows, held_rows = (~held).nonzero().flatten(), held.nonzero().flatten()
        x = data.features.flatten(1)
        if config.head == "class_mean":
            weight, bias = train_class_mean_head(x, data.labels, train_rows, num_classes, config)
        else:
            weight, bias = train_head(x, data.labels, train_rows, num_classes, config, generator)
        with torch.no_grad():
            classifier.weight[step].copy_(weight)
            classifier.bias[step].copy_(bias)
        timestep = store.timesteps[step]
        anchors.append(class_anchors(x, data.labels, train_rows, num_classes))
        train_preds = _predict(classifier, data.features, train_rows, timestep).argmax(-1)
        held_logits = _predict(classifier, data.features, held_rows, timestep)
        held_preds = held_logits.argmax(-1)
        # Calibrated on the held-out images (the training rows would make the heads look surer than they are).
        scale, offset = fit_calibration(held_logits, data.labels[held_rows])
        scales.append(scale)
        offsets.append(offset)
        train_metrics = accuracy_metrics(train_preds, data.labels[train_rows], num_classes)
        held_metrics = accuracy_metrics(held_preds, data.labels[held_rows], num_classes)
        metrics.append(
            {
                "step": step,
                "timestep": timestep,
                "num_train": int((~held).sum()),
                "num_heldout": int(held.sum()),
                "train_accuracy": train_metrics["accuracy"],
                "accuracy": held_metrics["accuracy"],
                "balanced_accuracy": held_metrics["balanced_accuracy"],
                "recall": held_metrics["recall"],
                **calibration_metrics(held_logits, data.labels[held_rows], scale, offset),
            }
        )
        del data, x
    classifier.set_calibration(scales, offsets)
    classifier.set_anchors(torch.stack(anchors), "class_means_spread")
    classifier.eval()
    summary = summarize(metrics)
    summary.update(
        class_counts={name: int(present[k]) for k, name in enumerate(class_names)},
        num_heldout_images=int(holdout_ids.numel()),
        num_images=int(labels.numel()),
        config=asdict(config) | {"branches": branches},
    )
    result = TrainingResult(classifier, metrics, summary)
    if output_dir is not None:
        dtype = config.stored_dtype(pooled=pool_size is not None)
        save_classifier(result, output_dir, manifest, overwrite=overwrite, storage_dtype=dtype)
        result.output_dir = output_dir
    return result


def summarize(metrics: list[dict]) -> dict:
    """First / middle / last step and mean held-out accuracy and balanced accuracy."""
    if not metrics:
        return {}
    picks = {"first": metrics[0], "middle": metrics[len(metrics) // 2], "last": metrics[-1]}
    summary = {
        name: {k: m[k] for k in ("step", "timestep", "accuracy", "balanced_accuracy")} for name, m in picks.items()
    }
    valid = [m for m in metrics if not math.isnan(m["accuracy"])]
    if valid:
        summary["mean_accuracy"] = sum(m["accuracy"] for m in valid) / len(valid)
        summary["mean_balanced_accuracy"] = sum(m["balanced_accuracy"] for m in valid) / len(valid)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Saving: weights + config, model card, metrics, plot; atomically
# ----------------------------------------------------------------------------------------------------------------


def save_classifier(
    result: TrainingResult,
    output_dir: str | os.PathLike,
    manifest: dict,
    overwrite: bool = False,
    storage_dtype: torch.dtype = torch.float32,
):
    """Writes the classifier folder into a temporary directory next to `output_dir`, then renames it into place.

    An existing `output_dir` is replaced only with `overwrite=True` (moved aside, then removed after the rename). The
    weights file holds its floats in `storage_dtype` (`from_pretrained` loads them as float32).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"`output_dir` {str(output_dir)!r} already exists; pass `overwrite=True` to replace it.")
    with atomic_directory(output_dir) as tmp:
        result.classifier.save_pretrained(tmp)
        store_weights_as(tmp, storage_dtype)
        class_names = list(result.classifier.config.class_names)
        atomic_write_json(tmp / METRICS_NAME, {"summary": result.summary, "per_step": result.metrics})
        plot_metrics(
            result.metrics, tmp / PLOT_NAME, f"h-classifier '{result.classifier.config.attribute}' {class_names}"
        )
        atomic_write_text(
            tmp / "README.md", str(model_card(result.classifier, result.metrics, result.summary, manifest))
        )
    logger.debug("Saved the classifier to %s", output_dir)  # the train command prints it
    return output_dir


def load_metrics(classifier_dir: str | os.PathLike) -> dict:
    return json.loads((Path(classifier_dir) / METRICS_NAME).read_text(encoding="utf-8"))
