"""Image-space guidance, the lab's peer of the unconditional table: the baseline the paper compares with ("universal guidance", Bansal et al., 2023, forward
guidance): a small classifier reads the predicted clean image x0_hat, and the gradient of its loss with respect to the
noisy sample x_t steers DDIM sampling of an unconditional pixel model.

- `X0Classifier`: a small CNN over images `[B, 3, H, W]` in [-1, 1] that gives class logits for one attribute; saved
  as safetensors + config.json (attribute, class names), the folder written atomically.
- `ImageSpaceGuidance`: the sampler. At every DDIM step, with x_t requiring grad:
  `eps = unet(x_t, t)`, `x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, `L = guidance_loss(classifier(x0_hat),
  classes)`, and `eps' = eps + scale * sqrt(1 - abar_t) * dL/dx_t` (classifier guidance written for eps); x_{t-1} is
  the DDIM step (with eta) of eps', the scheduler's clipping of x0 applied to the unguided part only
  (`scheduler.step(eps) + ddim_eps_slope * (eps' - eps)`, which is `scheduler.step(eps')` when nothing clips). One UNet
  backward per step: a guided step costs about 2.5 plain ones (toy DDPM, CPU).

Classes: sample mode guides image i to `target_classes[i]`; distribution mode turns `target_distribution` into exact
class counts for the batch (`largest_remainder`, or a `BalanceState` across calls) and assigns them to the images by
the min-cost assignment on the classifier's `-log p` (`assign_classes`, re-solved every step with the same switching
cost), as the h-space pipeline's default solver does. The loss is the pipeline's `guidance_loss` (cross-entropy with a
margin). So the baseline and Balancing Act differ in where the signal is read and applied (pixels and x_t versus h),
not in the objective.

`ImageSpaceGuidance` is a callable with the call signature the generation loop uses for an unconditional pipeline
(`batch_size`, a `generator` list, `num_inference_steps`, `eta`, `target_classes` / `target_distribution`,
`output_type`), like `baselines.FairDiffusion`; with `scale=0` its images are `DDIMPipeline`'s, bit for bit.
`lab/train_x0_classifier.py` trains the toy DDPM's x0 classifiers, kept in `lab/assets/toy-ddpm-x0/`
(docs/lab/unconditional.md). Research code: not part of the installed package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from h_classifiers.io_utils import atomic_directory
from h_classifiers.metrics import parse_target
from h_classifiers.toy_world import TOY_DDPM_PATH
from pipeline_balancing_act import (
    SWITCH_PENALTY,
    BalanceState,
    HClassifier,
    assign_classes,
    guidance_loss,
    largest_remainder,
    looks_like_local_path,
)


# Chosen by `lab/sweep_image_guidance.py` on the toy DDPM, on seeds disjoint from the evaluation's
# (docs/lab/results/sweep_image_guidance.md).
DEFAULT_IMAGE_GUIDANCE_SCALE = 0.1
# The toy DDPM's x0 classifiers, one folder per attribute (lab/train_x0_classifier.py).
TOY_X0_CLASSIFIERS_PATH = Path(__file__).resolve().parent / "assets" / "toy-ddpm-x0"


class X0Classifier(ModelMixin, ConfigMixin):
    r"""
    A small CNN that reads one attribute from an image `[B, C, H, W]` in [-1, 1] (a predicted clean image x0_hat
    during sampling): a 3x3 convolution, then one stride-2 3x3 convolution per further width, SiLU between them,
    global average pooling and a linear layer to the class logits. Images of another size than `sample_size` are
    resized (bilinear, antialiased: differentiable) first.

    Args:
        attribute (`str`): Name of the attribute, e.g. `"skin"`.
        class_names (`list[str]`): The K >= 2 class names; class index = position in this list.
        in_channels (`int`, defaults to 3): Image channels.
        sample_size (`int`, defaults to 32): The image size it was trained on.
        block_out_channels (`list[int]`, defaults to `(16, 32, 64, 64)`): The widths; each after the first halves
            the resolution.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        attribute: str = "attribute",
        class_names: Sequence[str] = ("class_0", "class_1"),
        in_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: Sequence[int] = (16, 32, 64, 64),
    ):
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"`class_names` must name at least 2 classes, got {list(class_names)}.")
        if not block_out_channels or min(block_out_channels) < 1:
            raise ValueError(f"`block_out_channels` must be positive widths, got {list(block_out_channels)}.")
        widths = list(block_out_channels)
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        for before, after in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.SiLU(), torch.nn.Conv2d(before, after, 3, stride=2, padding=1)]
        self.features = torch.nn.Sequential(*layers, torch.nn.SiLU())
        self.head = torch.nn.Linear(widths[-1], len(class_names))

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    # The same name-or-index rule (and error) as the h-classifier's; it reads only `config.attribute/class_names`.
    class_index = HClassifier.class_index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `[B, K]` of images `[B, C, H, W]` in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`images` must have shape [B, {self.config.in_channels}, H, W] (values in [-1, 1]), got "
                f"{list(images.shape)}."
            )
        size = self.config.sample_size
        if tuple(images.shape[2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.features(images).mean(dim=(2, 3)))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`ModelMixin.save_pretrained` (safetensors + config.json) into a new folder that then takes the place of
        `save_directory` (`io_utils.atomic_directory`): an interrupted save leaves the old classifier or the new
        one."""
        if kwargs.get("safe_serialization", True) is False or kwargs.get("push_to_hub"):
            raise ValueError("`X0Classifier.save_pretrained` writes safetensors to a local folder only.")
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> X0Classifier:
        """Load a folder written by `save_pretrained` (or a Hub id). Safetensors only: a file or pickled checkpoint
        is refused, never unpickled."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            raise ValueError(
                f"`x0_classifier` {path!r} is a file; expected a folder written by `X0Classifier.save_pretrained` "
                "(config.json + diffusion_pytorch_model.safetensors). Pickled checkpoints are refused."
            )
        if not os.path.isdir(path) and (looks_like_local_path(path) or kwargs.get("local_files_only")):
            raise FileNotFoundError(
                f"`x0_classifier` {path!r} does not exist; train one with `lab/train_x0_classifier.py`."
            )
        if kwargs.get("use_safetensors") is False:
            raise ValueError("`use_safetensors=False` is not supported: X0Classifier loads safetensors only.")
        return super().from_pretrained(path, **{**kwargs, "use_safetensors": True})


def predicted_x0(sample: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """The clean image the model predicts from x_t and its eps, `(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, in
    float32 and unclipped (what the guidance reads; the training script's augmentation makes the same)."""
    alpha_cumprod = alpha_cumprod.to(sample.device, torch.float32)
    return (sample.float() - (1 - alpha_cumprod).sqrt() * eps.float()) / alpha_cumprod.sqrt()


def ddim_eps_slope(scheduler: Any, timestep: int | torch.Tensor, eta: float) -> float:
    """How far one `DDIMScheduler.step` moves x_{t-1} per unit of eps when x0 is not clipped:
    `sqrt(1 - abar_prev - sigma_t^2) - sqrt(abar_prev (1 - abar_t) / abar_t)` (negative: more eps, less x)."""
    timestep = int(timestep)
    previous = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod[timestep]
    abar_prev = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
    sigma2 = eta**2 * scheduler._get_variance(timestep, previous)
    return float((1 - abar_prev - sigma2).sqrt() - (abar_prev * (1 - abar) / abar).sqrt())


def default_x0_classifier(model: str | os.PathLike | None, attribute: str) -> Path | None:
    """The lab's x0 classifier of `attribute` when `model` is the committed toy DDPM, else None."""
    if model is None or not Path(model).exists() or Path(model).resolve() != TOY_DDPM_PATH.resolve():
        return None
    path = TOY_X0_CLASSIFIERS_PATH / attribute
    return path if (path / "config.json").exists() else None


class ImageSpaceGuidance:
    """
    DDIM sampling of an unconditional pixel model (`pipe.unet`, `pipe.scheduler` as `DDIMPipeline` has them) guided
    by an `X0Classifier` on the predicted clean image (see the module docstring).

    Args:
        pipe: a `DDIMPipeline` / `DDPMPipeline` / `BalancingActUnconditionalPipeline` (its UNet is shared, its
            scheduler's config copied: the pipeline is left as it is).
        classifier: an `X0Classifier` or a folder to load one from.
        scale: the guidance scale s in `eps' = eps + s * sqrt(1 - abar_t) * dL/dx_t` (>= 0; 0 is plain DDIM).
    """

    def __init__(self, pipe: Any, classifier: X0Classifier | str | os.PathLike, scale: float | None = None):
        from diffusers import DDIMScheduler

        if getattr(pipe, "text_encoder", None) is not None or not hasattr(pipe, "unet"):
            raise ValueError(
                "Image-space guidance samples an unconditional pixel model (a DDIMPipeline / DDPMPipeline folder); "
                f"got a {type(pipe).__name__}, which is not one."
            )
        scale = DEFAULT_IMAGE_GUIDANCE_SCALE if scale is None else scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"`scale` must be a finite number >= 0, got {scale!r}.")
        if not isinstance(classifier, X0Classifier):
            classifier = X0Classifier.from_pretrained(classifier)
        self.pipe, self.scale = pipe, float(scale)
        classifier = classifier if classifier.dtype == torch.float32 else classifier.float()
        self.classifier = classifier.to(pipe.unet.device).eval().requires_grad_(False)
        # DDIMPipeline's own conversion (a DDPM checkpoint's scheduler becomes DDIM), on a copy the pipeline keeps
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                "Image-space guidance needs a model that predicts the noise (scheduler `prediction_type` 'epsilon'); "
                f"this one predicts {self.scheduler.config.prediction_type!r}."
            )

    @property
    def groups(self) -> list[dict[str, Any]]:
        """What a `BalanceState` counts for this classifier (the h-space pipeline's format)."""
        config = self.classifier.config
        return [{"attributes": [config.attribute], "class_names": [list(config.class_names)]}]

    def _targets(
        self, batch_size: int, target_classes: Any, target_distribution: Any, balance_state: BalanceState | None
    ) -> tuple[torch.Tensor | None, list[int] | None]:
        """Sample mode: (the class of each image, None); distribution mode: (None, the class counts of the batch)."""
        if (target_classes is None) == (target_distribution is None):
            raise ValueError(
                "Give `target_classes` (sample mode: one class, or one per image) or `target_distribution` "
                "(distribution mode: a probability per class, or a class name), exactly one of them."
            )
        if target_classes is not None:
            if balance_state is not None:
                raise ValueError("`balance_state` counts a distribution-mode job; sample mode takes none.")
            values = target_classes if isinstance(target_classes, (list, tuple)) else [target_classes]
            classes = [self.classifier.class_index(v) for v in values]
            if len(classes) not in (1, batch_size):
                raise ValueError(
                    f"`target_classes` must be one class or one per image ({batch_size}), got {len(classes)}."
                )
            return torch.tensor(classes * (batch_size if len(classes) == 1 else 1)), None
        names = list(self.classifier.config.class_names)
        target = torch.tensor(parse_target(target_distribution, names, argument="target_distribution"))
        if balance_state is not None:
            counts = balance_state.batch_counts(self.groups, [target], batch_size)[0]
        elif batch_size < 2:
            raise ValueError(
                "Distribution mode with `batch_size=1` has no distribution to balance: pass a `balance_state` to "
                "balance a job across calls, or use sample mode (`target_classes`)."
            )
        else:
            counts = largest_remainder(target, batch_size)
        return None, counts.tolist()

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        target_classes: Any = None,
        target_distribution: Any = None,
        balance_state: BalanceState | None = None,
    ) -> ImagePipelineOutput | tuple:
        """`DDIMPipeline.__call__`'s arguments and output, plus the targets: `target_classes` (sample mode: a class
        name or index for all images, or one per image) or `target_distribution` (distribution mode: K
        probabilities, 'uniform' or a class name; exact counts per batch, or per job with a `balance_state`).
        """
        pipe, unet, scheduler = self.pipe, self.pipe.unet, self.scheduler
        fixed, counts = self._targets(batch_size, target_classes, target_distribution, balance_state)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        device = pipe._execution_device
        image = randn_tensor(
            (batch_size, unet.config.in_channels, height, width), generator=generator, device=device, dtype=unet.dtype
        )
        scheduler.set_timesteps(num_inference_steps)
        fixed = None if fixed is None else fixed.to(device)
        assigned = None  # distribution mode: the last assignment (a change of class costs SWITCH_PENALTY)
        for t in pipe.progress_bar(scheduler.timesteps):
            shift = None  # the change of eps that the guidance asks for
            if self.scale == 0:
                model_output = unet(image, t).sample  # exactly DDIMPipeline's step
            else:
                with torch.enable_grad():
                    x = image.detach().requires_grad_(True)
                    eps = unet(x, t).sample
                    abar = scheduler.alphas_cumprod[int(t)].to(device=device, dtype=torch.float32)
                    logits = self.classifier(predicted_x0(x, eps, abar))
                    if fixed is None:
                        cost = -torch.log_softmax(logits.detach(), dim=1)
                        if assigned is not None:
                            cost = cost + SWITCH_PENALTY * (1.0 - F.one_hot(assigned, cost.shape[1]).float())
                        assigned = assign_classes(cost, counts)
                    loss = guidance_loss(logits, fixed if fixed is not None else assigned)
                    grad = torch.autograd.grad(loss, x)[0]
                model_output, shift = eps.detach(), self.scale * (1 - abar).sqrt() * grad
            image = scheduler.step(
                model_output,
                t,
                image,
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                generator=generator,
            ).prev_sample
            if shift is not None:
                # The step of eps + shift, with the scheduler's clipping applied to the unguided x0 only (as ADM's
                # classifier guidance adds its shift after clipping). `step(eps + shift)` itself would clip the
                # guided x0 but keep the shift in the direction term: where x0 saturates (early steps, or always for
                # a poor model) the guidance would then point away from the class (measured on a UNet whose x0
                # saturates). Without clipping the two are the same.
                image = image + (ddim_eps_slope(scheduler, t, eta) * shift).to(image.dtype)

        if balance_state is not None:  # the classes the images came out as, read by the classifier
            balance_state.update(self.groups, [self.classifier(image.float()).argmax(1)])
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = pipe.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def resolve_x0_classifier(
    x0_classifier: str | os.PathLike | None, h_classifier: Any = None, model: str | os.PathLike | None = None
) -> tuple[str, X0Classifier]:
    """The x0 classifier of a comparison with an h-classifier, and its path: `x0_classifier`, or (None) the lab's one
    of the h-classifier's attribute when `model` is the toy DDPM. It must read the h-classifier's attribute and classes
    (the target and the measure are those of the h-classifier)."""
    attribute = getattr(getattr(h_classifier, "config", None), "attribute", None)
    if x0_classifier is None and attribute is not None:
        x0_classifier = default_x0_classifier(model, attribute)
    if x0_classifier is None:
        raise ValueError(
            "Image-space guidance needs an x0 classifier: a folder written by `X0Classifier.save_pretrained`, e.g. by "
            "`lab/train_x0_classifier.py`; only the toy DDPM has ones in the lab (lab/assets/toy-ddpm-x0)."
        )
    path = os.fspath(x0_classifier)
    classifier = X0Classifier.from_pretrained(path)
    if h_classifier is not None:
        ours, theirs = classifier.config, h_classifier.config
        if (ours.attribute, list(ours.class_names)) != (theirs.attribute, list(theirs.class_names)):
            raise ValueError(
                f"The x0 classifier {path!r} reads {ours.attribute!r} {list(ours.class_names)}, but the h-"
                f"classifier reads {theirs.attribute!r} {list(theirs.class_names)}; give an x0 classifier of the same "
                "attribute and classes."
            )
    return path, classifier


def comparison_sampler(
    pipe: Any, h_classifier: Any, x0_classifier: str | os.PathLike | None, scale: float | None = None
) -> ImageSpaceGuidance:
    """The sampler of the reproduction table's `image_guidance` jobs (`resolve_x0_classifier`, the model being the
    pipeline's `name_or_path`)."""
    _, classifier = resolve_x0_classifier(x0_classifier, h_classifier, getattr(pipe, "name_or_path", None))
    return ImageSpaceGuidance(pipe, classifier, scale)
