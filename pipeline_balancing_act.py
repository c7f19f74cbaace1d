# Copyright 2026 The Balancing Act diffusers contributors. Licensed under the Apache License, Version 2.0.
"""Balancing Act: distribution-guided debiasing for Stable Diffusion (Parihar et al., CVPR 2024).

A single-file diffusers community pipeline. It imports only the standard library, torch, diffusers, transformers,
huggingface_hub and safetensors, so that `DiffusionPipeline.from_pretrained(..., custom_pipeline=...)` can load it on
its own. It defines:

- `HClassifier`: per-timestep linear heads over the UNet bottleneck features h (the paper's "Attribute Distribution
  Predictor"), with a per-timestep calibration and per-class anchors in h; a diffusers `ModelMixin` + `ConfigMixin`
  saved as safetensors + config.json.
- `assign_classes` / `largest_remainder`: exact class counts for a batch and the min-cost assignment of images to them.
- `BalanceState`: class counts carried across calls, so a long job in small batches ends on the target counts.
- `MidBlockHook`: the one mechanism that reads (and optionally replaces) h = `unet.mid_block(...)`.
- `guidance_loss`: the one guidance loss (towards classes, or the paper's soft KL / chi-square).
- `BalancingActPipeline`: `StableDiffusionPipeline` plus h-space guidance during denoising.
"""

import copy
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import PipelineImageInput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline, retrieve_timesteps
from diffusers.utils import logging


logger = logging.get_logger(__name__)

# Softmax temperature of the paper's soft distribution loss (`distribution_solver="kl"` / `"chi2"`).
DEFAULT_TEMPERATURE = 8.0
# `guidance_strength`, in class gaps per denoising step: a strength of 1 moves an image that is surely of class a and
# asked to be class c by the whole distance between the class anchors a -> c in h on that step, as seen in the
# output after classifier-free guidance (see `BalancingActPipeline.__call__`).
# Chosen on the toy world's tuning seeds (benchmarks/reproduce.py --sweep strength, docs/results/sweep_strength.md).
DEFAULT_GUIDANCE_STRENGTH = 5.0
# The class-guidance loss aims past the decision boundary: it treats an image as of its asked class only once that
# class leads the others by this many calibrated logits (so an image barely on the right side keeps moving).
GUIDANCE_MARGIN = 2.0
# A classifier without anchors (saved by an older version) moves along its calibrated head weights, scaled so that
# going from one class's point to another's changes their calibrated logit margin by this much.
LEGACY_CLASS_GAP = 8.0
# Cost (in nats of calibrated log-probability) of moving an image to another class when the assignment is solved
# again at a later step: predictions sharpen, but an image does not flip back and forth between classes.
SWITCH_PENALTY = 1.0

GUIDANCE_MODES = ("sample", "distribution")
DISTRIBUTION_SOLVERS = ("assign", "kl", "chi2")
GUIDED_BRANCHES = ("cond", "both")
# Tolerance on the sum of a target distribution.
TARGET_SUM_TOLERANCE = 1e-3
# Probabilities of a target are clamped to at least this inside the soft losses (KL / chi-square stay finite).
TARGET_PROB_FLOOR = 1e-3


def _timestep_value(timestep: int | float | torch.Tensor) -> float:
    """One scalar timestep from an int, a float or a tensor (0-d, or 1-d with equal entries)."""
    if isinstance(timestep, torch.Tensor):
        flat = timestep.detach().flatten()
        if flat.numel() == 0:
            raise ValueError("`timestep` is an empty tensor; expected a scalar timestep.")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise ValueError(f"`timestep` must be one value for the whole batch, got {flat.tolist()}.")
        return float(flat[0].item())
    if isinstance(timestep, (bool, str, bytes)):
        raise TypeError(f"`timestep` must be an int, a float or a tensor, got {type(timestep).__name__}.")
    try:
        # int, float and numpy scalars
        return float(timestep)
    except (TypeError, ValueError):
        raise TypeError(f"`timestep` must be an int, a float or a tensor, got {type(timestep).__name__}.") from None


# ----------------------------------------------------------------------------------------------------------------
# The h-classifier
# ----------------------------------------------------------------------------------------------------------------


class HClassifier(ModelMixin, ConfigMixin):
    r"""
    Per-timestep linear heads over the flattened UNet bottleneck h: `logits = W_t @ flatten(h) + b_t`.

    One head per trained timestep; any scheduler's timestep (int or float, any step count) uses the head of the
    nearest trained timestep (`head_index`). Two optional per-timestep parts make guidance behave the same for every
    classifier:

    - a calibration (`calibration_scale`, `calibration_bias`): `calibrated_logits = logits * scale_t + bias_t`,
      fitted on held-out images when the heads are trained, so that softmax(calibrated_logits) estimates the
      probability of each class of the image that will come out;
    - class anchors (`anchors`, `[T, K, *h_shape]`, present when `anchor_source` is set): a point in h per class,
      e.g. the class means of the training h. Guidance moves h along differences of anchors, in units of the class
      gaps. A classifier without anchors moves along its own head weights (see `move_directions`).

    Args:
        attribute (`str`): Name of the attribute, e.g. `"skin"`.
        class_names (`list[str]`): The K >= 2 class names; class index = position in this list.
        h_shape (`list[int]`): The shape `[C, H, W]` of one sample's h the heads were trained on.
        timesteps (`list[int | float]`): The scheduler timesteps of the heads, in the order they were recorded.
        temperature (`float`, defaults to 8.0): Softmax temperature of the paper's soft distribution loss.
        base_model (`str`, *optional*): The model the heads were trained on (Hub id or folder name).
        calibration_scale (`list[float]`, *optional*): Per head, the factor on the logits (temperature scaling).
        calibration_bias (`list[list[float]]`, *optional*): Per head, K offsets added after the scale.
        anchor_source (`str`, *optional*): How the anchors were made (`balancing-act train` writes
            `"class_means_spread"`); `None` means the classifier has no anchors.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        attribute: str = "attribute",
        class_names: list[str] = ("class_0", "class_1"),
        h_shape: list[int] = (1280, 8, 8),
        timesteps: list[int | float] = (0,),
        temperature: float = DEFAULT_TEMPERATURE,
        base_model: str | None = None,
        calibration_scale: list[float] | None = None,
        calibration_bias: list[list[float]] | None = None,
        anchor_source: str | None = None,
    ):
        super().__init__()
        class_names = [str(c) for c in class_names]
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ValueError(f"`class_names` must hold at least 2 distinct names, got {class_names}.")
        h_shape = [int(s) for s in h_shape]
        if len(h_shape) != 3 or min(h_shape) < 1:
            raise ValueError(f"`h_shape` must be [channels, height, width] with positive sizes, got {h_shape}.")
        timesteps = [float(t) for t in timesteps]
        if len(timesteps) == 0 or not all(math.isfinite(t) for t in timesteps):
            raise ValueError(f"`timesteps` must be a non-empty list of finite numbers, got {timesteps}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a positive number, got {temperature}.")
        num_heads, num_classes, dim = len(timesteps), len(class_names), math.prod(h_shape)
        self.weight = torch.nn.Parameter(torch.zeros(num_heads, num_classes, dim))
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, num_classes))
        if anchor_source is not None:
            self.register_buffer("anchors", torch.zeros(num_heads, num_classes, dim))
        # Plain tensors, not buffers: `.to(dtype)` must never round the timesteps or the calibration.
        self._timesteps = torch.tensor(timesteps, dtype=torch.float64)
        self._calibration = self._check_calibration(calibration_scale, calibration_bias, num_heads, num_classes)

    @staticmethod
    def _check_calibration(scale: Any, bias: Any, num_heads: int, num_classes: int) -> tuple[torch.Tensor, ...]:
        scale = torch.ones(num_heads) if scale is None else torch.as_tensor(scale, dtype=torch.float32).flatten()
        bias = torch.zeros(num_heads, num_classes) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        if scale.shape != (num_heads,) or bias.shape != (num_heads, num_classes):
            raise ValueError(
                f"`calibration_scale` must hold one number per head ({num_heads}) and `calibration_bias` one list of "
                f"{num_classes} numbers per head; got shapes {list(scale.shape)} and {list(bias.shape)}."
            )
        if not (bool(torch.isfinite(scale).all()) and bool((scale > 0).all()) and bool(torch.isfinite(bias).all())):
            raise ValueError("`calibration_scale` must be positive and finite, `calibration_bias` finite.")
        return scale, bias

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    @property
    def has_anchors(self) -> bool:
        return self.config.anchor_source is not None

    def set_calibration(self, scale: Sequence[float], bias: Sequence[Sequence[float]]) -> None:
        """Store a per-head calibration (`calibrated = logits * scale + bias`) in the config."""
        self._calibration = self._check_calibration(scale, bias, len(self._timesteps), self.num_classes)
        self.register_to_config(
            calibration_scale=self._calibration[0].tolist(), calibration_bias=self._calibration[1].tolist()
        )

    def set_anchors(self, anchors: torch.Tensor, source: str) -> None:
        """Store per-head class anchors `[T, K, *h_shape]` (or `[T, K, D]`) made by `source`."""
        expected = (len(self._timesteps), self.num_classes, math.prod(self.config.h_shape))
        anchors = torch.as_tensor(anchors).detach().float().reshape(anchors.shape[0], anchors.shape[1], -1)
        if tuple(anchors.shape) != expected or not bool(torch.isfinite(anchors).all()):
            raise ValueError(
                f"`anchors` must be finite with shape [T, K, D] = {list(expected)}; got {list(anchors.shape)}."
            )
        if not self.has_anchors:
            self.register_buffer("anchors", torch.zeros(expected, device=self.weight.device))
        self.anchors.copy_(anchors)
        self.register_to_config(anchor_source=str(source))

    def head_index(self, timestep: int | float | torch.Tensor) -> int:
        """Index of the head trained at the timestep nearest to `timestep` (first one on a tie)."""
        value = _timestep_value(timestep)
        distances = (self._timesteps - value).abs()
        return int(torch.argmin(distances).item())

    def covers_timesteps(self, timesteps: Sequence[float]) -> bool:
        """Whether every timestep lies within the heads' timesteps, give or take the widest gap between two heads
        (a scheduler on another timestep scale, e.g. continuous sigmas, would map every step to one head)."""
        heads = self._timesteps.sort().values
        slack = float((heads[1:] - heads[:-1]).max()) if len(heads) > 1 else 1.0
        low, high = float(heads[0]) - slack, float(heads[-1]) + slack
        return all(low <= float(t) <= high for t in timesteps)

    def class_index(self, name_or_index: str | int) -> int:
        """Class name or index -> index; a clear `ValueError` for anything else."""
        names = list(self.config.class_names)
        if isinstance(name_or_index, str):
            if name_or_index in names:
                return names.index(name_or_index)
            raise ValueError(
                f"Class {name_or_index!r} is not a class of the {self.config.attribute!r} classifier; accepted names: "
                f"{names} (or indices 0..{len(names) - 1})."
            )
        if isinstance(name_or_index, torch.Tensor) and name_or_index.numel() == 1:
            name_or_index = name_or_index.item()
        if not isinstance(name_or_index, bool) and hasattr(name_or_index, "__index__"):
            index = int(name_or_index.__index__())
            if 0 <= index < len(names):
                return index
        raise ValueError(
            f"Class {name_or_index!r} is not valid for the {self.config.attribute!r} classifier; accepted: a name in "
            f"{names} or an index 0..{len(names) - 1}."
        )

    def _check_h(self, h: torch.Tensor) -> None:
        expected = tuple(self.config.h_shape)
        if h.ndim != 4 or tuple(h.shape[1:]) != expected:
            raise ValueError(
                f"h has shape {list(h.shape)} but this classifier was trained on h of shape [B, {', '.join(map(str, expected))}]."
            )

    def forward(self, h: torch.Tensor, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """
        Raw logits `[B, K]` (float32) of the head nearest to `timestep` for h of shape `[B, C, H, W]`.

        The head is used in float32 on h's device (the classifier itself is not moved), so it may stay on the CPU
        while the UNet runs elsewhere and h may be fp16/bf16; gradients flow to h and to the parameters.
        """
        self._check_h(h)
        index = self.head_index(timestep)
        weight = self.weight[index].to(device=h.device, dtype=torch.float32)
        bias = self.bias[index].to(device=h.device, dtype=torch.float32)
        return F.linear(h.flatten(1).float(), weight, bias)

    def calibrated_logits(self, h: torch.Tensor, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """Calibrated logits `[B, K]`: softmax of them estimates the class probabilities of the final images."""
        index = self.head_index(timestep)
        scale, bias = (c[index].to(h.device) for c in self._calibration)
        return self(h, timestep) * scale + bias

    def move_directions(self, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """
        The K points `[K, D]` (float32) whose differences guidance moves h along at `timestep`: the class anchors,
        or, for a classifier without anchors, its calibrated head weights scaled so that moving from one class's
        point to another's changes that pair's calibrated logit margin by `LEGACY_CLASS_GAP` on average.
        """
        index = self.head_index(timestep)
        if self.has_anchors:
            return self.anchors[index].float()
        weight = self.weight[index].detach().float() * self._calibration[0][index].to(self.weight.device)
        centred = weight - weight.mean(0)
        pair_gaps = torch.cdist(weight[None], weight[None])[0] ** 2
        mean_gap = pair_gaps.sum() / (self.num_classes * (self.num_classes - 1))
        return centred * (LEGACY_CLASS_GAP / mean_gap.clamp_min(1e-12))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """
        `ModelMixin.save_pretrained` (safetensors + config.json), each file written to a temporary name in
        `save_directory` then renamed, so an interrupted save never leaves a half-written file. With
        `push_to_hub=True` the saved classifier is then uploaded with `push_to_hub` (`repo_id`, `commit_message`,
        `private`, `token`, `create_pr` are passed to it).
        """
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("`safe_serialization=False` is not supported: HClassifier weights are safetensors.")
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr") if k in kwargs
        }
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-") as tmp:
            super().save_pretrained(tmp, **kwargs)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(save_directory, name))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "HClassifier":
        """
        Load from a directory written by `save_pretrained` or from a Hub id. Only safetensors weights are read;
        pickled checkpoints (`.pt`, `.pth`, `.bin`, `.ckpt`, ...) are refused, never unpickled. Folders saved before
        calibration and anchors existed load as classifiers without them.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            raise ValueError(
                f"`h_classifier` {path!r} is a file; expected a directory written by `HClassifier.save_pretrained` "
                "(config.json + diffusion_pytorch_model.safetensors) or a Hub id. Pickled checkpoints (.pt, .pth, "
                ".bin, .ckpt) are refused because unpickling can run arbitrary code."
            )
        if not os.path.isdir(path) and (_looks_local(path) or kwargs.get("local_files_only")):
            raise FileNotFoundError(
                f"`h_classifier` {path!r} does not exist; expected a directory written by `HClassifier.save_pretrained` "
                "or a Hub id such as 'user/repo'."
            )
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors=False` is not supported: HClassifier loads safetensors weights only.")
        kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(path, **kwargs)
        except (OSError, EnvironmentError) as error:
            raise OSError(
                f"Could not load `h_classifier` {path!r}: expected a directory or Hub repo with config.json and "
                f"diffusion_pytorch_model.safetensors (written by `HClassifier.save_pretrained`). Cause: {error}"
            ) from error


def _looks_local(path: str) -> bool:
    """A path rather than a Hub id ('user/name'): absolute, starting with '.' or '~', ending with a separator, with
    more than one '/', or inside a directory that exists here."""
    if os.path.isabs(path) or path.startswith((".", "~")) or path.endswith(("/", os.sep)):
        return True
    if path.replace(os.sep, "/").count("/") > 1:
        return True
    return os.path.isdir(os.path.dirname(path) or ".")


# ----------------------------------------------------------------------------------------------------------------
# Exact class counts: apportionment, assignment, and the state carried across calls
# ----------------------------------------------------------------------------------------------------------------


def largest_remainder(probabilities: Sequence[float] | torch.Tensor, total: int) -> torch.Tensor:
    """
    Integer counts summing to `total` in the proportions `probabilities` (Hamilton's largest-remainder method: floors
    first, then one more for the largest remainders; ties go to the lower class index).
    """
    p = torch.as_tensor(probabilities, dtype=torch.float64).flatten()
    if total < 0 or p.numel() == 0 or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise ValueError(
            f"`largest_remainder` needs non-negative proportions and total >= 0; got {p.tolist()}, {total}."
        )
    raw = p / p.sum() * total
    counts = raw.floor().long()
    order = torch.argsort(counts.double() - raw, stable=True)  # largest remainder first
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def assign_classes(cost: torch.Tensor, counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """
    The assignment of N rows to K classes with exactly `counts[k]` rows in class k that minimises the summed
    `cost[i, class_i]` (an exact min-cost transportation solver).

    Each row starts in its cheapest class; while a class holds too many rows, the cheapest chain of moves from an
    over-full class to an under-full one is applied (successive shortest paths on the K classes, Bellman-Ford, since
    moves can have negative cost). Every step keeps the assignment optimal for its current class loads, so the end
    result is optimal. Cost: at most N chains of O(N K + K^3); small next to a UNet step for N up to a few hundred.
    Two classes have a closed form (the rows that gain most by being class 1). Returns a LongTensor [N] of classes.
    """
    if cost.ndim != 2:
        raise ValueError(f"`cost` must be [N, K], got shape {list(cost.shape)}.")
    num_rows, num_classes = cost.shape
    counts = torch.as_tensor(counts, dtype=torch.long).flatten().cpu()
    if counts.numel() != num_classes or bool((counts < 0).any()) or int(counts.sum()) != num_rows:
        raise ValueError(f"`counts` must be K = {num_classes} non-negative integers summing to N = {num_rows}.")
    cost = cost.detach().to(device="cpu", dtype=torch.float64)
    if num_classes == 2:  # closed form: the counts[1] rows that gain the most by being class 1 rather than class 0
        assigned = torch.zeros(num_rows, dtype=torch.long)
        assigned[torch.argsort(cost[:, 1] - cost[:, 0], stable=True)[: int(counts[1])]] = 1
        return assigned
    assigned = cost.argmin(1)
    while True:
        excess = torch.bincount(assigned, minlength=num_classes) - counts
        if not bool((excess > 0).any()):
            return assigned
        # move[u, v]: cheapest change of cost when one row of class u moves to class v, and that row.
        delta = cost - cost.gather(1, assigned[:, None])
        move = torch.full((num_classes, num_classes), math.inf, dtype=torch.float64)
        row_of = torch.full((num_classes, num_classes), -1, dtype=torch.long)
        for u in range(num_classes):
            members = (assigned == u).nonzero().flatten()
            if len(members):
                move[u], best = delta[members].min(0)
                row_of[u] = members[best]
        move.fill_diagonal_(math.inf)
        dist = torch.where(excess > 0, 0.0, math.inf).double()
        previous = torch.full((num_classes,), -1, dtype=torch.long)
        for _ in range(num_classes):
            candidate, source = (dist[:, None] + move).min(0)
            better = candidate < dist - 1e-12
            if not bool(better.any()):
                break
            dist, previous = torch.where(better, candidate, dist), torch.where(better, source, previous)
        target = int(torch.where(excess < 0, dist, torch.full_like(dist, math.inf)).argmin())
        while previous[target] != -1:
            source = int(previous[target])
            assigned[row_of[source, target]] = target
            target = source


class BalanceState:
    r"""
    Class counts of the images generated so far, for a job generated in several calls (small batches).

    Pass the same state to every call (`balance_state=state`): each distribution-mode call is assigned the class
    counts that bring the whole job closest to `target_distribution` (largest remainder over all images so far plus
    this batch), and afterwards adds the classes its images came out as (the assigned classes, corrected by the
    classifier's final prediction). Then the job ends on the target counts whatever the batch size, 1 included.

    The state is tied to the classifiers (attribute and class names) and to marginal versus joint targets of its
    first use. It saves to and loads from JSON, so a long job can stop and resume.

    Example:
        ```py
        >>> state = BalanceState()
        >>> for seed in range(0, 512, 8):
        ...     pipe(prompt, num_images_per_prompt=8, h_classifier=skin, guidance_mode="distribution",
        ...          target_distribution=[0.3, 0.7], balance_state=state)
        >>> state.save("job_state.json")  # later: state = BalanceState.load("job_state.json")
        ```
    """

    def __init__(self):
        self.groups: list[dict[str, Any]] | None = None
        self.counts: list[torch.Tensor] = []

    @property
    def num_images(self) -> int:
        return int(self.counts[0].sum()) if self.counts else 0

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        if self.groups is None:
            self.groups = groups
            self.counts = [torch.zeros(math.prod(len(n) for n in g["class_names"]), dtype=torch.long) for g in groups]
        elif groups != self.groups:
            raise ValueError(
                f"`balance_state` holds counts for {self.groups}, but this call guides {groups}; use one state per "
                "classifier set and target kind (marginal or joint)."
            )

    def batch_counts(
        self, groups: list[dict[str, Any]], targets: list[torch.Tensor], num_images: int
    ) -> list[torch.Tensor]:
        """Per group, the class counts for the next `num_images` images that bring the job closest to the target."""
        self._check_groups(groups)
        result = []
        for so_far, target in zip(self.counts, targets):
            wanted = largest_remainder(target.flatten(), int(so_far.sum()) + num_images) - so_far
            missing = wanted.clamp_min(0)
            # Classes already over their share get nothing; the others share the batch in proportion to what they lack.
            result.append(largest_remainder(missing, num_images) if int(missing.sum()) > num_images else missing)
        return result

    def update(self, groups: list[dict[str, Any]], classes: list[torch.Tensor]) -> None:
        """Add one generated class (cell index for a joint target) per image and group."""
        self._check_groups(groups)
        for i, values in enumerate(classes):
            self.counts[i] = self.counts[i] + torch.bincount(values.cpu().long(), minlength=self.counts[i].numel())

    def to_dict(self) -> dict[str, Any]:
        return {"format": "balancing-act-state/1", "groups": self.groups, "counts": [c.tolist() for c in self.counts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BalanceState":
        if not isinstance(data, dict) or data.get("format") != "balancing-act-state/1":
            raise ValueError("Not a BalanceState: expected a dict with format 'balancing-act-state/1'.")
        state = cls()
        if data.get("groups") is not None:
            state.groups = data["groups"]
            state.counts = [torch.tensor(c, dtype=torch.long) for c in data["counts"]]
            if len(state.counts) != len(state.groups) or any(bool((c < 0).any()) for c in state.counts):
                raise ValueError("BalanceState: `counts` must be one list of non-negative counts per group.")
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as JSON (to a temporary file next to `path`, then renamed: never half-written)."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".balance-state-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BalanceState":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------------------------------------------
# h capture / replacement
# ----------------------------------------------------------------------------------------------------------------


class MidBlockHook:
    r"""
    Context manager: while active, every `unet.mid_block` output h is passed to `fn(h)`; a returned tensor replaces
    h for the rest of the UNet (up blocks), `None` keeps it. The hook is removed on exit, also on an exception.

    Example (recording h):
        ```py
        hs = []
        with MidBlockHook(pipe.unet, lambda h: hs.append(h.detach().cpu())):
            pipe(prompt)
        ```
    """

    def __init__(self, unet: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        mid_block = getattr(unet, "mid_block", None)
        if mid_block is None:
            raise ValueError("`unet` has no `mid_block`; h-space guidance needs a UNet with a mid block.")
        self.mid_block = mid_block
        self.fn = fn
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"`unet.mid_block` returned {type(output).__name__}; expected a tensor h.")
        new = self.fn(output)
        if new is None:
            return None
        if not isinstance(new, torch.Tensor) or new.shape != output.shape:
            raise ValueError(
                f"The mid-block hook function must return None or a tensor of h's shape {list(output.shape)}, got "
                f"{list(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}."
            )
        return new

    def __enter__(self) -> "MidBlockHook":
        if self._handle is not None:
            raise RuntimeError("This MidBlockHook is already active.")
        self._handle = self.mid_block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ----------------------------------------------------------------------------------------------------------------
# The guidance loss, and the move it makes in h
# ----------------------------------------------------------------------------------------------------------------


def guidance_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "classes",
    temperature: float = DEFAULT_TEMPERATURE,
    margin: float = GUIDANCE_MARGIN,
) -> torch.Tensor:
    r"""
    The Balancing Act guidance loss over `logits` `[N, K]`. Its gradient with respect to the logits says how each
    image should change; `BalancingActPipeline` turns it into a move of h (see `logit_directions`).

    - `loss="classes"`: `targets` is a LongTensor `[N]` (each image's asked or assigned class c_i) and
      `L = sum_i CE(z_i - margin * e_{c_i}, c_i)`, the cross-entropy of calibrated logits z_i with the asked class
      handicapped by `margin`: the gradient `softmax(z_i - margin e_c) - e_c` does not vanish for an image that is
      confidently another class (the paper's `-p[c]` saturates there), and fades once class c leads by the margin.
    - `loss="kl"` / `"chi2"` (the paper's distribution loss): `targets` is a probability K-vector p_ref,
      `p_i = softmax(z_i / temperature)`, `p_hat = mean_i p_i`, and `L = N * temperature * D(p_hat, p_ref)` with D the
      KL divergence `sum_k p_hat_k log(p_hat_k / p_ref_k)` or chi-square `sum_k (p_hat_k - p_ref_k)^2 / p_ref_k`
      (p_ref clamped to at least `TARGET_PROB_FLOOR`). The factors N and temperature put its per-image gradient in
      the same units as `"classes"`, whatever the batch size.

    Returns a 0-d float32 tensor.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"`logits` must have shape [N, K] with K >= 2, got {list(logits.shape)}.")
    logits = logits.float()
    if loss == "classes":
        targets = torch.as_tensor(targets, device=logits.device).long().flatten()
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"`targets` must hold one class per row ({logits.shape[0]}), got {targets.shape[0]}.")
        handicap = margin * F.one_hot(targets, logits.shape[1]).float()
        return F.cross_entropy(logits - handicap, targets, reduction="sum")
    if loss not in ("kl", "chi2"):
        raise ValueError(f"`loss` must be one of ['classes', 'kl', 'chi2'], got {loss!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a positive number, got {temperature}.")
    p_ref = torch.as_tensor(targets, device=logits.device, dtype=torch.float32).flatten()
    if p_ref.shape[0] != logits.shape[1]:
        raise ValueError(f"`targets` must be a {logits.shape[1]}-vector, got {p_ref.shape[0]} entries.")
    p_ref = p_ref.clamp_min(TARGET_PROB_FLOOR)
    p_hat = torch.softmax(logits / temperature, dim=1).mean(dim=0)
    if loss == "kl":
        divergence = (p_hat * (p_hat.clamp_min(1e-12).log() - p_ref.log())).sum()
    else:
        divergence = ((p_hat - p_ref) ** 2 / p_ref).sum()
    return logits.shape[0] * temperature * divergence


def logit_directions(logits: torch.Tensor, targets: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    """`-d guidance_loss / d logits` `[N, K]`: how each image's logits should change (rows sum to zero)."""
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().float().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(guidance_loss(z, targets, loss, temperature), z)
    return -grad


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def _all_gather_rows(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The `rows` `[n_p, ...]` of every process, concatenated in process order (`torch.distributed.all_gather`;
    `sizes` holds each process's n_p, and shorter ones are padded to the longest for the collective). On the gloo
    backend the tensors travel through the CPU."""
    import torch.distributed as dist

    device = torch.device("cpu") if dist.get_backend() == "gloo" else rows.device
    padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(rows.device)


class _GuidancePlan:
    """Validated guidance settings of one `__call__` and the per-step state the hooks share.

    A "group" is what one solver balances: one classifier (marginal targets, sample mode) or all of them together
    (a joint target over the cells of their classes).
    """

    def __init__(
        self,
        classifiers: list[HClassifier],
        strengths: list[float],
        mode: str,
        solver: str,
        joint: bool,
        targets: list[torch.Tensor],
        temperatures: list[float],
        steps: tuple[float, float] | list[int],
        branches: str,
        num_images: int,
        timestep_values: list[float],
        balance_state: BalanceState | None,
        process_rows: list[int] | None = None,
    ):
        self.classifiers = classifiers
        self.strengths = strengths
        self.mode = mode
        self.solver = solver  # "classes" for sample mode, else the distribution solver
        self.joint = joint
        # distribution: one probability tensor per group (joint: shaped [K_1, ..., K_n]); sample: classes per image
        self.targets = targets
        self.temperatures = temperatures
        self.steps = steps
        self.branches = branches
        self.num_images = num_images
        self.timestep_values = timestep_values  # the loop's timesteps, read from a copy of the scheduler
        self.num_steps = len(timestep_values)
        self.balance_state = balance_state
        names = [list(c.config.class_names) for c in classifiers]
        attributes = [c.config.attribute for c in classifiers]
        if joint:
            self.groups = [{"attributes": attributes, "class_names": names}]
        else:
            self.groups = [{"attributes": [a], "class_names": [n]} for a, n in zip(attributes, names)]
        # global batch (distribution mode): every process's number of images, in process order; this process's rows
        # of the global batch. The counts, the assignment and the soft solvers' p_hat are over the global rows.
        self.process_rows = process_rows
        total = num_images
        if process_rows is not None:
            import torch.distributed as dist

            start = sum(process_rows[: dist.get_rank()])
            self.own_rows, total = slice(start, start + num_images), sum(process_rows)
        self.counts = None  # assign solver: the class (cell) counts of this batch, one LongTensor per group
        if mode == "distribution" and solver == "assign":
            if balance_state is not None:
                self.counts = balance_state.batch_counts(self.groups, targets, total)
            else:
                self.counts = [largest_remainder(t.flatten(), total) for t in targets]
        self.previous: list[torch.Tensor | None] = [None] * len(self.groups)  # last assignment, per group
        self.final_classes: list[torch.Tensor] | None = None  # per group, each image's class at the last step
        self.step_index = -1  # index of the current UNet call = denoising-loop step
        self._heads: dict[tuple[int, int, torch.device], tuple[torch.Tensor, ...]] = {}

    def is_guided(self, step_index: int) -> bool:
        if isinstance(self.steps, tuple):
            start, end = self.steps
            return start * self.num_steps <= step_index < end * self.num_steps
        return step_index in self.steps

    def timestep(self) -> float:
        return self.timestep_values[min(self.step_index, self.num_steps - 1)]

    def head(self, c: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(weight, bias, calibration scale, calibration bias, move directions) of classifier c's head for this step,
        in float32 on `device`; copied once per call and head (the classifier itself stays where it is)."""
        classifier = self.classifiers[c]
        index = classifier.head_index(self.timestep())
        key = (c, index, device)
        if key not in self._heads:
            scale, bias = (t[index] for t in classifier._calibration)
            tensors = (classifier.weight[index], classifier.bias[index], scale, bias)
            tensors += (classifier.move_directions(self.timestep()),)
            self._heads[key] = tuple(t.detach().to(device=device, dtype=torch.float32) for t in tensors)
        return self._heads[key]

    def solve(self, calibrated: list[torch.Tensor], raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per classifier, the logit-space directions `[N, K]` of this step (see `guidance_loss`). With a global
        batch the solvers see the rows of every process (gathered) and this process's rows are returned."""
        if self.mode == "sample":
            return [logit_directions(z, t.to(z.device), "classes", 0) for z, t in zip(calibrated, self.targets)]
        if self.process_rows is not None:  # one all_gather of every classifier's calibrated and raw logits
            widths = [z.shape[1] for z in calibrated + raw]
            gathered = _all_gather_rows(torch.cat(calibrated + raw, dim=1), self.process_rows).split(widths, dim=1)
            calibrated, raw = list(gathered[: len(calibrated)]), list(gathered[len(calibrated) :])
        if self.solver != "assign":
            directions = []
            for z, r, target, temperature in zip(calibrated, raw, self.targets, self.temperatures):
                if float(target.max()) == 1.0:  # one class asked of every image: sample mode towards it
                    classes = torch.full((len(z),), int(target.argmax()), device=z.device)
                    directions.append(logit_directions(z, classes, "classes", 0))
                else:
                    directions.append(logit_directions(r, target.to(r.device), self.solver, temperature))
        else:
            log_probs = [torch.log_softmax(z, dim=1) for z in calibrated]
            if self.joint:
                cost = -log_probs[0]
                for lp in log_probs[1:]:  # cell cost: the classifiers' costs add up (independent readings)
                    cost = (cost[:, :, None] - lp[:, None, :]).flatten(1)
                cells = self._assign(0, cost)
                shape = [lp.shape[1] for lp in log_probs]
                classes = list(torch.unravel_index(cells, shape)) if len(shape) > 1 else [cells]
            else:
                classes = [self._assign(g, -lp) for g, lp in enumerate(log_probs)]
            directions = [logit_directions(z, c.to(z.device), "classes", 0) for z, c in zip(calibrated, classes)]
        return directions if self.process_rows is None else [d[self.own_rows] for d in directions]

    def _assign(self, group: int, cost: torch.Tensor) -> torch.Tensor:
        """The min-cost assignment of group `group`, re-solved at each guided step with a cost for switching."""
        previous = self.previous[group]
        if previous is not None:
            cost = cost + SWITCH_PENALTY * (torch.arange(cost.shape[1], device=cost.device) != previous[:, None])
        self.previous[group] = assign_classes(cost, self.counts[group]).to(cost.device)
        return self.previous[group]

    def record_final(self, calibrated: list[torch.Tensor]) -> None:
        """Each image's predicted class (joint: cell) at this step; the last call's is what the state counts."""
        predicted = [z.argmax(1) for z in calibrated]
        if self.joint:
            cells = predicted[0]
            for z, p in zip(calibrated[1:], predicted[1:]):
                cells = cells * z.shape[1] + p
            predicted = [cells]
        self.final_classes = predicted


def _class_index(classifier: HClassifier, value: Any, argument: str) -> int:
    """`classifier.class_index` with the name of the argument in the error."""
    try:
        return classifier.class_index(value)
    except ValueError as error:
        raise ValueError(f"`{argument}`: {error}") from None


class BalancingActPipeline(StableDiffusionPipeline):
    r"""
    Stable Diffusion with Balancing Act h-space guidance (Parihar et al., CVPR 2024).

    During denoising, the UNet bottleneck h = `unet.mid_block(...)` is read by per-timestep linear h-classifiers
    (`HClassifier`) and moved towards classes, and the rest of the UNet runs on the moved h.
    `guidance_mode="distribution"` steers the batch to a target distribution of an attribute (debiasing): by default
    the target becomes exact class counts, assigned to the images at the least cost; `guidance_mode="sample"` steers
    each image to a class.

    Everything else is `StableDiffusionPipeline`: same components, arguments, schedulers, callbacks, LoRA, offload.
    With `guidance_mode=None` the output is identical to `StableDiffusionPipeline`.
    """

    def _resolve_classifier(self, classifier: "HClassifier | str | os.PathLike") -> HClassifier:
        # Duck-typed: diffusers' custom_pipeline loader imports this file as a second module, whose HClassifier is a
        # different class object from `h_classifiers.HClassifier`; both must be accepted.
        if isinstance(classifier, torch.nn.Module) and all(
            hasattr(classifier, name) for name in ("config", "head_index", "calibrated_logits", "move_directions")
        ):
            return classifier
        if isinstance(classifier, (str, os.PathLike)):
            key = os.fspath(classifier)
            # A local folder is loaded again when its files change (a classifier retrained in place).
            files = [os.path.join(key, n) for n in ("config.json", "diffusion_pytorch_model.safetensors")]
            stamp = tuple(os.path.getmtime(f) for f in files if os.path.isfile(f))
            cache = self.__dict__.setdefault("_h_classifier_cache", {})
            if key not in cache or cache[key][0] != stamp:
                cache[key] = (stamp, HClassifier.from_pretrained(key).eval())
            return cache[key][1]
        raise TypeError(
            "`h_classifier` must be an HClassifier, a local directory or Hub id (str / PathLike), or a list of "
            f"those; got {type(classifier).__name__}."
        )

    def mid_block_h_shape(self, height: int, width: int) -> list[int]:
        """The per-sample shape [C, H, W] of h = `unet.mid_block` output for images of `height` x `width`."""
        if self.unet.mid_block is None:
            raise ValueError("This UNet has no mid block; Balancing Act guidance needs one.")
        size = [int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor]
        for block in self.unet.down_blocks:
            if getattr(block, "downsamplers", None):
                # Downsample2D: 3x3 conv, stride 2, padding 1 -> ceil(n / 2).
                size = [math.ceil(n / 2) for n in size]
        return [int(self.unet.config.block_out_channels[-1]), *size]

    @staticmethod
    def _per_classifier(value: Any, name: str, num_classifiers: int, is_list: bool) -> list[Any]:
        """Split a per-classifier argument: one entry per classifier when `h_classifier` was a list."""
        if not is_list:
            return [value]
        if not isinstance(value, (list, tuple)) or len(value) != num_classifiers:
            raise ValueError(
                f"`{name}` must be a list with one entry per classifier ({num_classifiers}) when `h_classifier` is a "
                f"list; got {value!r}."
            )
        return list(value)

    @staticmethod
    def _target_vector(value: Any, classifier: HClassifier) -> torch.Tensor:
        names = list(classifier.config.class_names)
        if isinstance(value, str):
            target = torch.zeros(len(names))
            target[_class_index(classifier, value, "target_distribution")] = 1.0
            return target
        try:
            target = torch.as_tensor(value, dtype=torch.float64).flatten().float()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"`target_distribution` must be a probability vector of length {len(names)} (classes {names}) or a "
                f"class name; got {value!r}."
            ) from None
        if target.numel() != len(names):
            raise ValueError(
                f"`target_distribution` for the {classifier.config.attribute!r} classifier must have {len(names)} "
                f"entries (classes {names}); got {target.numel()}."
            )
        return BalancingActPipeline._check_probabilities(target)

    @staticmethod
    def _check_probabilities(target: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
            raise ValueError(
                f"`target_distribution` must hold finite, non-negative probabilities; got {target.tolist()}."
            )
        if abs(float(target.sum()) - 1.0) > TARGET_SUM_TOLERANCE:
            raise ValueError(
                f"`target_distribution` must sum to 1 (tolerance {TARGET_SUM_TOLERANCE}); got {target.tolist()} "
                f"(sum {float(target.sum()):.6g})."
            )
        return target / target.sum()

    @staticmethod
    def _joint_target(value: Any, classifiers: list[HClassifier]) -> torch.Tensor | None:
        """A joint target over the cells of several classifiers' classes: a table shaped [K_1, ..., K_n] summing to
        1 (marginal targets, one vector per classifier, each sum to 1 instead). None when `value` is not one."""
        shape = tuple(c.num_classes for c in classifiers)
        try:
            table = torch.as_tensor(value, dtype=torch.float64).float()
        except (TypeError, ValueError, RuntimeError):
            return None
        if tuple(table.shape) != shape or abs(float(table.sum()) - 1.0) > TARGET_SUM_TOLERANCE:
            return None
        return BalancingActPipeline._check_probabilities(table.flatten()).reshape(shape)

    @staticmethod
    def _target_indices(value: Any, classifier: HClassifier, num_images: int) -> torch.Tensor:
        if not isinstance(value, str) and getattr(value, "ndim", 1) > 0 and hasattr(value, "__len__"):
            if len(value) != num_images:
                raise ValueError(
                    f"`target_classes` must be one class for all images or a list of one class per image "
                    f"({num_images} images = batch size x num_images_per_prompt); got a list of {len(value)}."
                )
            indices = [_class_index(classifier, v, "target_classes") for v in value]
        else:
            indices = [_class_index(classifier, value, "target_classes")] * num_images
        return torch.tensor(indices, dtype=torch.long)

    @staticmethod
    def _check_steps(guidance_steps: Any) -> tuple[float, float] | list[int]:
        accepted = "a fraction window (start, end) with 0 <= start < end <= 1, or a non-empty list of step indices"
        if isinstance(guidance_steps, tuple):
            if len(guidance_steps) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in guidance_steps
            ):
                raise ValueError(f"`guidance_steps` must be {accepted}; got {guidance_steps!r}.")
            start, end = (float(v) for v in guidance_steps)
            if not (0.0 <= start < end <= 1.0):
                raise ValueError(f"`guidance_steps` must be {accepted}; got {guidance_steps!r}.")
            return (start, end)
        if isinstance(guidance_steps, (list, range, torch.Tensor)):
            steps = guidance_steps.tolist() if isinstance(guidance_steps, torch.Tensor) else list(guidance_steps)
            if len(steps) == 0 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps):
                raise ValueError(f"`guidance_steps` must be {accepted}; got {guidance_steps!r}.")
            return sorted(set(steps))
        raise ValueError(f"`guidance_steps` must be {accepted}; got {guidance_steps!r}.")

    @staticmethod
    def _check_strengths(guidance_strength: Any, num_classifiers: int) -> list[float]:
        if isinstance(guidance_strength, (list, tuple)):
            strengths = list(guidance_strength)
            if len(strengths) != num_classifiers:
                raise ValueError(
                    f"`guidance_strength` must be one number or one per classifier ({num_classifiers}); got "
                    f"{len(strengths)} values."
                )
        else:
            strengths = [guidance_strength] * num_classifiers
        for value in strengths:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`guidance_strength` must be finite and >= 0; got {guidance_strength!r}.")
        return [float(v) for v in strengths]

    @staticmethod
    def _check_temperatures(classifier_temperature: Any, classifiers: list[HClassifier]) -> list[float]:
        if classifier_temperature is None:
            return [float(c.config.temperature) for c in classifiers]
        if (
            isinstance(classifier_temperature, (int, float))
            and not isinstance(classifier_temperature, bool)
            and math.isfinite(classifier_temperature)
            and classifier_temperature > 0
        ):
            return [float(classifier_temperature)] * len(classifiers)
        raise ValueError(f"`classifier_temperature` must be a positive number; got {classifier_temperature!r}.")

    def check_guidance_inputs(
        self,
        h_classifier: Any,
        guidance_mode: str,
        target_distribution: Any,
        target_classes: Any,
        guidance_strength: float | list[float],
        guidance_steps: Any,
        distribution_solver: str,
        classifier_temperature: float | None,
        guided_branches: str,
        balance_state: BalanceState | None,
        num_images: int,
        timestep_values: list[float],
        height: int,
        width: int,
        global_batch: bool = False,
    ) -> _GuidancePlan:
        """Validate our arguments (guidance active: a mode and a classifier) and load the classifiers."""
        num_steps = len(timestep_values)
        if not isinstance(global_batch, bool):
            raise TypeError(f"`global_batch` must be True or False; got {global_batch!r}.")
        if global_batch and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(
                "`global_batch=True` computes the guidance statistics over the batches of all processes, but "
                "torch.distributed is not initialised in this process. Launch every process with `accelerate launch` "
                "(and create `accelerate.PartialState()`), or call `torch.distributed.init_process_group`, then make "
                "the same call on every process; or drop `global_batch` for a single process."
            )
        process_rows = None  # global batch, distribution mode: every process's number of images, in process order
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"`guidance_mode` must be None, 'sample' or 'distribution'; got {guidance_mode!r}.")
        if distribution_solver not in DISTRIBUTION_SOLVERS:
            raise ValueError(
                f"`distribution_solver` must be one of {list(DISTRIBUTION_SOLVERS)}; got {distribution_solver!r}."
            )
        if guided_branches not in GUIDED_BRANCHES:
            raise ValueError(f"`guided_branches` must be one of {list(GUIDED_BRANCHES)}; got {guided_branches!r}.")
        if balance_state is not None:
            if not isinstance(balance_state, BalanceState) and not hasattr(balance_state, "batch_counts"):
                raise TypeError(f"`balance_state` must be a BalanceState; got {type(balance_state).__name__}.")
            if guidance_mode != "distribution" or distribution_solver != "assign":
                raise ValueError(
                    "`balance_state` counts the classes of distribution mode with `distribution_solver='assign'`; "
                    f"got guidance_mode={guidance_mode!r}, distribution_solver={distribution_solver!r}."
                )
        steps = self._check_steps(guidance_steps)
        if isinstance(steps, list) and steps[-1] >= num_steps:
            raise ValueError(
                f"`guidance_steps` holds step index {steps[-1]} but this call has {num_steps} denoising steps "
                f"(indices 0..{num_steps - 1})."
            )
        if isinstance(steps, tuple) and not any(
            steps[0] * num_steps <= i < steps[1] * num_steps for i in range(num_steps)
        ):
            raise ValueError(
                f"`guidance_steps` window {steps} selects none of the {num_steps} denoising steps (step i is guided "
                "when start <= i / num_steps < end); widen the window or give step indices."
            )

        is_list = isinstance(h_classifier, (list, tuple))
        raw = list(h_classifier) if is_list else [h_classifier]
        if len(raw) == 0:
            raise ValueError("`h_classifier` is an empty list; give one classifier or a list of classifiers.")
        classifiers = [self._resolve_classifier(c) for c in raw]
        strengths = self._check_strengths(guidance_strength, len(classifiers))
        temperatures = self._check_temperatures(classifier_temperature, classifiers)

        joint = False
        if guidance_mode == "distribution":
            if target_distribution is None:
                raise ValueError(
                    "`guidance_mode='distribution'` needs `target_distribution`: a probability vector or a class name "
                    "per classifier, or with several classifiers a joint table over their classes."
                )
            table = self._joint_target(target_distribution, classifiers) if is_list else None
            if table is not None:
                if distribution_solver != "assign":
                    raise ValueError(
                        "A joint `target_distribution` (a table over the classes of several classifiers) needs "
                        f"`distribution_solver='assign'`; got {distribution_solver!r}."
                    )
                joint, targets = True, [table]
            else:
                entries = self._per_classifier(target_distribution, "target_distribution", len(classifiers), is_list)
                targets = [self._target_vector(v, c) for v, c in zip(entries, classifiers)]
            one_class = all(float(t.max()) == 1.0 for t in targets)
            if global_batch:  # the call's first collective
                count = torch.tensor([num_images], device=self._execution_device)
                process_rows = _all_gather_rows(count, [1] * torch.distributed.get_world_size()).tolist()
            total = sum(process_rows) if process_rows else num_images
            if total < 2 and balance_state is None and not one_class:
                raise ValueError(
                    "`guidance_mode='distribution'` needs at least 2 images (batch size x num_images_per_prompt) or a "
                    "`balance_state` that carries the counts across calls: the target is a distribution over images. "
                    f"For one image of a given class use `guidance_mode='sample'`; got {total} image."
                )
        else:
            if target_classes is None:
                raise ValueError(
                    "`guidance_mode='sample'` needs `target_classes`: a class (name or index) for all images or a list "
                    "of one class per image."
                )
            entries = self._per_classifier(target_classes, "target_classes", len(classifiers), is_list)
            targets = [self._target_indices(v, c, num_images) for v, c in zip(entries, classifiers)]

        h_shape = self.mid_block_h_shape(height, width)
        for classifier in classifiers:
            if list(classifier.config.h_shape) != h_shape:
                raise ValueError(
                    f"`h_classifier` {classifier.config.attribute!r} was trained on h of shape "
                    f"{list(classifier.config.h_shape)} but this UNet gives h of shape {h_shape} at {height}x{width} "
                    "pixels; use a classifier trained for this model and resolution."
                )
            if not classifier.covers_timesteps(timestep_values):
                heads = classifier._timesteps
                raise ValueError(
                    f"The scheduler {type(self.scheduler).__name__} runs timesteps {min(timestep_values):g}.."
                    f"{max(timestep_values):g}, outside the {classifier.config.attribute!r} classifier's heads "
                    f"({float(heads.min()):g}..{float(heads.max()):g}): it uses another timestep scale. Use a scheduler "
                    "on the scale the classifier was trained on (DDIM, PNDM, DPM-Solver++, Euler, UniPC for SD 1.x/2.x)."
                )
            if not classifier.has_anchors:
                logger.warning(
                    f"`h_classifier` {classifier.config.attribute!r} has no class anchors (saved by an older version): "
                    "guidance moves along its head weights, which can change what the head reads more than the "
                    "image. Retrain it with `balancing-act train` to add anchors and a calibration."
                )
        solver = "classes" if guidance_mode == "sample" else distribution_solver
        return _GuidancePlan(
            classifiers,
            strengths,
            guidance_mode,
            solver,
            joint,
            targets,
            temperatures,
            steps,
            guided_branches,
            num_images,
            timestep_values,
            balance_state,
            process_rows,
        )

    def _denoising_timesteps(self, num_inference_steps: int, timesteps: Any, sigmas: Any) -> list[float]:
        """The timesteps of the denoising loop, from a copy of the scheduler (some schedulers repeat timesteps)."""
        scheduler = copy.deepcopy(self.scheduler)
        return [float(t) for t in retrieve_timesteps(scheduler, num_inference_steps, "cpu", timesteps, sigmas)[0]]

    @staticmethod
    def _count_unet_calls(plan: _GuidancePlan) -> Callable:
        """A UNet forward pre-hook: one UNet call = one denoising-loop iteration."""

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            plan.step_index += 1

        return hook

    def _guide_h(self, plan: _GuidancePlan) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """The mid-block hook function: read h every step; move it on guided steps."""

        def guide(h: torch.Tensor) -> torch.Tensor | None:
            guided = plan.is_guided(plan.step_index)
            if not guided and plan.balance_state is None:
                return None
            cfg = self.do_classifier_free_guidance
            expected_rows = plan.num_images * (2 if cfg else 1)
            if h.shape[0] != expected_rows:
                raise RuntimeError(f"h has {h.shape[0]} rows; expected {expected_rows} for {plan.num_images} images.")
            first = plan.num_images if cfg else 0  # the images are the conditional rows
            # The heads read h in float32 whatever the pipeline's dtype, also under an outer torch.autocast.
            with torch.autocast(device_type=h.device.type, enabled=False):
                x = h[first:].detach().flatten(1).float()
                heads = [plan.head(c, h.device) for c in range(len(plan.classifiers))]
                raw = [F.linear(x, weight, bias) for weight, bias, *_ in heads]
                calibrated = [r * scale + cal_bias for r, (_, _, scale, cal_bias, _) in zip(raw, heads)]
                plan.record_final(calibrated)
                if not guided:
                    return None
                directions = plan.solve(calibrated, raw)
                # With classifier-free guidance the output is e_u + w (e_c - e_u): a move of the conditional rows alone
                # reaches it amplified by w. Divide by w, so a strength means the same change of the output at any
                # guidance_scale.
                amplification = self.guidance_scale if cfg and plan.branches == "cond" else 1.0
                delta = sum(
                    strength / amplification * (g @ head[4])
                    for strength, g, head in zip(plan.strengths, directions, heads)
                )
            delta = delta.reshape(plan.num_images, *h.shape[1:]).to(h.dtype)
            if not cfg:
                return h + delta
            if plan.branches == "both":
                return h + torch.cat([delta, delta])
            return torch.cat([h[:first], h[first:] + delta])

        return guide

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        h_classifier: "HClassifier | str | os.PathLike | Sequence[HClassifier | str | os.PathLike] | None" = None,
        guidance_mode: str | None = None,
        target_distribution: Any = None,
        target_classes: Any = None,
        guidance_strength: float | list[float] = DEFAULT_GUIDANCE_STRENGTH,
        guidance_steps: tuple[float, float] | list[int] = (0.0, 1.0),
        distribution_solver: str = "assign",
        classifier_temperature: float | None = None,
        guided_branches: str = "cond",
        balance_state: BalanceState | None = None,
        global_batch: bool = False,
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation. The arguments from `prompt` to
        `callback_on_step_end_tensor_inputs`, their defaults, `**kwargs` (the deprecated `callback` and
        `callback_steps`) and the return value are exactly those of [`StableDiffusionPipeline.__call__`]; the
        arguments below are added.

        Args:
            h_classifier (`HClassifier`, `str`, `os.PathLike` or a list of those, *optional*):
                The h-classifier(s) of the attribute(s) to guide: an `HClassifier`, or a local directory / Hub id
                loaded with `HClassifier.from_pretrained` (safetensors only; loaded once and cached on the pipeline,
                again when a local folder's files change). A list guides several attributes at once; then
                `target_distribution` takes one entry per classifier (marginal targets) or one table over the cells
                of their classes (a joint target), `target_classes` one entry per classifier, and
                `guidance_strength` one number or one per classifier.
            guidance_mode (`str`, *optional*):
                `None` (vanilla Stable Diffusion, bit-for-bit), `"sample"` (each image towards a class) or
                `"distribution"` (the batch towards a distribution of classes).
            target_distribution (`list[float]`, `torch.Tensor` or `str`, *optional*):
                Distribution mode: per classifier a probability vector over its classes (non-negative, sums to 1) or
                the name of one class (then every image is guided to it, as in sample mode). With several
                classifiers, a table shaped `[K_1, ..., K_n]` summing to 1 is a joint target over the cells of
                their classes (e.g. skin x glasses, 2 x 2). Needs at least 2 images, or a `balance_state`.
            target_classes (`int`, `str` or `list`, *optional*):
                Sample mode: per classifier one class (index or name) for all images, or a list of one class per
                image (`len == batch size x num_images_per_prompt`, in the order of the output images).
            guidance_strength (`float` or `list[float]`, *optional*, defaults to `DEFAULT_GUIDANCE_STRENGTH`):
                How far h moves per guided step, in class gaps (one number, or one per classifier; >= 0). Each image
                i moves as `h_i' = h_i + s / w * sum_k g_ik a_k`, where `a_k` are the classifier's class anchors at
                this timestep, `g_i = -d L / d z_i` is the direction the guidance loss asks of the image's
                calibrated logits z_i (rows sum to 0; for an image surely of class a asked to become c it is
                `e_c - e_a`: a move by `s` times the gap from anchor a to anchor c), and w is `guidance_scale` when
                only the conditional branch moves (classifier-free guidance amplifies that move by w in the output),
                else 1. The same strength therefore means the same thing for every classifier, CFG scale and
                batch size.
            guidance_steps (`tuple[float, float]` or `list[int]`, *optional*, defaults to `(0.0, 1.0)`):
                Which denoising steps are guided: a tuple `(start, end)` of fractions guides loop steps i with
                `start <= i / num_steps < end`; a list gives explicit step indices (0-based, as in
                `callback_on_step_end`).
            distribution_solver (`str`, *optional*, defaults to `"assign"`):
                Distribution mode: `"assign"` turns the target into exact class counts for the batch (largest
                remainder), assigns each image a class by a min-cost assignment on the calibrated log-probabilities
                (images already of a class keep it; the fewest, cheapest images change; solved again at every
                guided step with a cost for switching), and guides each image to its class. `"kl"` / `"chi2"` are
                the paper's soft losses on the batch mean of `softmax(logits / classifier_temperature)`.
            classifier_temperature (`float`, *optional*):
                Softmax temperature of the soft solvers; defaults to each classifier's `config.temperature` (8, as
                the authors). The default solver and sample mode read calibrated probabilities instead.
            guided_branches (`str`, *optional*, defaults to `"cond"`):
                With classifier-free guidance the UNet sees `[uncond; cond]`. `"cond"` moves only the conditional
                rows; `"both"` moves both rows of each image by the same amount. The classifiers always read the
                conditional rows (the images the user gets).
            balance_state (`BalanceState`, *optional*):
                Distribution mode with `distribution_solver="assign"`: class counts carried across calls. Each call
                is assigned the counts that bring all images so far to the target and adds its images' classes to
                the state. Then a job in small batches (1 included) ends on the target counts; the state saves to JSON.
            global_batch (`bool`, *optional*, defaults to `False`):
                Distribution mode across processes (e.g. `accelerate launch`, one pipeline per GPU): when `True`,
                the guidance statistics are computed over the images of every process's call, as if they were one
                batch: at each guided step every process's logits are gathered (`torch.distributed.all_gather`),
                the target counts are those of the global number of images, the assignment (or the soft solvers'
                batch mean) is solved on all of them, identically on every process, and each process moves its own
                images. A `balance_state` then counts the classes of every process's images and stays the same on
                all of them. Needs torch.distributed initialised and the same call on every process (same
                arguments; each its own prompts and generators, in process order). Sample mode has no batch
                statistics and is unaffected. `False` (default): a single process, torch.distributed is not used.

        Examples:
            ```py
            >>> from pipeline_balancing_act import BalancingActPipeline

            >>> pipe = BalancingActPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
            >>> images = pipe(
            ...     "a photo of a doctor",
            ...     num_images_per_prompt=8,
            ...     h_classifier="user/gender-h-classifier",
            ...     guidance_mode="distribution",
            ...     target_distribution=[0.5, 0.5],
            ... ).images
            ```

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`, as `StableDiffusionPipeline`.
        """
        unknown = sorted(set(kwargs) - {"callback", "callback_steps"})
        if unknown:
            raise TypeError(
                f"BalancingActPipeline.__call__() got unexpected keyword argument(s) {unknown}; see the "
                "StableDiffusionPipeline arguments and h_classifier, guidance_mode, target_distribution, "
                "target_classes, guidance_strength, guidance_steps, distribution_solver, classifier_temperature, "
                "guided_branches, balance_state, global_batch."
            )
        standard = {
            "prompt": prompt,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt,
            "num_images_per_prompt": num_images_per_prompt,
            "eta": eta,
            "generator": generator,
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "ip_adapter_image": ip_adapter_image,
            "ip_adapter_image_embeds": ip_adapter_image_embeds,
            "output_type": output_type,
            "return_dict": return_dict,
            "cross_attention_kwargs": cross_attention_kwargs,
            "guidance_rescale": guidance_rescale,
            "clip_skip": clip_skip,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            **kwargs,
        }
        if guidance_mode is None:
            given = [
                name
                for name, value in (
                    ("h_classifier", h_classifier),
                    ("target_distribution", target_distribution),
                    ("target_classes", target_classes),
                    ("balance_state", balance_state),
                    ("global_batch", global_batch or None),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(f'`{n}`' for n in given)} given without `guidance_mode`: no guidance would be applied. "
                    "Add guidance_mode='distribution' (with target_distribution) or guidance_mode='sample' (with "
                    "target_classes), or drop those arguments for vanilla Stable Diffusion."
                )
            return super().__call__(**standard)
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"`guidance_mode` must be None, 'sample' or 'distribution'; got {guidance_mode!r}.")
        if h_classifier is None:
            raise ValueError(
                f"`guidance_mode={guidance_mode!r}` needs `h_classifier`: an HClassifier, a folder or a Hub id."
            )

        # Same defaults as StableDiffusionPipeline, needed before the loop for the h-shape check.
        if not height or not width:
            sample_size = self.unet.config.sample_size
            size = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
            height, width = size[0] * self.vae_scale_factor, size[1] * self.vae_scale_factor
        if isinstance(prompt, str):
            batch_size = 1
        elif isinstance(prompt, list):
            batch_size = len(prompt)
        elif prompt_embeds is not None:
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = 1  # StableDiffusionPipeline.check_inputs reports the missing prompt
        plan = self.check_guidance_inputs(
            h_classifier,
            guidance_mode,
            target_distribution,
            target_classes,
            guidance_strength,
            guidance_steps,
            distribution_solver,
            classifier_temperature,
            guided_branches,
            balance_state,
            batch_size * (num_images_per_prompt or 1),
            self._denoising_timesteps(num_inference_steps, timesteps, sigmas),
            height,
            width,
            global_batch,
        )

        pre_hook = self.unet.register_forward_pre_hook(self._count_unet_calls(plan), with_kwargs=True)
        try:
            with MidBlockHook(self.unet, self._guide_h(plan)):
                output = super().__call__(**standard)
        finally:
            pre_hook.remove()
        unet_calls = plan.step_index + 1
        if unet_calls != plan.num_steps and not self.interrupt:
            raise RuntimeError(
                f"The UNet ran {unet_calls} times for {plan.num_steps} denoising steps: guidance counts UNet calls to "
                "know the step, so a callback that calls the UNet (or skips steps) puts the guided window on the "
                "wrong steps. Call the UNet outside the pipeline call."
            )
        if balance_state is not None and plan.final_classes is not None:
            final = plan.final_classes
            if plan.process_rows is not None:  # every process's images, so the state stays the same on all of them
                final = [_all_gather_rows(classes, plan.process_rows) for classes in final]
            balance_state.update(plan.groups, final)
        return output
