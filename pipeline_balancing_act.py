# Copyright 2026 The Balancing Act diffusers contributors. Licensed under the Apache License, Version 2.0.
"""Balancing Act: distribution-guided debiasing for Stable Diffusion (Parihar et al., CVPR 2024).

A single-file diffusers community pipeline. It imports only the standard library, torch, diffusers, transformers,
huggingface_hub and safetensors, so that `DiffusionPipeline.from_pretrained(..., custom_pipeline=...)` can load it on
its own. It defines:

- `HClassifier`: per-timestep linear heads over the UNet bottleneck features h (the paper's "Attribute Distribution
  Predictor"), a diffusers `ModelMixin` + `ConfigMixin` saved as safetensors + config.json.
- `MidBlockHook`: the one mechanism that reads (and optionally replaces) h = `unet.mid_block(...)`.
- `guidance_loss`: the one guidance loss (sample / distribution mode, KL / chi-square).
- `BalancingActPipeline`: `StableDiffusionPipeline` plus h-space guidance during denoising.
"""

import copy
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

DEFAULT_TEMPERATURE = 8.0
# Default `guidance_strength` (see `BalancingActPipeline.__call__` for the update rule), chosen by the toy-world sweep
# (docs/results/sweep.md): the lowest distribution FD and sample-mode miss rate with the valid rate kept within a point
# of vanilla. The right value depends on the classifier's weight scale: retune it for other classifiers.
DEFAULT_GUIDANCE_STRENGTH = 600.0
# Probabilities of a target distribution are clamped to at least this value inside the loss, so that a one-hot
# target (a class name) keeps KL / chi-square finite.
TARGET_PROB_FLOOR = 1e-3

GUIDANCE_MODES = ("sample", "distribution")
GUIDANCE_LOSSES = ("kl", "chi2")
GUIDED_BRANCHES = ("cond", "both")
# Tolerance on the sum of a target distribution.
TARGET_SUM_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The h-classifier
# ----------------------------------------------------------------------------------------------------------------


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


class HClassifier(ModelMixin, ConfigMixin):
    r"""
    Per-timestep linear heads over the flattened UNet bottleneck h: `logits = W_t @ flatten(h) + b_t`.

    One head per trained timestep; any scheduler's timestep (int or float, any step count) uses the head of the
    nearest trained timestep (`head_index`).

    Args:
        attribute (`str`): Name of the attribute, e.g. `"skin"`.
        class_names (`list[str]`): The K >= 2 class names; class index = position in this list.
        h_shape (`list[int]`): The shape `[C, H, W]` of one sample's h the heads were trained on.
        timesteps (`list[int | float]`): The scheduler timesteps of the heads, in the order they were recorded.
        temperature (`float`, defaults to 8.0): Softmax temperature used by guidance (`softmax(logits / T)`).
        base_model (`str`, *optional*): The model the heads were trained on (Hub id or description).
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
        # A plain tensor, not a buffer: `.to(dtype)` must never round the timesteps.
        self._timesteps = torch.tensor(timesteps, dtype=torch.float64)

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    def head_index(self, timestep: int | float | torch.Tensor) -> int:
        """Index of the head trained at the timestep nearest to `timestep` (first one on a tie)."""
        value = _timestep_value(timestep)
        distances = (self._timesteps - value).abs()
        return int(torch.argmin(distances).item())

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

    def forward(self, h: torch.Tensor, timestep: int | float | torch.Tensor) -> torch.Tensor:
        """
        Logits `[B, K]` (float32) of the head nearest to `timestep` for h of shape `[B, C, H, W]`.

        The head is used in float32 on h's device, so the classifier may stay on the CPU while the UNet runs
        elsewhere (model offload) and h may be fp16/bf16; gradients flow to h and to the parameters.
        """
        expected = tuple(self.config.h_shape)
        if h.ndim != 4 or tuple(h.shape[1:]) != expected:
            raise ValueError(
                f"h has shape {list(h.shape)} but this classifier was trained on h of shape [B, {', '.join(map(str, expected))}]."
            )
        index = self.head_index(timestep)
        weight = self.weight[index].to(device=h.device, dtype=torch.float32)
        bias = self.bias[index].to(device=h.device, dtype=torch.float32)
        return F.linear(h.flatten(1).float(), weight, bias)

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
        pickled checkpoints (`.pt`, `.pth`, `.bin`, `.ckpt`, ...) are refused, never unpickled.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            raise ValueError(
                f"`h_classifier` {path!r} is a file; expected a directory written by `HClassifier.save_pretrained` "
                "(config.json + diffusion_pytorch_model.safetensors) or a Hub id. Pickled checkpoints (.pt, .pth, "
                ".bin, .ckpt) are refused because unpickling can run arbitrary code."
            )
        looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
        if not os.path.isdir(path) and (looks_local or kwargs.get("local_files_only")):
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
# The guidance loss
# ----------------------------------------------------------------------------------------------------------------


def guidance_loss(
    logits: torch.Tensor,
    mode: str,
    targets: torch.Tensor,
    loss: str = "kl",
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    r"""
    The Balancing Act guidance loss over `logits` `[N, K]` (p_i = softmax(logits_i / temperature)).

    - `mode="sample"`: `targets` is a LongTensor `[N]` of class indices; loss = -sum_i p_i[c_i] (per sample: the
      gradient on row i does not depend on N).
    - `mode="distribution"`: `targets` is a probability K-vector p_ref; p_hat = mean_i p_i and
      loss = KL(p_hat || p_ref) = sum_k p_hat_k log(p_hat_k / p_ref_k) (`loss="kl"`) or
      chi^2 = sum_k (p_hat_k - p_ref_k)^2 / p_ref_k (`loss="chi2"`). p_ref is clamped to at least
      `TARGET_PROB_FLOOR` so one-hot targets stay finite. The gradient on each row scales as 1/N: callers that want
      a batch-size independent step multiply the loss by N (as `BalancingActPipeline` does).

    Returns a 0-d float32 tensor.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"`logits` must have shape [N, K] with K >= 2, got {list(logits.shape)}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a positive number, got {temperature}.")
    probs = torch.softmax(logits.float() / temperature, dim=1)
    if mode == "sample":
        targets = torch.as_tensor(targets, device=logits.device).long().flatten()
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"`targets` must hold one class per row ({logits.shape[0]}), got {targets.shape[0]}.")
        return -probs.gather(1, targets[:, None]).sum()
    if mode == "distribution":
        p_ref = torch.as_tensor(targets, device=logits.device, dtype=torch.float32).flatten()
        if p_ref.shape[0] != logits.shape[1]:
            raise ValueError(f"`targets` must be a {logits.shape[1]}-vector, got {p_ref.shape[0]} entries.")
        p_ref = p_ref.clamp_min(TARGET_PROB_FLOOR)
        p_hat = probs.mean(dim=0)
        if loss == "kl":
            return (p_hat * (p_hat.clamp_min(1e-12).log() - p_ref.log())).sum()
        if loss == "chi2":
            return ((p_hat - p_ref) ** 2 / p_ref).sum()
        raise ValueError(f"`loss` must be one of {list(GUIDANCE_LOSSES)}, got {loss!r}.")
    raise ValueError(f"`mode` must be one of {list(GUIDANCE_MODES)}, got {mode!r}.")


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


class _GuidancePlan:
    """Validated guidance settings of one `__call__` and the per-step state the hooks share."""

    def __init__(
        self,
        classifiers: list[HClassifier],
        strengths: list[float],
        targets: list[torch.Tensor],
        mode: str,
        loss: str,
        temperatures: list[float],
        steps: tuple[float, float] | list[int],
        branches: str,
        num_images: int,
        num_steps: int,
    ):
        self.classifiers = classifiers
        self.strengths = strengths
        self.targets = targets  # distribution: K-vectors; sample: LongTensor [num_images]
        self.mode = mode
        self.loss = loss
        self.temperatures = temperatures
        self.steps = steps
        self.branches = branches
        self.num_images = num_images
        self.num_steps = num_steps  # iterations of the denoising loop (len of the scheduler's timesteps)
        # Set by the UNet pre-hook: index of the current UNet call (= denoising loop index) and its timestep.
        self.step_index = -1
        self.timestep = None
        self.timestep_values: list[float] = []

    def is_guided(self, step_index: int) -> bool:
        if isinstance(self.steps, tuple):
            start, end = self.steps
            return start * self.num_steps <= step_index < end * self.num_steps
        return step_index in self.steps


def _class_index(classifier: HClassifier, value: Any, argument: str) -> int:
    """`classifier.class_index` with the name of the argument in the error."""
    try:
        return classifier.class_index(value)
    except ValueError as error:
        raise ValueError(f"`{argument}`: {error}") from None


class BalancingActPipeline(StableDiffusionPipeline):
    r"""
    Stable Diffusion with Balancing Act h-space guidance (Parihar et al., CVPR 2024).

    During denoising, the UNet bottleneck h = `unet.mid_block(...)` is moved along the gradient of a guidance loss
    computed by per-timestep linear h-classifiers (`HClassifier`), and the rest of the UNet runs on the moved h.
    `guidance_mode="distribution"` steers the batch towards a target distribution of an attribute (debiasing);
    `guidance_mode="sample"` steers each image towards a target class.

    Everything else is `StableDiffusionPipeline`: same components, arguments, schedulers, callbacks, LoRA, offload.
    With `guidance_mode=None` or no classifier the output is identical to `StableDiffusionPipeline`.
    """

    def _resolve_classifier(self, classifier: "HClassifier | str | os.PathLike") -> HClassifier:
        # Duck-typed: diffusers' custom_pipeline loader imports this file as a second module, whose HClassifier is a
        # different class object from `h_classifiers.HClassifier`; both must be accepted.
        if isinstance(classifier, torch.nn.Module) and all(
            hasattr(classifier, name) for name in ("config", "head_index", "class_index")
        ):
            return classifier
        if isinstance(classifier, (str, os.PathLike)):
            key = os.fspath(classifier)
            cache = self.__dict__.setdefault("_h_classifier_cache", {})
            if key not in cache:
                cache[key] = HClassifier.from_pretrained(key).eval()
            return cache[key]
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

    def check_guidance_inputs(
        self,
        h_classifier: Any,
        guidance_mode: str | None,
        target_distribution: Any,
        target_classes: Any,
        guidance_strength: float | list[float],
        guidance_steps: Any,
        guidance_loss: str,
        classifier_temperature: float | None,
        guided_branches: str,
        num_images: int,
        num_steps: int,
        height: int,
        width: int,
    ) -> _GuidancePlan:
        """Validate our arguments (guidance active: a mode and a classifier) and load the classifiers."""
        if guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"`guidance_mode` must be None, 'sample' or 'distribution'; got {guidance_mode!r}.")
        if guidance_loss not in GUIDANCE_LOSSES:
            raise ValueError(f"`guidance_loss` must be one of {list(GUIDANCE_LOSSES)}; got {guidance_loss!r}.")
        if guided_branches not in GUIDED_BRANCHES:
            raise ValueError(f"`guided_branches` must be one of {list(GUIDED_BRANCHES)}; got {guided_branches!r}.")
        if guidance_mode == "distribution" and num_images < 2:
            raise ValueError(
                "`guidance_mode='distribution'` needs at least 2 images (batch size x num_images_per_prompt): the "
                "target is a distribution over the batch. For one image use `guidance_mode='sample'` with "
                f"`target_classes`; got {num_images} image."
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

        if isinstance(guidance_strength, (list, tuple)):
            strengths = list(guidance_strength)
            if len(strengths) != len(classifiers):
                raise ValueError(
                    f"`guidance_strength` must be one number or one per classifier ({len(classifiers)}); got "
                    f"{len(strengths)} values."
                )
        else:
            strengths = [guidance_strength] * len(classifiers)
        for value in strengths:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`guidance_strength` must be finite and >= 0; got {guidance_strength!r}.")

        if classifier_temperature is None:
            temperatures = [float(c.config.temperature) for c in classifiers]
        elif (
            isinstance(classifier_temperature, (int, float))
            and not isinstance(classifier_temperature, bool)
            and math.isfinite(classifier_temperature)
            and classifier_temperature > 0
        ):
            temperatures = [float(classifier_temperature)] * len(classifiers)
        else:
            raise ValueError(f"`classifier_temperature` must be a positive number; got {classifier_temperature!r}.")

        if guidance_mode == "distribution":
            if target_distribution is None:
                raise ValueError(
                    "`guidance_mode='distribution'` needs `target_distribution`: a probability vector or a class name "
                    "per classifier."
                )
            entries = self._per_classifier(target_distribution, "target_distribution", len(classifiers), is_list)
            targets = [self._target_vector(v, c) for v, c in zip(entries, classifiers)]
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
        return _GuidancePlan(
            classifiers,
            [float(v) for v in strengths],
            targets,
            guidance_mode,
            guidance_loss,
            temperatures,
            steps,
            guided_branches,
            num_images,
            num_steps,
        )

    def _count_denoising_steps(self, num_inference_steps: int, timesteps: Any, sigmas: Any) -> int:
        """Iterations of the denoising loop, from a copy of the scheduler (some schedulers repeat timesteps)."""
        scheduler = copy.deepcopy(self.scheduler)
        return len(retrieve_timesteps(scheduler, num_inference_steps, "cpu", timesteps, sigmas)[0])

    def _capture_timestep(self, plan: _GuidancePlan) -> Callable:
        """A UNet forward pre-hook: one UNet call = one denoising-loop iteration; record its index and timestep."""

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            plan.step_index += 1
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            if plan.step_index == 0:
                if self._num_timesteps != plan.num_steps:
                    raise RuntimeError(
                        f"Expected {plan.num_steps} denoising steps from the scheduler, the pipeline runs {self._num_timesteps}."
                    )
                # The loop's timestep lives on the UNet's device; reading it at every step for the head lookup would
                # be a host-device sync per step. Read the schedule once per call instead.
                plan.timestep_values = self.scheduler.timesteps.tolist()
            plan.timestep = timestep
            if plan.step_index < len(plan.timestep_values):
                scheduled = plan.timestep_values[plan.step_index]
                on_host = not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu"
                # On the host the check is free: use the schedule only where it is the timestep the UNet gets.
                if not on_host or math.isclose(_timestep_value(timestep), scheduled, rel_tol=0, abs_tol=1e-4):
                    plan.timestep = scheduled

        return hook

    def _guide_h(self, plan: _GuidancePlan) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """The mid-block hook function: h -> moved h on guided steps."""

        def guide(h: torch.Tensor) -> torch.Tensor | None:
            if not plan.is_guided(plan.step_index):
                return None
            cfg = self.do_classifier_free_guidance
            expected_rows = plan.num_images * (2 if cfg else 1)
            if h.shape[0] != expected_rows:
                raise RuntimeError(f"h has {h.shape[0]} rows; expected {expected_rows} for {plan.num_images} images.")
            first = plan.num_images if cfg and plan.branches == "cond" else 0
            for classifier in plan.classifiers:
                # Keep the heads where the UNet runs (this follows model offload): no per-step host-device copies.
                if classifier.weight.device != h.device:
                    classifier.to(h.device)
            if plan.targets[0].device != h.device:
                plan.targets = [target.to(h.device) for target in plan.targets]
            with torch.inference_mode(False), torch.enable_grad():
                h32 = h[first:].detach().float().clone().requires_grad_(True)
                total = h32.new_zeros(())
                for classifier, strength, target, temperature in zip(
                    plan.classifiers, plan.strengths, plan.targets, plan.temperatures
                ):
                    if strength == 0:
                        continue
                    logits = classifier(h32, plan.timestep)
                    if plan.mode == "sample":
                        target = target.repeat(h32.shape[0] // plan.num_images)
                    loss = guidance_loss(logits, plan.mode, target, plan.loss, temperature)
                    if plan.mode == "distribution":
                        # p_hat is a mean over N rows: scale by N so the per-row step does not depend on N.
                        loss = loss * h32.shape[0]
                    total = total + strength * loss
                if not total.requires_grad:
                    return None
                (grad,) = torch.autograd.grad(total, h32)
            moved = (h32.detach() - grad).to(h.dtype)
            return torch.cat([h[:first], moved]) if first else moved

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
        guidance_loss: str = "kl",
        classifier_temperature: float | None = None,
        guided_branches: str = "cond",
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
                loaded with `HClassifier.from_pretrained` (safetensors only; loaded once and cached on the pipeline).
                A list guides several attributes at once (losses summed); then `target_distribution`,
                `target_classes` and (optionally) `guidance_strength` take one entry per classifier.
            guidance_mode (`str`, *optional*):
                `None` (vanilla Stable Diffusion, bit-for-bit), `"sample"` (each image towards a class) or
                `"distribution"` (the batch towards a distribution of classes).
            target_distribution (`list[float]`, `torch.Tensor` or `str`, *optional*):
                Distribution mode: per classifier a probability vector over its classes (non-negative, sums to 1) or
                the name of one class (a one-hot target). Needs at least 2 images.
            target_classes (`int`, `str` or `list`, *optional*):
                Sample mode: per classifier one class (index or name) for all images, or a list of one class per
                image (`len == batch size x num_images_per_prompt`, in the order of the output images).
            guidance_strength (`float` or `list[float]`, *optional*, defaults to `DEFAULT_GUIDANCE_STRENGTH`):
                The step size `lambda` (one for all classifiers or one per classifier, >= 0). On each guided step,
                each guided row i of h moves as `h_i' = h_i - lambda * grad_{h_i}(L)`, where for sample mode
                `L = -sum_i softmax(logits_i / T)[c_i]` and for distribution mode `L = N * D(p_hat, p_ref)` with N
                the number of rows in the statistics, so the step per image does not depend on the batch size.
                The authors' Stable Diffusion setting (`h - 600 * grad(500 * KL)` over 2 x 4 rows) is
                `guidance_strength = 600 * 500 / 8 = 37500` with `guided_branches="both"`.
            guidance_steps (`tuple[float, float]` or `list[int]`, *optional*, defaults to `(0.0, 1.0)`):
                Which denoising steps are guided: a tuple `(start, end)` of fractions guides loop steps i with
                `start <= i / num_steps < end`; a list gives explicit step indices (0-based, as in
                `callback_on_step_end`).
            guidance_loss (`str`, *optional*, defaults to `"kl"`):
                Distribution mode divergence: `"kl"` (KL(p_hat || p_ref), as the authors' SD code) or `"chi2"`
                (chi-square, as their unconditional code).
            classifier_temperature (`float`, *optional*):
                Softmax temperature T; defaults to each classifier's `config.temperature` (8, as the authors).
            guided_branches (`str`, *optional*, defaults to `"cond"`):
                With classifier-free guidance the UNet sees `[uncond; cond]`. `"cond"` moves only the conditional rows
                and takes statistics over the images the user gets; `"both"` moves all rows with statistics over
                all of them (the authors' code). Without classifier-free guidance every row is an image.

        Examples:
            ```py
            >>> pipe = BalancingActPipeline.from_pretrained("path/to/sd")
            >>> images = pipe(
            ...     "a photo of a face",
            ...     num_images_per_prompt=8,
            ...     h_classifier="path/to/classifiers/skin",
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
                "target_classes, guidance_strength, guidance_steps, guidance_loss, classifier_temperature, "
                "guided_branches."
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
        if guidance_mode is not None and guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"`guidance_mode` must be None, 'sample' or 'distribution'; got {guidance_mode!r}.")
        if guidance_mode is None or h_classifier is None:
            if guidance_mode is not None:
                logger.warning(f"`guidance_mode={guidance_mode!r}` without `h_classifier`: no guidance is applied.")
            return super().__call__(**standard)

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
            guidance_loss,
            classifier_temperature,
            guided_branches,
            batch_size * (num_images_per_prompt or 1),
            self._count_denoising_steps(num_inference_steps, timesteps, sigmas),
            height,
            width,
        )

        pre_hook = self.unet.register_forward_pre_hook(self._capture_timestep(plan), with_kwargs=True)
        try:
            with MidBlockHook(self.unet, self._guide_h(plan)):
                return super().__call__(**standard)
        finally:
            pre_hook.remove()
