# Copyright 2026 The Balancing Act diffusers contributors. Licensed under the Apache License, Version 2.0.
"""Balancing Act: distribution-guided debiasing for Stable Diffusion (Parihar et al., CVPR 2024).

A single-file diffusers community pipeline: it imports only the standard library, numpy, torch and diffusers, so that
`DiffusionPipeline.from_pretrained(..., custom_pipeline=...)` loads it on its own. In order, it defines:

- `HClassifier`: per-timestep linear heads over the UNet bottleneck h = `unet.mid_block(...)`, flat or pooled
  (`_read_h`, `_pool_lift`), with a calibration and class anchors (`ModelMixin` + `ConfigMixin`: safetensors + json);
- `largest_remainder` / `assign_classes`: exact class counts for a batch and the min-cost assignment of images to
  them; `BalanceState`: the counts carried across calls;
- `MidBlockHook`: reads and replaces h for the calls of the context that activated it (`install_h_hook` keeps the
  hook in a compiled UNet); `guidance_loss` and `logit_directions`, its gradient in closed form;
- `GuidanceArguments` / `GUIDANCE_ARGS_DOCSTRING`: the Balancing Act arguments of a call, declared and documented
  once; `GuidanceSettings` / `_GuidanceRun`: a guided call's validated settings and its per-call state;
- `BalancingActMixin`: the checks and start of a guided call, shared with the unconditional and SDXL pipelines;
  `BalancingActPipeline`: `StableDiffusionPipeline` plus h-space guidance.
"""

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import PipelineImageInput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.utils import logging, replace_example_docstring


logger = logging.get_logger(__name__)

DEFAULT_TEMPERATURE = 8.0  # softmax temperature of the paper's soft distribution loss ("kl" / "chi2")
DEFAULT_GUIDANCE_STRENGTH = 5.0  # class gaps per step, chosen on the toy world (docs/lab/results/sweep_strength.md)
MAX_GUIDANCE_STRENGTH = 50.0  # far past it, h leaves the decoder's range and images turn to noise (docs/guidance.md)
GUIDANCE_MARGIN = 2.0  # the class loss counts an image as of its class once that class leads by this many logits
# Cost (nats) of moving an image to another class when the assignment is solved again at a later step: predictions
# sharpen, but an image does not flip back and forth between classes.
SWITCH_PENALTY = 1.0
GUIDANCE_MODES = ("sample", "distribution")
HOLD = "hold"  # the target of a classifier that is held, not guided: the guided moves leave its logits unchanged
DISTRIBUTION_SOLVERS = ("assign", "kl", "chi2")
GUIDED_BRANCHES = ("cond", "both")
TARGET_SUM_TOLERANCE = 1e-3
TARGET_PROB_FLOOR = 1e-3  # target probabilities are clamped to at least this in the soft losses
MID_BLOCK_SITE = "mid_block"  # where h is read and moved; a classifier's config keeps the key `site` of old versions


def mid_block_h_shape(unet: torch.nn.Module, latent_height: int, latent_width: int) -> list[int]:
    """The per-sample shape `[C, H, W]` of h for a UNet input of `latent_height` x `latent_width`, read from the
    UNet's blocks: each downsampler (3x3 conv, stride 2, padding 1) maps n to ceil(n / 2)."""
    if getattr(unet, "mid_block", None) is None:
        raise ValueError("This UNet has no mid block; Balancing Act guidance needs one (h is its output).")
    size = [int(latent_height), int(latent_width)]
    for block in unet.down_blocks:
        if getattr(block, "downsamplers", None):
            size = [math.ceil(n / 2) for n in size]
    return [int(unet.config.block_out_channels[-1]), *size]


def _read_h(h: torch.Tensor, pool_size: int | None) -> torch.Tensor:
    """What the heads read of h `[B, C, H, W]`, float32 `[B, D]`: h flattened, or first average-pooled to g x g."""
    return (h if pool_size is None else F.adaptive_avg_pool2d(h.float(), pool_size)).flatten(1).float()


def _pool_lift(n: int, g: int) -> torch.Tensor:
    """`U` `[n, g]`, the min-norm right inverse of adaptive average pooling of a length n to g (`pool(U d) == d`):
    `U = P^T (P P^T)^-1` for torch's pooling matrix P `[g, n]` (cell i averages floor(i n / g) .. ceil((i + 1) n / g));
    when g divides n it spreads each value over its cell (nearest-neighbour upsampling)."""
    pool = F.adaptive_avg_pool1d(torch.eye(n, dtype=torch.float64)[None], g)[0].T  # torch's own cells
    return (pool.T @ torch.linalg.inv(pool @ pool.T)).float()


# --- The h-classifier -----------------------------------------------------------------------------------------------


class HClassifier(ModelMixin, ConfigMixin):
    r"""
    Per-timestep linear heads over the UNet bottleneck h, flat or pooled: `logits = W_t @ read(h) + b_t`, a timestep
    using the head of the nearest trained one. Guidance needs two more per-timestep parts, which `balancing-act train`
    writes: a calibration (`logits * scale_t + bias_t`, whose softmax estimates the class probabilities of the final
    image) and class anchors `[T, K, D]` (a point per class in what the heads read; guidance moves along them).

    Args:
        attribute (`str`): Name of the attribute, e.g. `"skin"`.
        class_names (`list[str]`): The K >= 2 class names; class index = position in this list.
        h_shape (`list[int]`): The shape `[C, H, W]` of one sample's h.
        timesteps (`list[int | float]`): The scheduler timesteps of the heads.
        temperature (`float`, defaults to 8.0): Softmax temperature of the paper's soft distribution loss.
        base_model (`str`, *optional*): The model the heads were trained on (Hub id or folder name).
        calibration_scale, calibration_bias (*optional*): Per head, the factor on the logits and K offsets after it.
        anchor_source (`str`, *optional*): How the anchors were made; `None`: the classifier has no anchors.
        site (`str`, defaults to `"mid_block"`): Kept from older versions; only `"mid_block"` is accepted.
        pool_size (`int`, *optional*): `None`: the heads read `h.flatten(1)`, so h must have the shape `h_shape`. An
            int g: they read `adaptive_avg_pool2d(h, g).flatten(1)` (D = C * g * g), so they read h of any height and
            width >= g with `h_shape`'s C channels (any resolution of the model); guidance lifts a move made in that
            pooled space back to h by the min-norm right inverse of the pooling.
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
        site: str = MID_BLOCK_SITE,
        pool_size: int | None = None,
    ):
        super().__init__()
        if site != MID_BLOCK_SITE:
            raise ValueError(
                f"This classifier reads h at site {site!r}; only {MID_BLOCK_SITE!r} is supported (up-block sites were "
                "removed: they broke more images than they fixed). Retrain it with `balancing-act extract` / `train`."
            )
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
        if pool_size is not None and not (type(pool_size) is int and 1 <= pool_size <= min(h_shape[1:])):
            raise ValueError(f"`pool_size` must be None or an integer from 1 to min(h_shape[1:]), got {pool_size!r}.")
        num_heads, num_classes = len(timesteps), len(class_names)
        dim = math.prod(h_shape) if pool_size is None else h_shape[0] * pool_size**2
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
        """Store per-head class anchors `[T, K, D]` (or `[T, K, C, H, W]` of the features read) made by `source`."""
        expected = tuple(self.weight.shape)
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
        """Index of the head trained at the timestep nearest to `timestep` (an int, a float or a tensor with one
        value; the first head on a tie)."""
        if isinstance(timestep, torch.Tensor):
            flat = timestep.detach().flatten()
            if flat.numel() == 0:
                raise ValueError("`timestep` is an empty tensor; expected a scalar timestep.")
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise ValueError(f"`timestep` must be one value for the whole batch, got {flat.tolist()}.")
            value = float(flat[0].item())
        else:
            try:
                if isinstance(timestep, (bool, str, bytes)):
                    raise TypeError
                value = float(timestep)  # int, float and numpy scalars
            except (TypeError, ValueError):
                raise TypeError(
                    f"`timestep` must be an int, a float or a tensor, got {type(timestep).__name__}."
                ) from None
        return int(torch.argmin((self._timesteps - value).abs()).item())

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

    def h_shape_mismatch(self, shape: Sequence[int], batch: str = "") -> str | None:
        """None when the heads read h of per-sample shape `shape` (`h_shape`; pooled: any [C, H, W] with its C and
        H, W >= `pool_size`), else what they read, for an error message (`batch` prefixes the shape, e.g. "B, ")."""
        c, g = list(self.config.h_shape), self.config.get("pool_size")
        if list(shape) == c or (g is not None and len(shape) == 3 and shape[0] == c[0] and min(shape[1:]) >= g):
            return None
        if g is None:
            return f"was trained on h of shape [{batch}{', '.join(map(str, c))}]"
        return f"reads h of shape [{batch}{c[0]}, H, W] with H, W >= {g} (average-pooled to {g}x{g})"

    def forward(self, h: torch.Tensor, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """Raw logits `[B, K]` (float32) of the head nearest to `timestep` for h `[B, C, H, W]`. The head runs in
        float32 on h's device (the classifier itself is not moved); gradients flow to h and to the parameters."""
        mismatch = self.h_shape_mismatch(h.shape[1:] if h.ndim == 4 else (), "B, ")
        if mismatch is not None:
            raise ValueError(f"h has shape {list(h.shape)} but this classifier {mismatch}.")
        index = self.head_index(timestep)
        weight, bias = (p[index].to(device=h.device, dtype=torch.float32) for p in (self.weight, self.bias))
        return F.linear(_read_h(h, self.config.pool_size), weight, bias)

    def calibrated_logits(self, h: torch.Tensor, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """Calibrated logits `[B, K]`: softmax of them estimates the class probabilities of the final images."""
        scale, bias = (c[self.head_index(timestep)].to(h.device) for c in self._calibration)
        return self(h, timestep) * scale + bias

    def check_guidance_ready(self) -> None:
        """Raise a one-line `ValueError` unless this classifier has the calibration and class anchors guidance needs."""
        calibrated = self.config.calibration_scale is not None and self.config.calibration_bias is not None
        missing = [name for name, ok in (("calibration", calibrated), ("anchors", self.has_anchors)) if not ok]
        if missing:
            raise ValueError(
                f"h-classifier {self.config.attribute!r} has no {' and no '.join(missing)} (saved by an older version): "
                "retrain it with `balancing-act train --features-dir <its features> --output-dir <folder>`."
            )

    def move_directions(self, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """The K class anchors `[K, D]` (float32) of the head nearest to `timestep`."""
        self.check_guidance_ready()
        return self.anchors[self.head_index(timestep)].float()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """`ModelMixin.save_pretrained` as one unit: written to a new folder (with the other files of an existing
        `save_directory` carried over) that replaces the old one by two renames, so that an interrupted save leaves
        the old classifier or the new one. `push_to_hub=True` then uploads it (`repo_id`, `commit_message`, `private`,
        `token`, `create_pr` go to `push_to_hub`)."""
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("`safe_serialization=False` is not supported: HClassifier weights are safetensors.")
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr") if k in kwargs
        }
        target = os.path.abspath(save_directory)
        parent, name = os.path.split(target)
        os.makedirs(parent, exist_ok=True)
        new = tempfile.mkdtemp(dir=parent, prefix=f".{name}.new-")
        try:
            super().save_pretrained(new, **kwargs)
            if os.path.isdir(target):
                for entry in os.listdir(target):  # carry over what the save did not write (a model card, metrics)
                    if not os.path.exists(os.path.join(new, entry)):
                        source = os.path.join(target, entry)
                        carry = shutil.copytree if os.path.isdir(source) else shutil.copy2
                        carry(source, os.path.join(new, entry))
                old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
                os.rename(target, os.path.join(old, name))
                try:
                    os.rename(new, target)
                except BaseException:
                    os.rename(os.path.join(old, name), target)  # put the previous classifier back
                    raise
                finally:
                    if os.path.isdir(target):
                        shutil.rmtree(old)
            else:
                os.rename(new, target)
        finally:
            if os.path.isdir(new):
                shutil.rmtree(new)
        if push_to_hub:
            self.push_to_hub(hub_kwargs.pop("repo_id", name), **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "HClassifier":
        """Load from a directory written by `save_pretrained` or a Hub id: safetensors only (pickled checkpoints are
        refused, never unpickled), with the calibration and anchors guidance needs."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            raise ValueError(
                f"`h_classifier` {path!r} is a file; expected a directory written by `HClassifier.save_pretrained` "
                "(config.json + diffusion_pytorch_model.safetensors) or a Hub id. Pickled checkpoints (.pt, .pth, "
                ".bin, .ckpt) are refused because unpickling can run arbitrary code."
            )
        if not os.path.isdir(path) and (looks_like_local_path(path) or kwargs.get("local_files_only")):
            raise FileNotFoundError(
                f"`h_classifier` {path!r} does not exist; expected a directory written by `HClassifier.save_pretrained` "
                "or a Hub id such as 'user/repo'."
            )
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors=False` is not supported: HClassifier loads safetensors weights only.")
        kwargs["use_safetensors"] = True
        try:
            classifier = super().from_pretrained(path, **kwargs)
        except (OSError, EnvironmentError) as error:
            raise OSError(
                f"Could not load `h_classifier` {path!r}: expected a directory or Hub repo with config.json and "
                f"diffusion_pytorch_model.safetensors (written by `HClassifier.save_pretrained`). Cause: {error}"
            ) from error
        classifier.check_guidance_ready()
        return classifier


def looks_like_local_path(path: str | os.PathLike) -> bool:
    """Whether `path` names a local path rather than a Hub id ('user/name'): absolute, starting with '.' or '~',
    ending with a separator, with more than one '/', or with a parent directory that exists here."""
    path = os.fspath(path)
    if os.path.isabs(path) or path.startswith((".", "~")) or path.endswith(("/", os.sep)):
        return True
    if path.replace(os.sep, "/").count("/") > 1:  # a Hub id has at most one
        return True
    return os.path.isdir(os.path.dirname(path) or ".")


# --- Exact class counts: apportionment, assignment, and the state carried across calls ------------------------------


def largest_remainder(probabilities: Sequence[float] | torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts summing to `total` in the proportions `probabilities` (Hamilton's largest-remainder method:
    floors first, then one more for the largest remainders; ties go to the lower class index)."""
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


def apportion(counts: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """`counts` `[K]` (integers summing to N) rescaled to integers summing to `total` (a 0-d integer tensor, <= N) by
    largest remainder (ties to the lower class index), in integer arithmetic on the tensors' device (no host read).
    Used when some rows of a batch cannot be assigned."""
    counts = counts.long()
    scaled = counts * total.long()
    num_rows = counts.sum().clamp_min(1)
    floors, remainders = scaled // num_rows, scaled % num_rows
    rank = torch.argsort(torch.argsort(-remainders, stable=True), stable=True)  # 0 = largest remainder
    return floors + (rank < total.long() - floors.sum()).long()


def assign_classes(cost: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """The assignment (LongTensor [N] on `cost`'s device) of N rows to K classes, `counts[k]` rows in class k, that
    minimises the summed `cost[i, class_i]`. A row with a non-finite cost is not assigned (-1); the others share the
    counts rescaled to their number (`apportion`). K = 2 is solved on the device with no host read, K >= 3 on the
    host (`_transport_on_host`) from one copy of the cost."""
    if cost.ndim != 2:
        raise ValueError(f"`cost` must be [N, K], got shape {list(cost.shape)}.")
    num_rows, num_classes = cost.shape
    counts = [int(c) for c in counts]
    if len(counts) != num_classes or min(counts) < 0 or sum(counts) != num_rows:
        raise ValueError(f"`counts` must be K = {num_classes} non-negative integers summing to N = {num_rows}.")
    return _assign_checked(cost, counts, torch.tensor(counts, device=cost.device))


def _assign_checked(cost: torch.Tensor, counts: list[int], device_counts: torch.Tensor) -> torch.Tensor:
    """`assign_classes` for checked counts, also given as a tensor on `cost`'s device (made once per call)."""
    if cost.shape[1] == 2:
        finite = torch.isfinite(cost).all(dim=1)
        wanted = apportion(device_counts, finite.sum())
        # rank of each row by its gain from class 1 (stable: ties keep row order), non-finite rows last
        gain = torch.where(finite, cost[:, 1] - cost[:, 0], torch.inf)
        rank = torch.argsort(torch.argsort(gain, stable=True), stable=True)
        return torch.where(finite, (rank < wanted[1]).long(), -1)
    host = cost.detach().cpu().double()  # the one copy to the host
    finite = torch.isfinite(host).all(dim=1)
    wanted = apportion(torch.tensor(counts), finite.sum())
    solution = torch.full((cost.shape[0],), -1, dtype=torch.long)
    if bool(finite.any()):
        rows = finite.nonzero().flatten()
        solution[rows] = torch.as_tensor(_transport_on_host(host[rows].numpy(), wanted.numpy()))
    return solution.to(cost.device, non_blocking=True)


# Rounds of class-price updates that start the host solver close to the optimal assignment.
PRICE_ROUNDS = 3


def _transport_on_host(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact min-cost assignment with class counts for a finite cost. Each row to its cheapest class after a price per
    class is optimal for the counts it gives, so the solver sets the prices (each update makes one class's count
    right given the others), then repairs what excess remains by shortest paths on the K classes (Bellman-Ford),
    one row's worth per repair: at most N repairs; more is a bug, raised as one."""
    if not np.isfinite(cost).all():
        raise ValueError("The assignment solver needs a finite cost; `assign_classes` leaves non-finite rows out.")
    num_rows, num_classes = cost.shape
    prices = np.zeros(num_classes)
    for _ in range(PRICE_ROUNDS):
        for k in range(num_classes):
            others = cost - prices
            others[:, k] = np.inf
            gap = cost[:, k] - others.min(1)  # a row prefers k exactly when its gap is below k's price
            need = counts[k]
            if need == 0:
                prices[k] = gap.min() - 1.0
            elif need == num_rows:
                prices[k] = gap.max() + 1.0
            else:
                part = np.partition(gap, (need - 1, need))
                prices[k] = 0.5 * (part[need - 1] + part[need])
    assigned = np.argmin(cost - prices, axis=1)
    rows, classes = np.arange(num_rows), np.arange(num_classes)
    for _ in range(num_rows + 1):
        excess = np.bincount(assigned, minlength=num_classes) - counts
        if not (excess > 0).any():
            return assigned
        # move[u, v]: cheapest change of cost when one row of class u moves to class v, and that row.
        delta = cost - cost[rows, assigned][:, None]
        move = np.full((num_classes, num_classes), np.inf)
        row_of = np.zeros((num_classes, num_classes), dtype=np.int64)
        for u in range(num_classes):
            members = np.flatnonzero(assigned == u)
            if len(members):
                best = members[delta[members].argmin(0)]
                move[u], row_of[u] = delta[best, classes], best
        np.fill_diagonal(move, np.inf)
        dist = np.where(excess > 0, 0.0, np.inf)
        previous = np.full(num_classes, -1)
        for _ in range(num_classes):
            candidates = dist[:, None] + move
            source = candidates.argmin(0)
            candidate = candidates[source, classes]
            better = candidate < dist - 1e-12
            if not better.any():
                break
            dist, previous = np.where(better, candidate, dist), np.where(better, source, previous)
        target = int(np.argmin(np.where(excess < 0, dist, np.inf)))
        if not np.isfinite(dist[target]):
            break
        while previous[target] != -1:
            source = int(previous[target])
            assigned[row_of[source, target]] = target
            target = source
    raise RuntimeError(
        f"The assignment solver did not reach the class counts {counts.tolist()} within {num_rows} repairs; please "
        "report this with the cost matrix."
    )


class BalanceState:
    r"""
    Class counts of the images generated so far, for a job generated in several calls: pass the same state to every
    call (`balance_state=state`). Each call is assigned the counts that bring the whole job closest to the target, and
    adds the classes of its images as the classifier reads them at the last step; so the job ends on the target
    counts whatever the batch size. Only calls that finish add anything, and images whose h was not finite at the last
    step are not counted. A state is tied to the classifiers and target kind (marginal or joint) of its first use.

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
            missing = (largest_remainder(target.flatten(), int(so_far.sum()) + num_images) - so_far).clamp_min(0)
            # Classes over their share get nothing; the others share the batch in proportion to what they lack.
            result.append(largest_remainder(missing, num_images) if int(missing.sum()) > num_images else missing)
        return result

    def update(self, groups: list[dict[str, Any]], classes: list[torch.Tensor]) -> None:
        """Add one class (joint: cell index) per image and group; -1 (h not finite) is not counted."""
        self._check_groups(groups)
        for i, values in enumerate(classes):
            values = values.cpu().long()
            self.counts[i] = self.counts[i] + torch.bincount(values[values >= 0], minlength=self.counts[i].numel())

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
        fd, tmp = tempfile.mkstemp(
            dir=os.path.dirname(os.path.abspath(path)), prefix=".balance-state-", suffix=".json"
        )
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


# --- h capture / replacement ----------------------------------------------------------------------------------------

# The (module, h function) pairs active in this context (thread, asyncio task), in activation order.
_ACTIVE_H_FUNCTIONS: contextvars.ContextVar[tuple[tuple[torch.nn.Module, Callable], ...]] = contextvars.ContextVar(
    "balancing_act_h_functions", default=()
)


@torch.compiler.disable
def _h_dispatch_hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """The forward hook on `unet.mid_block`: passes h to the functions active for it in the calling context. Outside
    any compiled graph (`torch.compiler.disable`), so what it does can change without recompiling."""
    active = _ACTIVE_H_FUNCTIONS.get()
    if not active:
        return None
    h = output
    for owner, fn in active:
        if owner is not module:
            continue
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"`{type(module).__name__}` returned {type(h).__name__}; expected a tensor h.")
        new = fn(h)
        if new is not None:
            if not isinstance(new, torch.Tensor) or new.shape != h.shape:
                raise ValueError(
                    f"An h function must return None or a tensor of h's shape {list(h.shape)}, got "
                    f"{list(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__}."
                )
            h = new
    return None if h is output else h


@dataclasses.dataclass
class _HookRecord:
    handle: Any  # the RemovableHandle of the dispatch hook
    users: int = 0  # activations (calls) in progress, in any thread
    kept: bool = False  # installed by the user (`install_h_hook`): stays until `remove_h_hook`


# The modules that carry the dispatch hook now, and why; weak keys keep no module alive. Guarded by `_HOOKS_LOCK`.
_HOOKS: "weakref.WeakKeyDictionary[torch.nn.Module, _HookRecord]" = weakref.WeakKeyDictionary()
_HOOKS_LOCK = threading.Lock()


def _use_hook(module: torch.nn.Module, kept: bool, add: bool) -> None:
    """Add or remove a use of the dispatch hook on `module`: a call in progress, or (`kept`) the user's keep. The
    hook is on the module exactly while it has a use."""
    with _HOOKS_LOCK:
        record = _HOOKS.get(module)
        if record is None:
            if not add:
                return
            record = _HOOKS[module] = _HookRecord(module.register_forward_hook(_h_dispatch_hook))
        if kept:
            record.kept = add
        else:
            record.users += 1 if add else -1
        if record.users <= 0 and not record.kept:
            record.handle.remove()
            del _HOOKS[module]


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` runs compiled: returned by `torch.compile` or compiled in place (`module.compile()`)."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def install_h_hook(module: torch.nn.Module) -> None:
    """Keep Balancing Act's hook on `module` (`pipe.unet.mid_block`) until `remove_h_hook`; call it before you
    `torch.compile` the UNet (otherwise a guided call installs the hook for its duration only)."""
    _use_hook(module, kept=True, add=True)


def remove_h_hook(module: torch.nn.Module) -> None:
    """Undo `install_h_hook`: the hook leaves `module` (once no guided call in progress still uses it)."""
    _use_hook(module, kept=True, add=False)


def has_h_hook(module: torch.nn.Module, kept_only: bool = False) -> bool:
    """Whether Balancing Act's hook is on `module` (with `kept_only`: installed by `install_h_hook`)."""
    with _HOOKS_LOCK:
        record = _HOOKS.get(module)
        return record is not None and (record.kept or not kept_only)


class MidBlockHook:
    r"""
    Context manager: while active, every `unet.mid_block` output h computed in this context (thread) is passed to
    `fn(h)`; a returned tensor replaces h for the rest of the UNet, `None` keeps it. Other threads' calls are not
    seen; several activations run in the order they were entered, each on the h the previous one returned.

    Example (recording h):
        ```py
        hs = []
        with MidBlockHook(pipe.unet, lambda h: hs.append(h.detach().cpu())):
            pipe(prompt)
        ```
    """

    def __init__(self, unet: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        if getattr(unet, "mid_block", None) is None:
            raise ValueError("`unet` has no `mid_block`; h-space guidance needs a UNet with a mid block.")
        self.module = unet.mid_block
        self.fn = fn
        self._entry: tuple[torch.nn.Module, Callable] | None = None

    def __enter__(self) -> "MidBlockHook":
        if self._entry is not None:
            raise RuntimeError("This MidBlockHook is already active.")
        _use_hook(self.module, kept=False, add=True)
        self._entry = (self.module, self.fn)
        _ACTIVE_H_FUNCTIONS.set((*_ACTIVE_H_FUNCTIONS.get(), self._entry))
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        if self._entry is not None:
            _ACTIVE_H_FUNCTIONS.set(tuple(e for e in _ACTIVE_H_FUNCTIONS.get() if e is not self._entry))
            self._entry = None
            _use_hook(self.module, kept=False, add=False)


# --- The guidance loss, and the direction it asks of the logits -----------------------------------------------------


def guidance_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "classes",
    temperature: float = DEFAULT_TEMPERATURE,
    margin: float = GUIDANCE_MARGIN,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    The guidance loss over `logits` `[N, K]` (0-d, float32); guidance follows its negative gradient in the logits
    (`logit_directions`). `valid` (bool `[N]`) leaves rows out, as are rows with non-finite logits or class -1.

    - `loss="classes"`: `targets` holds each image's class c_i and `L = sum_i CE(z_i - margin * e_{c_i}, c_i)`: the
      handicap keeps the gradient from vanishing for an image confidently of another class (the paper's `-p[c]`
      saturates there), until class c leads by the margin.
    - `loss="kl"` / `"chi2"` (the paper's distribution loss): `targets` is a probability vector p_ref and
      `L = N * temperature * D(mean_i softmax(z_i / temperature), p_ref)`, in the units of `"classes"` per image.
    """
    logits, targets, valid = _loss_inputs(logits, targets, loss, temperature, valid)
    if loss == "classes":
        per_row = F.cross_entropy(
            logits - margin * _one_hot(targets, logits.shape[1]), targets.clamp_min(0), reduction="none"
        )
        return torch.where(valid, per_row, 0.0).sum()
    p = torch.where(valid[:, None], torch.softmax(logits / temperature, dim=1), 0.0)
    num_valid = valid.sum()
    p_hat = p.sum(dim=0) / num_valid.clamp_min(1)
    if loss == "kl":
        divergence = (p_hat * (p_hat.clamp_min(1e-12).log() - targets.log())).sum()
    else:
        divergence = ((p_hat - targets) ** 2 / targets).sum()
    return num_valid * temperature * divergence


def logit_directions(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: str = "classes",
    temperature: float = DEFAULT_TEMPERATURE,
    margin: float = GUIDANCE_MARGIN,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`-d guidance_loss / d logits` `[N, K]` (float32) in closed form, with no autograd and no host read: the class
    loss gives `e_c - softmax(z - margin e_c)`, the soft losses `-p_ij (a_j - sum_k p_ik a_k)` with
    `p_i = softmax(z_i / T)` and `a = dD / dp_hat` at their mean."""
    logits, targets, valid = _loss_inputs(logits, targets, loss, temperature, valid)
    if loss == "classes":
        asked = _one_hot(targets, logits.shape[1])
        directions = asked - torch.softmax(logits - margin * asked, dim=1)
    else:
        p = torch.where(valid[:, None], torch.softmax(logits / temperature, dim=1), 0.0)
        p_hat = p.sum(dim=0) / valid.sum().clamp_min(1)
        if loss == "kl":  # the derivative of p log(max(p, 1e-12)): the clamp passes no gradient below 1e-12
            slope = p_hat.clamp_min(1e-12).log() - targets.log() + (p_hat >= 1e-12).float()
        else:
            slope = 2.0 * (p_hat - targets) / targets
        directions = -p * (slope - (p * slope).sum(dim=1, keepdim=True))
    return torch.where(valid[:, None], directions, 0.0)


def _one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    # a comparison, not F.one_hot, which checks the class range on the host (a device synchronisation on CUDA)
    return (classes[:, None] == torch.arange(num_classes, device=classes.device)).float()


def _loss_inputs(
    logits: torch.Tensor, targets: torch.Tensor, loss: str, temperature: float, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss's logits (float32), targets and rows read, checked on shapes only (no device value read)."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"`logits` must have shape [N, K] with K >= 2, got {list(logits.shape)}.")
    logits = logits.float()
    if loss == "classes":
        targets = torch.as_tensor(targets, device=logits.device).long().flatten()
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"`targets` must hold one class per row ({logits.shape[0]}), got {targets.shape[0]}.")
    else:
        if loss not in ("kl", "chi2"):
            raise ValueError(f"`loss` must be one of ['classes', 'kl', 'chi2'], got {loss!r}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a positive number, got {temperature}.")
        targets = torch.as_tensor(targets, device=logits.device, dtype=torch.float32).flatten()
        if targets.shape[0] != logits.shape[1]:
            raise ValueError(f"`targets` must be a {logits.shape[1]}-vector, got {targets.shape[0]} entries.")
        targets = targets.clamp_min(TARGET_PROB_FLOOR)
    finite = torch.isfinite(logits).all(dim=1)
    valid = finite if valid is None else finite & valid
    return logits, targets, valid & (targets >= 0) if loss == "classes" else valid


# --- A guided call: its arguments (declared and documented once), its settings and its per-call state -------------


@dataclasses.dataclass
class GuidanceArguments:
    """The Balancing Act arguments of a pipeline call and their defaults (`GUIDANCE_ARGS_DOCSTRING`). The checked copy
    `check_guidance_inputs` returns has one float strength per classifier and the steps and temperature normalised."""

    h_classifier: "HClassifier | str | os.PathLike | Sequence[HClassifier | str | os.PathLike] | None" = None
    guidance_mode: str | None = None
    target_distribution: Any = None
    target_classes: Any = None
    guidance_strength: float | Sequence[float] = DEFAULT_GUIDANCE_STRENGTH
    guidance_steps: tuple[float, float] | Sequence[int] = (0.0, 1.0)
    distribution_solver: str = "assign"
    classifier_temperature: float | None = None
    guided_branches: str = "cond"
    balance_state: BalanceState | None = None
    global_batch: bool = False
    _checked: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_call(cls, arguments: dict[str, Any]) -> "GuidanceArguments":
        """The Balancing Act arguments of a call, from its `locals()` (one a pipeline does not take: its default)."""
        return cls(**{name: arguments[name] for name in cls.names() if name in arguments})


# The Args entries of the Balancing Act arguments, indented for a pipeline's `__call__` docstring:
# `guidance_args_docstring` keeps those the pipeline takes and fills in its {unguided}, {images}, {strength_divisor}.
GUIDANCE_ARGS_DOCSTRING = """
            h_classifier (`HClassifier`, `str`, `os.PathLike` or a list of those, *optional*):
                The h-classifier(s) of the attribute(s) to guide, trained on this UNet's h: an `HClassifier`, or a
                local directory / Hub id loaded with `HClassifier.from_pretrained` (safetensors only; cached on the
                pipeline, loaded again when a local folder's files change). A list guides several attributes at
                once: then `target_distribution` takes one entry per classifier (marginal targets) or one table over
                the cells of their classes (a joint target), `target_classes` one entry per classifier, and
                `guidance_strength` one number or one per classifier. A classifier whose entry is `"hold"` is held,
                not guided: every guided move of h loses its components along the held classifier's class
                directions (its head's weight differences at that step), so its reading of that step's h stays.
            guidance_mode (`str`, *optional*):
                `None` ({unguided}, bit-for-bit), `"sample"` (each image towards a class) or `"distribution"` (the
                batch towards a distribution of classes).
            target_distribution (`list[float]`, `torch.Tensor` or `str`, *optional*):
                Distribution mode: per classifier a probability vector over its classes (non-negative, sums to 1) or
                the name of one class (every image is guided to it). With several classifiers, a table shaped
                `[K_1, ..., K_n]` summing to 1 is a joint target over the cells of their classes (e.g. skin x
                glasses, 2 x 2). Needs at least 2 images, or a `balance_state`.
            target_classes (`int`, `str` or `list`, *optional*):
                Sample mode: per classifier one class (index or name) for all images, or a list of one class per
                image (`len == {images}`, in the order of the output images).
            guidance_strength (`float` or `list[float]`, *optional*, defaults to `{strength_default}`):
                How far h moves per guided step, in class gaps (one number, or one per classifier; 0 to
                `MAX_GUIDANCE_STRENGTH`): image i moves as `h_i' = h_i + s / w * sum_k g_ik a_k`, where `a_k` are the
                classifier's class anchors at this timestep, `g_i = -d L / d z_i` the direction the guidance loss
                asks of the image's calibrated logits z_i (`e_c - e_a` for an image surely of class a asked to be
                c: a move by s times the gap from anchor a to anchor c), and w is {strength_divisor}.
            guidance_steps (`tuple[float, float]` or `list[int]`, *optional*, defaults to `(0.0, 1.0)`):
                The guided steps: a tuple `(start, end)` of fractions guides loop steps i with
                `start <= i / num_inference_steps < end`; a list gives step indices (0-based, as in callbacks).
            distribution_solver (`str`, *optional*, defaults to `"assign"`):
                Distribution mode: `"assign"` turns the target into exact class counts for the batch (largest
                remainder), assigns each image a class by a min-cost assignment on the calibrated log-probabilities
                (solved again at every guided step, with a cost for switching) and guides each image to its class.
                `"kl"` / `"chi2"` are the paper's soft losses on the batch mean of `softmax(logits / temperature)`.
            classifier_temperature (`float`, *optional*):
                The soft solvers' softmax temperature; defaults to each classifier's `config.temperature` (8).
            guided_branches (`str`, *optional*, defaults to `"cond"`):
                With classifier-free guidance the UNet sees `[uncond; cond]`: `"cond"` moves only the conditional
                rows, `"both"` both rows of each image by the same amount. The classifiers read the conditional rows.
            balance_state (`BalanceState`, *optional*):
                Distribution mode with `distribution_solver="assign"`: class counts carried across calls, so that a
                job generated in small batches (1 included) ends on the target counts; saves to JSON.
            global_batch (`bool`, *optional*, defaults to `False`):
                Distribution mode across processes (e.g. `accelerate launch`): the logits of every process's images
                are gathered at each guided step and the counts, the assignment (or the soft solvers' batch mean)
                and a `balance_state` are those of all of them, identically on every process; each process moves its
                own images. Needs torch.distributed initialised and the same call on every process (each with its
                own inputs and generators).
"""


def guidance_args_docstring(**words: str) -> Callable:
    """Like diffusers' `replace_example_docstring`: ends the `Args:` section of a pipeline's `__call__` docstring
    (before its `Examples:` line) with the `GUIDANCE_ARGS_DOCSTRING` entries of the arguments it takes."""

    def decorator(fn: Callable) -> Callable:
        lines = fn.__doc__.split("\n")
        args = next((i for i, line in enumerate(lines) if re.fullmatch(r"\s*Args:\s*", line)), None)
        end = next((i for i, line in enumerate(lines) if re.fullmatch(r"\s*Examples?:\s*", line)), None)
        if args is None or end is None or end < args:
            raise ValueError(f"The docstring of {fn} needs an 'Args:' line and, after it, an 'Examples:' line.")
        while end > args + 1 and not lines[end - 1].strip():  # after the pipeline's own entries
            end -= 1
        words.setdefault("strength_default", "DEFAULT_GUIDANCE_STRENGTH")  # the unconditional pipeline's differs
        entries = re.split(r"\n(?=\s{12}\S)", GUIDANCE_ARGS_DOCSTRING.strip("\n").format(**words))
        ours = [entry for entry in entries if entry.split()[0] in inspect.signature(fn).parameters]
        fn.__doc__ = "\n".join([*lines[:end], *ours, *lines[end:]])
        return fn

    return decorator


def _all_gather_rows(rows: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The `rows` `[n_p, ...]` of every process in process order (`sizes`: each n_p; padded to the longest for
    `all_gather`, through the CPU on gloo)."""
    import torch.distributed as dist

    device = torch.device("cpu") if dist.get_backend() == "gloo" else rows.device
    padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(rows.device)


def _fmt(values: Any) -> str:
    """Numbers for an error message, without float32 noise (0.6, not 0.6000000238418579)."""
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    if isinstance(values, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in values) + "]"
    return f"{values:.6g}" if isinstance(values, float) else str(values)


@dataclasses.dataclass(frozen=True)
class GuidanceSettings:
    """What a guided call asked for, validated, with its classifiers loaded. A "group" is what one solver balances: one
    classifier, or all of them together for a joint target."""

    classifiers: tuple[HClassifier, ...]
    mode: str  # "sample" or "distribution"
    solver: str  # "classes" in sample mode, else the distribution solver
    joint: bool
    # distribution: per group a probability tensor (joint: shaped [K_1, ..., K_n]); sample: per classifier a list of
    # class indices, one for every image or one per image
    targets: tuple[Any, ...]
    strengths: tuple[float, ...]
    temperatures: tuple[float, ...]
    steps: tuple[float, float] | tuple[int, ...]
    branches: str
    balance_state: BalanceState | None
    global_batch: bool
    # classifiers whose target is HOLD: read at the guided steps, their logit directions projected out of every move
    held: tuple[HClassifier, ...] = ()

    @property
    def groups(self) -> list[dict[str, Any]]:
        names = [list(c.config.class_names) for c in self.classifiers]
        attributes = [c.config.attribute for c in self.classifiers]
        if self.joint:
            return [{"attributes": attributes, "class_names": names}]
        return [{"attributes": [a], "class_names": [n]} for a, n in zip(attributes, names)]

    def one_class(self, group: int) -> int | None:
        """Distribution mode: the class asked of every image when the target puts all its mass on one class."""
        target = self.targets[group].flatten()
        return int(target.argmax()) if float(target.max()) == 1.0 else None

    def is_guided(self, step: int, num_steps: int) -> bool:
        if len(self.steps) == 2 and isinstance(self.steps[0], float):
            return self.steps[0] * num_steps <= step < self.steps[1] * num_steps
        return step in self.steps


class _GuidanceRun:
    """The state of one guided call. `start` puts on the device, before the first step, all that the steps need: a
    step reads no device value on the host but for the host solver's cost (K >= 3). `on_h` is the call's h function,
    `end_step` runs after every step and `finish` after the loop. An image whose h is not finite at a step is left
    unguided there (the others keep exact counts) and reported once, by `finish`."""

    def __init__(self, settings: GuidanceSettings, unet_compiled: bool, stale_timesteps: Any = None):
        self.settings = settings
        self.unet_compiled = unet_compiled
        self.stale_timesteps = stale_timesteps
        self.started = False

    def start(
        self,
        num_images: int,
        timesteps: list[float],
        cfg: bool,
        guidance_scale: float,
        device: torch.device,
        process_rows: list[int] | None,
        h_shape: Sequence[int],
    ) -> None:
        settings = self.settings
        self.num_images, self.num_steps, self.cfg = num_images, len(timesteps), cfg
        self.rows = num_images * (2 if cfg else 1)
        # With CFG the output is e_u + w (e_c - e_u): a move of the conditional rows alone is amplified by w.
        amplification = guidance_scale if cfg and settings.branches == "cond" else 1.0
        self.step_sizes = [strength / amplification for strength in settings.strengths]
        self.guided = [settings.is_guided(i, self.num_steps) for i in range(self.num_steps)]
        last = self.num_steps - 1
        self.reads = [g or (settings.balance_state is not None and i == last) for i, g in enumerate(self.guided)]
        # Per classifier: the heads of the steps that read h, stacked once on the device; per step its row.
        self.head_row, self.heads = [], []
        for classifier in settings.classifiers:
            indices = [classifier.head_index(t) if read else 0 for t, read in zip(timesteps, self.reads)]
            used = sorted({i for i, read in zip(indices, self.reads) if read})
            self.head_row.append([used.index(i) if read else -1 for i, read in zip(indices, self.reads)])
            rows = torch.tensor(used)
            scale, bias = classifier._calibration
            parts = (classifier.weight, classifier.bias, scale[:, None], bias, classifier.anchors)
            self.heads.append(tuple(p.detach()[rows].to(device=device, dtype=torch.float32) for p in parts))
        # Global batch: each process's number of images, and this process's rows of the global batch.
        self.process_rows, self.own_rows, total = process_rows, slice(0, num_images), num_images
        if process_rows is not None:
            first = sum(process_rows[: torch.distributed.get_rank()])
            self.own_rows, total = slice(first, first + num_images), sum(process_rows)
        self.counts: list[list[int]] | None = None
        self.class_targets: list[torch.Tensor | None] = []  # per group: each (global) image's class, when fixed
        if settings.mode == "sample":
            for classes in settings.targets:
                classes = classes * num_images if len(classes) == 1 else classes
                self.class_targets.append(torch.tensor(classes, device=device))
        else:
            for group in range(len(settings.targets)):
                fixed = settings.one_class(group)
                self.class_targets.append(None if fixed is None else torch.full((total,), fixed, device=device))
            if settings.solver == "assign":
                state = settings.balance_state
                counts = [largest_remainder(t.flatten(), total) for t in settings.targets]
                if state is not None:
                    counts = state.batch_counts(settings.groups, list(settings.targets), total)
                self.counts = [c.tolist() for c in counts]
                self.device_counts = [c.to(device) for c in counts]
        self.held_bases, self.held_row = self._held_bases(timesteps, device)
        # All classifiers read h flat or pooled to g x g (`prepare_guidance`); a pooled move is lifted back, per axis.
        self.pool = settings.classifiers[0].config.get("pool_size")
        self.lift = None if self.pool is None else [_pool_lift(n, self.pool).to(device) for n in h_shape[1:]]
        self.soft_targets = [t.flatten().to(device) for t in settings.targets] if settings.mode != "sample" else []
        self.previous: list[torch.Tensor | None] = [None] * len(settings.targets)
        self.final_classes: list[torch.Tensor] | None = None
        # Per step, how many of this process's images had a non-finite h (read on the host once, in `finish`).
        self.non_finite = torch.zeros(self.num_steps, dtype=torch.long, device=device)
        self.step_index, self.calls_in_step, self.started = 0, 0, True

    def on_h(self, h: torch.Tensor) -> torch.Tensor | None:
        """Read h at this step (calibrated logits of the conditional rows); on a guided step return the moved h."""
        if not self.started:
            raise RuntimeError(
                "The UNet ran before the guided call started. Balancing Act starts a call in `prepare_latents`, "
                "which diffusers' `StableDiffusionPipeline.__call__` runs after setting the scheduler's timesteps "
                "and before the denoising loop; this diffusers version calls them in another order."
            )
        self.calls_in_step += 1
        step = self.step_index
        if step >= self.num_steps or not self.reads[step]:
            return None
        if h.shape[0] != self.rows:
            raise RuntimeError(f"h has {h.shape[0]} rows; expected {self.rows} for {self.num_images} images.")
        first = self.num_images if self.cfg else 0  # the images are the conditional rows
        # The heads read h in float32 whatever the pipeline's dtype, also under an outer torch.autocast.
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = _read_h(h[first:].detach(), self.pool)
            heads = [[part[rows[step]] for part in parts] for parts, rows in zip(self.heads, self.head_row)]
            raw = [F.linear(x, weight, bias) for weight, bias, *_ in heads]
            calibrated = [r * scale + cal_bias for r, (_, _, scale, cal_bias, _) in zip(raw, heads)]
            finite = torch.stack([torch.isfinite(r).all(dim=1) for r in raw]).all(dim=0)  # per image, every head
            self.non_finite[step] = (~finite).sum()
            if self.settings.balance_state is not None:  # each image's class (joint: cell), -1 where not finite
                predicted = [z.argmax(1) for z in calibrated]
                if self.settings.joint:
                    cells = predicted[0]
                    for z, p in zip(calibrated[1:], predicted[1:]):
                        cells = cells * z.shape[1] + p
                    predicted = [cells]
                self.final_classes = [torch.where(finite, p, -1) for p in predicted]
            if not self.guided[step]:
                return None
            directions = self._directions(calibrated, raw, finite)
            delta = sum(size * (g @ head[4]) for size, g, head in zip(self.step_sizes, directions, heads))
            if self.held_bases is not None:  # remove the part of the move that the held classifiers would read
                basis = self.held_bases[self.held_row[step]]
                delta = delta - (delta @ basis) @ basis.T
            if self.lift is not None:  # pooled features -> h: pool(lifted delta) == delta
                pooled = delta.unflatten(1, (-1, self.pool, self.pool))
                delta = torch.einsum("hi,ncij,wj->nchw", self.lift[0], pooled, self.lift[1])
        delta = delta.reshape(self.num_images, *h.shape[1:]).to(h.dtype)
        if not self.cfg:
            return h + delta
        if self.settings.branches == "both":
            return h + torch.cat([delta, delta])
        return torch.cat([h[:first], h[first:] + delta])

    def _held_bases(self, timesteps: list[float], device: torch.device) -> tuple[torch.Tensor | None, list[int]]:
        """Per guided step, an orthonormal basis `[D, M]` of the held heads' weight differences `w_k - w_0`: a move
        without these components leaves their calibrated logits unchanged up to one shift per image. Returns (bases,
        row per step)."""
        held = self.settings.held
        if not held:
            return None, []
        combos: dict[tuple[int, ...], int] = {}  # each distinct combination of the held heads -> its basis row
        rows = [
            combos.setdefault(tuple(c.head_index(t) for c in held), len(combos)) if guided else -1
            for t, guided in zip(timesteps, self.guided)
        ]
        matrices = []
        for combo in combos:
            differences = []
            for classifier, index in zip(held, combo):
                weight = classifier.weight.detach()[index].to(device=device, dtype=torch.float32)  # [K, D]
                differences.append(weight[1:] - weight[:1])
            matrices.append(torch.cat(differences).T)  # [D, M]
        bases, _ = torch.linalg.qr(torch.stack(matrices), mode="reduced")
        return bases, rows

    def _directions(self, calibrated: list[torch.Tensor], raw: list[torch.Tensor], valid: torch.Tensor) -> list:
        """Per classifier, the logit directions `[N, K]` of this process's rows (zero where `valid`, the images with
        finite logits, is False); with a global batch the solvers see every process's rows."""
        settings = self.settings
        if self.process_rows is not None:  # one all_gather of every classifier's calibrated and raw logits
            widths = [z.shape[1] for z in calibrated + raw]
            gathered = _all_gather_rows(torch.cat(calibrated + raw, dim=1), self.process_rows).split(widths, dim=1)
            calibrated, raw = list(gathered[: len(calibrated)]), list(gathered[len(calibrated) :])
            valid = torch.stack([torch.isfinite(r).all(dim=1) for r in raw]).all(dim=0)  # of the global rows
        if settings.mode == "sample":
            classes = self.class_targets
        elif settings.solver != "assign":
            directions = []
            for z, r, fixed, target, temperature in zip(
                calibrated, raw, self.class_targets, self.soft_targets, settings.temperatures
            ):
                if fixed is not None:  # one class asked of every image: sample mode towards it
                    directions.append(logit_directions(z, fixed, valid=valid))
                else:
                    directions.append(logit_directions(r, target, settings.solver, temperature, valid=valid))
            return [d[self.own_rows] for d in directions]
        else:
            # an image not finite for one classifier is left out of every group's assignment
            cost = [torch.where(valid[:, None], -torch.log_softmax(z, dim=1), torch.nan) for z in calibrated]
            if settings.joint:
                cells = cost[0]
                for c in cost[1:]:  # cell cost: the classifiers' costs add up (independent readings)
                    cells = (cells[:, :, None] + c[:, None, :]).flatten(1)
                assigned = self._assign(0, cells)
                shape = [c.shape[1] for c in cost]
                classes = list(torch.unravel_index(assigned.clamp_min(0), shape)) if len(shape) > 1 else [assigned]
            else:
                classes = [self._assign(g, c) for g, c in enumerate(cost)]
        return [logit_directions(z, c, valid=valid)[self.own_rows] for z, c in zip(calibrated, classes)]

    def _assign(self, group: int, cost: torch.Tensor) -> torch.Tensor:
        """The min-cost assignment of group `group`, re-solved at each guided step with a cost for switching."""
        fixed = self.class_targets[group]
        if fixed is not None:
            return fixed
        previous = self.previous[group]
        if previous is not None:
            cost = cost + SWITCH_PENALTY * (1.0 - _one_hot(previous, cost.shape[1]))
        self.previous[group] = _assign_checked(cost, self.counts[group], self.device_counts[group])
        return self.previous[group]

    def step_callback(self, callback: Callable | None) -> Callable:
        """A `callback_on_step_end` that runs the caller's callback, then `end_step` with the loop's step index."""

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            outputs = callback(pipe, step, timestep, callback_kwargs) if callback is not None else {}
            self.end_step(step)
            return outputs

        return on_step_end

    def end_step(self, step: int) -> None:
        """After loop step `step`: the steps come in order and h was read exactly once in each."""
        calls, self.calls_in_step = self.calls_in_step, 0
        if step != self.step_index or step >= self.num_steps:
            raise RuntimeError(
                f"The denoising loop reported step {step} where Balancing Act expected step {self.step_index} of "
                f"{self.num_steps}: the loop does not run the timesteps the call set, one step each, in order."
            )
        if calls == 0:
            cause = (
                "the UNet is compiled and its graph was traced without Balancing Act's hook on `unet.mid_block`: "
                "call `install_h_hook(pipe.unet.mid_block)` before `torch.compile` (or `torch.compiler.reset()`)"
                if self.unet_compiled
                else "`unet.mid_block` did not run or its forward hooks were bypassed"
            )
            raise RuntimeError(
                f"Balancing Act's hook did not run at denoising step {step}, so h was not guided: {cause}."
            )
        if calls > 1:
            raise RuntimeError(
                f"The UNet ran {calls} times in denoising step {step}; guidance reads and moves h once per step. A "
                "callback (or other code in this call's thread) that runs the UNet during the call puts guidance on "
                "the wrong h: run the UNet outside the pipeline call."
            )
        self.step_index = step + 1

    def finish(self, interrupted: bool = False) -> None:
        """After the loop: check it ran every step (unless `interrupted`), report the images whose h was not finite,
        and, if it ran every step, add its final classes to the `balance_state` (every process's)."""
        if not interrupted and self.step_index != self.num_steps:
            raise RuntimeError(
                f"The denoising loop ran {self.step_index} steps, but the scheduler's timesteps read when the guided "
                f"call started have {self.num_steps}: the loop did not run the schedule this call set."
            )
        counts = self.non_finite.tolist()
        if any(counts):
            steps = [i for i, n in enumerate(counts) if n]
            logger.warning(
                f"Balancing Act: h was not finite (NaN or inf, e.g. a float16 overflow) for up to {max(counts)} of "
                f"{self.num_images} images at {len(steps)} of {self.num_steps} steps (first: step {steps[0]}, "
                f"{counts[steps[0]]} images); those images were left unguided at those steps and the others kept "
                "exact counts among themselves. Try float32 or bfloat16, or a smaller `guidance_strength`."
            )
        state = self.settings.balance_state
        if state is None or self.final_classes is None or self.step_index != self.num_steps:
            return
        final = self.final_classes
        if self.process_rows is not None:  # every process's images, so the state stays the same on all of them
            final = [_all_gather_rows(classes, self.process_rows) for classes in final]
        state.update(self.settings.groups, final)


_TOKENIZER_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()


def tokenizer_lock(tokenizer: Any) -> threading.Lock:
    """The lock the project's pipelines hold while they tokenize with `tokenizer` (shared by threads)."""
    if tokenizer is None:
        return contextlib.nullcontext()
    with _HOOKS_LOCK:
        return _TOKENIZER_LOCKS.setdefault(tokenizer, threading.Lock())


# The guided call in progress in this context, and the pipeline that runs it (read by `prepare_latents`).
_CURRENT_RUN: contextvars.ContextVar[tuple[Any, _GuidanceRun] | None] = contextvars.ContextVar(
    "balancing_act_run", default=None
)


def _class_index(classifier: HClassifier, value: Any, argument: str) -> int:
    """`classifier.class_index` with the name of the argument in the error."""
    try:
        return classifier.class_index(value)
    except ValueError as error:
        raise ValueError(f"`{argument}`: {error}") from None


# --- The pipelines --------------------------------------------------------------------------------------------------


class BalancingActMixin:
    r"""
    Balancing Act guidance for a diffusers pipeline, which subclasses it before its diffusers base class, sets
    `_images_argument`, `_unguided_name` and `_wrapped_call` (words of the messages) and, in its `__call__`, checks
    (`check_guidance_inputs`), prepares (`prepare_guidance`) and starts (`start_guidance`) a guided call, runs
    `_GuidanceRun.on_h` in a `MidBlockHook` and calls `_GuidanceRun.end_step` after every step.
    """

    def h_shape(self, height: int, width: int) -> list[int]:
        """The per-sample shape [C, H, W] of h = `unet.mid_block` output for images of `height` x `width` pixels."""
        scale = getattr(self, "vae_scale_factor", 1)  # pixels per latent pixel; 1 for a pixel-space model
        return mid_block_h_shape(self.unet, int(height) // scale, int(width) // scale)

    def _resolve_classifier(self, classifier: "HClassifier | str | os.PathLike") -> HClassifier:
        # Duck-typed: the HClassifier of this file loaded by diffusers' custom_pipeline loader is another class.
        if isinstance(classifier, torch.nn.Module) and all(
            hasattr(classifier, name) for name in ("config", "head_index", "calibrated_logits", "check_guidance_ready")
        ):
            classifier.check_guidance_ready()
            return classifier
        if isinstance(classifier, (str, os.PathLike)):
            key = os.fspath(classifier)
            files = [os.path.join(key, n) for n in ("config.json", "diffusion_pytorch_model.safetensors")]
            stamp = tuple(os.path.getmtime(f) for f in files if os.path.isfile(f))
            cache = self.__dict__.setdefault("_h_classifier_cache", {})  # loaded again when the files change
            if key not in cache or cache[key][0] != stamp:
                cache[key] = (stamp, HClassifier.from_pretrained(key).eval())
            return cache[key][1]
        raise TypeError(
            "`h_classifier` must be an HClassifier, a local directory or Hub id (str / PathLike), or a list of "
            f"those; got {type(classifier).__name__}."
        )

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
        return BalancingActMixin._check_probabilities(target)

    @staticmethod
    def _check_probabilities(target: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
            raise ValueError(
                f"`target_distribution` must hold finite, non-negative probabilities; got {_fmt(target)}."
            )
        if abs(float(target.sum()) - 1.0) > TARGET_SUM_TOLERANCE:
            raise ValueError(
                f"`target_distribution` must sum to 1 (tolerance {TARGET_SUM_TOLERANCE:g}); got {_fmt(target)} "
                f"(sum {float(target.sum()):.6g})."
            )
        return target / target.sum()

    @staticmethod
    def _joint_target(value: Any, classifiers: list[HClassifier]) -> torch.Tensor | None:
        """A joint target (a table shaped [K_1, ..., K_n] summing to 1), or None when `value` is not one."""
        shape = tuple(c.num_classes for c in classifiers)
        try:
            table = torch.as_tensor(value, dtype=torch.float64).float()
        except (TypeError, ValueError, RuntimeError):
            return None
        if tuple(table.shape) != shape or abs(float(table.sum()) - 1.0) > TARGET_SUM_TOLERANCE:
            return None
        return BalancingActMixin._check_probabilities(table.flatten()).reshape(shape)

    @staticmethod
    def _target_indices(value: Any, classifier: HClassifier) -> list[int]:
        """Sample mode: one class index for every image, or one per image."""
        if not isinstance(value, str) and getattr(value, "ndim", 1) > 0 and hasattr(value, "__len__"):
            if len(value) == 0:
                raise ValueError("`target_classes` is an empty list; give one class for all images or one per image.")
            return [_class_index(classifier, v, "target_classes") for v in value]
        return [_class_index(classifier, value, "target_classes")]

    @staticmethod
    def _check_steps(guidance_steps: Any) -> tuple[float, float] | tuple[int, ...]:
        accepted = "a fraction window (start, end) with 0 <= start < end <= 1, or a non-empty list of step indices"
        if isinstance(guidance_steps, tuple):
            if len(guidance_steps) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in guidance_steps
            ):
                start, end = (float(v) for v in guidance_steps)
                if 0.0 <= start < end <= 1.0:
                    return (start, end)
        elif isinstance(guidance_steps, (list, range, torch.Tensor)):
            steps = guidance_steps.tolist() if isinstance(guidance_steps, torch.Tensor) else list(guidance_steps)
            if steps and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps):
                return tuple(sorted(set(steps)))
        raise ValueError(f"`guidance_steps` must be {accepted}; got {guidance_steps!r}.")

    @staticmethod
    def _check_strengths(guidance_strength: Any, num_classifiers: int) -> tuple[float, ...]:
        if isinstance(guidance_strength, (list, tuple)):
            strengths = list(guidance_strength)
            if len(strengths) != num_classifiers:
                raise ValueError(
                    f"`guidance_strength` must be one number or one per classifier ({num_classifiers}); got "
                    f"{len(strengths)} values."
                )
        else:
            strengths = [guidance_strength] * num_classifiers
        for value in strengths:  # `not 0 <= value <= MAX` also refuses nan
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= MAX_GUIDANCE_STRENGTH
            ):
                raise ValueError(
                    f"`guidance_strength` must be from 0 to {MAX_GUIDANCE_STRENGTH:g}; got {_fmt(guidance_strength)}."
                )
        return tuple(float(v) for v in strengths)

    def check_guidance_inputs(self, arguments: GuidanceArguments) -> GuidanceArguments:
        """Validate the Balancing Act arguments, as `check_inputs` does the others (touching no file, Hub or process),
        and return them checked for `prepare_guidance`."""
        a = arguments
        if a.guidance_mode is None:
            names = ("h_classifier", "target_distribution", "target_classes", "balance_state")
            given = [n for n in names if getattr(a, n) is not None] + (["global_batch"] if a.global_batch else [])
            if given:
                raise ValueError(
                    f"{', '.join(f'`{n}`' for n in given)} given without `guidance_mode`: no guidance would be applied. "
                    "Add guidance_mode='distribution' (with target_distribution) or guidance_mode='sample' (with "
                    f"target_classes), or drop those arguments for {self._unguided_name}."
                )
            return arguments
        mode, solver = a.guidance_mode, a.distribution_solver
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"`guidance_mode` must be None, 'sample' or 'distribution'; got {mode!r}.")
        if a.h_classifier is None or (isinstance(a.h_classifier, (list, tuple)) and len(a.h_classifier) == 0):
            raise ValueError(
                f"`guidance_mode={mode!r}` needs `h_classifier`: an HClassifier, a folder or a Hub id (or a "
                "non-empty list of them)."
            )
        if mode == "distribution" and a.target_distribution is None:
            raise ValueError(
                "`guidance_mode='distribution'` needs `target_distribution`: a probability vector or a class name per "
                "classifier, or with several classifiers a joint table over their classes."
            )
        if mode == "sample" and a.target_classes is None:
            raise ValueError(
                "`guidance_mode='sample'` needs `target_classes`: a class (name or index) for all images or a list of "
                "one class per image."
            )
        if solver not in DISTRIBUTION_SOLVERS:
            raise ValueError(f"`distribution_solver` must be one of {list(DISTRIBUTION_SOLVERS)}; got {solver!r}.")
        if a.guided_branches not in GUIDED_BRANCHES:
            raise ValueError(f"`guided_branches` must be one of {list(GUIDED_BRANCHES)}; got {a.guided_branches!r}.")
        if a.balance_state is not None:
            if not isinstance(a.balance_state, BalanceState) and not hasattr(a.balance_state, "batch_counts"):
                raise TypeError(f"`balance_state` must be a BalanceState; got {type(a.balance_state).__name__}.")
            if mode != "distribution" or solver != "assign":
                raise ValueError(
                    "`balance_state` counts the classes of distribution mode with `distribution_solver='assign'`; "
                    f"got guidance_mode={mode!r}, distribution_solver={solver!r}."
                )
        if not isinstance(a.global_batch, bool):
            raise TypeError(f"`global_batch` must be True or False; got {a.global_batch!r}.")
        if a.global_batch and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(
                "`global_batch=True` computes the guidance statistics over the batches of all processes, but "
                "torch.distributed is not initialised in this process. Launch every process with `accelerate launch` "
                "(and create `accelerate.PartialState()`), or call `torch.distributed.init_process_group`, then make "
                "the same call on every process; or drop `global_batch` for a single process."
            )
        num_classifiers = len(a.h_classifier) if isinstance(a.h_classifier, (list, tuple)) else 1
        steps = self._check_steps(a.guidance_steps)
        strengths = self._check_strengths(a.guidance_strength, num_classifiers)
        temperature = a.classifier_temperature
        if temperature is not None:
            number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            if not (number and math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"`classifier_temperature` must be a positive number; got {temperature!r}.")
            temperature = float(temperature)
        context = getattr(self.unet, "dynamo_ctx", None)  # set by torch.compile on the module it returns
        if getattr(context, "fullgraph", False) or getattr(context, "error_on_graph_break", False):
            raise ValueError(
                "The UNet was compiled with `fullgraph=True`, but Balancing Act reads and moves h in a hook on "
                "`unet.mid_block` that runs outside the compiled graph (one graph break per UNet call). Compile "
                "without `fullgraph=True`, e.g. `pipe.unet = torch.compile(pipe.unet)`."
            )
        if is_compiled(self.unet) and not has_h_hook(self.unet.mid_block, kept_only=True):
            raise ValueError(
                "This guided call needs Balancing Act's hook inside the compiled UNet: call "
                "`install_h_hook(pipe.unet.mid_block)` once before `torch.compile` (then guided and unguided calls "
                "both run without recompiling)."
            )
        checked = dataclasses.replace(
            a, guidance_steps=steps, guidance_strength=strengths, classifier_temperature=temperature
        )
        checked._checked = True
        return checked

    def prepare_guidance(self, arguments: GuidanceArguments) -> GuidanceSettings:
        """Load the classifiers (cached on the pipeline) and check the targets against their classes; `arguments` not
        returned by `check_guidance_inputs` are checked first."""
        a = arguments if arguments._checked else self.check_guidance_inputs(arguments)
        mode = a.guidance_mode
        is_list = isinstance(a.h_classifier, (list, tuple))
        classifiers = [self._resolve_classifier(c) for c in (a.h_classifier if is_list else [a.h_classifier])]
        pools = [c.config.get("pool_size") for c in classifiers]
        if len(set(pools)) > 1:  # one read of h per step serves every head
            raise ValueError(
                f"`h_classifier`: the classifiers of one call must read h the same way, all flat or all pooled to one "
                f"size; got pool sizes {pools} (None = flat). Train them with the same `--pool-size`."
            )
        strengths = list(a.guidance_strength)
        temperature = a.classifier_temperature
        temperatures = [float(c.config.temperature) if temperature is None else temperature for c in classifiers]
        argument = "target_distribution" if mode == "distribution" else "target_classes"
        given = getattr(a, argument)
        held = self._held_entries(given, argument, len(classifiers), is_list)
        held_classifiers = tuple(c for c, h in zip(classifiers, held) if h)
        if held_classifiers:
            keep = [i for i, h in enumerate(held) if not h]
            classifiers, strengths, temperatures, given = (
                [values[i] for i in keep] for values in (classifiers, strengths, temperatures, given)
            )
            if len(given) == 1:  # one guided classifier: as if it had been passed alone
                given, is_list = given[0], False
        joint = False
        if mode == "distribution":
            table = self._joint_target(given, classifiers) if is_list else None
            if table is not None:
                if a.distribution_solver != "assign":
                    raise ValueError(
                        "A joint `target_distribution` (a table over the classes of several classifiers) needs "
                        f"`distribution_solver='assign'`; got {a.distribution_solver!r}."
                    )
                joint, targets = True, [table]
            else:
                entries = self._per_classifier(given, argument, len(classifiers), is_list)
                targets = [self._target_vector(v, c) for v, c in zip(entries, classifiers)]
        else:
            entries = self._per_classifier(given, argument, len(classifiers), is_list)
            targets = [self._target_indices(v, c) for v, c in zip(entries, classifiers)]
        return GuidanceSettings(
            classifiers=tuple(classifiers),
            mode=mode,
            solver="classes" if mode == "sample" else a.distribution_solver,
            joint=joint,
            targets=tuple(targets),
            strengths=tuple(strengths),
            temperatures=tuple(temperatures),
            steps=a.guidance_steps,
            branches=a.guided_branches,
            balance_state=a.balance_state,
            global_batch=a.global_batch,
            held=held_classifiers,
        )

    @staticmethod
    def _held_entries(value: Any, argument: str, num_classifiers: int, is_list: bool) -> list[bool]:
        """Which classifiers of a list are held (their `argument` entry is `HOLD`); at least one must be guided."""
        entries = value if is_list and isinstance(value, (list, tuple)) and len(value) == num_classifiers else [value]
        held = [isinstance(v, str) and v == HOLD for v in entries]
        if held and all(held):
            raise ValueError(
                f"`{argument}` holds every classifier ({HOLD!r}); give at least one a target to guide towards, "
                "e.g. `h_classifier=[skin, glasses]` with `target_distribution=[[0.5, 0.5], 'hold']`."
            )
        return held if len(held) == num_classifiers else [False] * num_classifiers

    def start_guidance(
        self,
        run: _GuidanceRun,
        num_images: int,
        height: int,
        width: int,
        device: Any,
        cfg: bool = False,
        guidance_scale: float = 1.0,
    ) -> None:
        """Before the first step: check a guided call against its batch, image size and the timesteps this call set,
        then start its run (`cfg`: the UNet sees `[uncond; cond]` rows). The collective comes after all checks."""
        settings = run.settings
        schedule = getattr(self.scheduler, "timesteps", None)
        if schedule is None or schedule is run.stale_timesteps:
            raise RuntimeError(
                "Balancing Act starts a guided call when its latents are prepared and reads the scheduler's timesteps "
                f"then, but this call had not set them yet: diffusers' `{self._wrapped_call}` must set the timesteps "
                "before `prepare_latents` and run the loop after it (the order of the tested diffusers versions, "
                "in setup.cfg). Use a tested diffusers version."
            )
        timesteps = [float(t) for t in schedule.cpu()]
        num_steps = len(timesteps)
        if isinstance(settings.steps[0], int) and settings.steps[-1] >= num_steps:
            raise ValueError(
                f"`guidance_steps` holds step index {settings.steps[-1]} but this call has {num_steps} denoising steps "
                f"(indices 0..{num_steps - 1})."
            )
        if not any(settings.is_guided(i, num_steps) for i in range(num_steps)):
            raise ValueError(
                f"`guidance_steps` window {settings.steps} selects none of the {num_steps} denoising steps (step i is "
                "guided when start <= i / num_steps < end); widen the window or give step indices."
            )
        if settings.mode == "sample":
            for classes in settings.targets:
                if len(classes) not in (1, num_images):
                    raise ValueError(
                        f"`target_classes` must be one class for all images or a list of one class per image "
                        f"({num_images} images = {self._images_argument}); got a list of {len(classes)}."
                    )
        h_shape = self.h_shape(height, width)
        for classifier in settings.classifiers + settings.held:
            mismatch = classifier.h_shape_mismatch(h_shape)
            if mismatch is not None:
                raise ValueError(
                    f"`h_classifier` {classifier.config.attribute!r} {mismatch} but this UNet gives h of shape "
                    f"{h_shape} at {height}x{width} pixels (`height` x `width`); use a classifier that reads this h."
                )
            if not classifier.covers_timesteps(timesteps):
                heads = classifier._timesteps
                raise ValueError(
                    f"The scheduler {type(self.scheduler).__name__} runs timesteps {min(timesteps):g}.."
                    f"{max(timesteps):g}, outside the {classifier.config.attribute!r} classifier's heads "
                    f"({float(heads.min()):g}..{float(heads.max()):g}): it uses another timestep scale. Use a scheduler "
                    "on the scale the classifier was trained on (DDIM, PNDM, DPM-Solver++, Euler, UniPC for SD 1.x/2.x)."
                )
        one_class = settings.mode == "distribution" and all(
            settings.one_class(g) is not None for g in range(len(settings.targets))
        )
        process_rows = None
        if settings.global_batch and settings.mode == "distribution":  # the call's first collective
            count = torch.tensor([num_images], device=device)
            process_rows = _all_gather_rows(count, [1] * torch.distributed.get_world_size()).tolist()
        total = sum(process_rows) if process_rows else num_images
        if settings.mode == "distribution" and total < 2 and settings.balance_state is None and not one_class:
            raise ValueError(
                f"`guidance_mode='distribution'` needs at least 2 images ({self._images_argument}) or a "
                "`balance_state` that carries the counts across calls: the target is a distribution over images. "
                f"For one image of a given class use `guidance_mode='sample'`; got {total} "
                f"{'image' if total == 1 else 'images'}."
            )
        run.start(num_images, timesteps, cfg, guidance_scale, device, process_rows, h_shape)


def unexpected_keywords_message(pipeline: type, unknown: Sequence[str], standard: Sequence[str]) -> str:
    """The `TypeError` message for unknown keyword arguments of `pipeline`'s call, naming the closest known argument
    of each (a typo such as `target_distrbution`)."""
    guidance = GuidanceArguments.names()
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, [*standard, *guidance], n=1, cutoff=0.75)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"{pipeline.__name__}.__call__() got unexpected keyword argument(s) {', '.join(hints)}; it takes the "
        f"arguments of {next(c for c in pipeline.__mro__[1:] if c is not BalancingActMixin).__name__} and "
        f"{', '.join(guidance)}."
    )


# The arguments of `StableDiffusionPipeline.__call__`, passed on as they are (read from it, not copied).
_STABLE_DIFFUSION_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(StableDiffusionPipeline.__call__).parameters.items()
    if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
)

EXAMPLE_DOC_STRING = """
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
"""


class BalancingActPipeline(BalancingActMixin, StableDiffusionPipeline):
    r"""
    Stable Diffusion with Balancing Act h-space guidance (Parihar et al., CVPR 2024): during denoising, the UNet
    bottleneck h = `unet.mid_block(...)` is read by h-classifiers and moved towards classes, per image
    (`guidance_mode="sample"`) or to a target distribution over the batch (`"distribution"`, debiasing).

    Everything else is `StableDiffusionPipeline` (components, arguments, schedulers, callbacks, LoRA, offload,
    `torch.compile` without `fullgraph=True`); with `guidance_mode=None` the output is identical. Guidance acts only on
    the call that asked for it: pipelines sharing these components (`from_pipe`) in other threads run unguided.
    """

    # words of the error messages and of the argument documentation
    _images_argument = "batch size x num_images_per_prompt"
    _unguided_name = "vanilla Stable Diffusion"
    _wrapped_call = "StableDiffusionPipeline.__call__"

    @functools.wraps(StableDiffusionPipeline.encode_prompt)  # its signature and documentation, for introspection
    def encode_prompt(self, *args, **kwargs):  # a fast tokenizer keeps its settings on the (shared) object: take turns
        with tokenizer_lock(self.tokenizer):
            return super().encode_prompt(*args, **kwargs)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        # Called once per call, after the batch size, image size and timesteps are set: where a guided call starts.
        current = _CURRENT_RUN.get()
        if current is not None and current[0] is self and not current[1].started:
            cfg, scale = self.do_classifier_free_guidance, self.guidance_scale
            self.start_guidance(current[1], batch_size, height, width, device, cfg, scale)
        return super().prepare_latents(
            batch_size, num_channels_latents, height, width, dtype, device, generator, latents
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @guidance_args_docstring(
        unguided=_unguided_name,
        images=_images_argument,
        strength_divisor="`guidance_scale` when only the conditional branch moves (classifier-free guidance "
        "amplifies that move by w in the output), else 1",
    )
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
        Balancing Act arguments below are added.

        Args:

        Examples:

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`, as `StableDiffusionPipeline`.
        """
        arguments = locals()
        unknown = sorted(set(kwargs) - {"callback", "callback_steps"})
        if unknown:
            raise TypeError(unexpected_keywords_message(BalancingActPipeline, unknown, _STABLE_DIFFUSION_ARGUMENTS))
        guidance = self.check_guidance_inputs(GuidanceArguments.from_call(arguments))
        standard = {name: arguments[name] for name in _STABLE_DIFFUSION_ARGUMENTS} | kwargs
        if guidance_mode is None:
            return super().__call__(**standard)

        run = _GuidanceRun(
            self.prepare_guidance(guidance), is_compiled(self.unet), getattr(self.scheduler, "timesteps", None)
        )
        # The loop tells the run where it is: our step-end callback, around the caller's.
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            standard["callback_on_step_end_tensor_inputs"] = callback_on_step_end.tensor_inputs
        standard["callback_on_step_end"] = run.step_callback(callback_on_step_end)
        token = _CURRENT_RUN.set((self, run))
        try:
            with MidBlockHook(self.unet, run.on_h):
                output = super().__call__(**standard)
        finally:
            _CURRENT_RUN.reset(token)
        run.finish(interrupted=self.interrupt)
        return output
