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

import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


DEFAULT_TEMPERATURE = 8.0
# Probabilities of a target distribution are clamped to at least this value inside the loss, so that a one-hot
# target (a class name) keeps KL / chi-square finite.
TARGET_PROB_FLOOR = 1e-3

GUIDANCE_MODES = ("sample", "distribution")
GUIDANCE_LOSSES = ("kl", "chi2")


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
    if isinstance(timestep, bool):
        raise TypeError("`timestep` must be an int, a float or a tensor, got bool.")
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

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """`ModelMixin.save_pretrained` (safetensors + config.json), written to temporary names then renamed."""
        if kwargs.get("push_to_hub") or kwargs.get("safe_serialization", True) is False:
            if kwargs.get("safe_serialization", True) is False:
                raise ValueError("`safe_serialization=False` is not supported: HClassifier weights are safetensors.")
            return super().save_pretrained(save_directory, **kwargs)
        import tempfile

        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-") as tmp:
            super().save_pretrained(tmp, **kwargs)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(save_directory, name))

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
