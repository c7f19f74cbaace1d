# Copyright 2026 The Balancing Act diffusers contributors. Licensed under the Apache License, Version 2.0.
"""Balancing Act for unconditional diffusion models (Parihar et al., CVPR 2024): `DDIMPipeline` plus h-space guidance.

A diffusers community pipeline for an unconditional `UNet2DModel`, e.g. `google/ddpm-celebahq-256`, the paper's main
setting (an unconditional DDPM of faces; h = `unet.mid_block(...)` output is [B, 512, 8, 8] at 256 x 256 pixels).
The guidance itself (`HClassifier`, calibration, anchors, exact counts, `BalanceState`, the mid-block hook, the
guidance arguments and their documentation) is not copied here: it is imported from `pipeline_balancing_act.py`,
which must be installed (`pip install` of this repository) or sit next to this file (routes: docs/unconditional.md).
"""

import contextlib
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import is_torch_xla_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor


# Only names that are not pipelines: diffusers' `custom_pipeline` loader takes the one `DiffusionPipeline` subclass of
# this module, so `BalancingActPipeline` must not be imported here.
if __package__:
    # Loaded by diffusers' `custom_pipeline` loader as `diffusers_modules.<...>.<file>`: diffusers reads this relative
    # import and copies (local folder) or downloads (Hub repo) `pipeline_balancing_act.py` from the same place.
    from .pipeline_balancing_act import (
        BalanceState,
        BalancingActMixin,
        GuidanceArguments,
        HClassifier,
        MidBlockHook,
        _GuidanceRun,
        guidance_args_docstring,
        is_compiled,
    )
else:
    # A top-level module: the installed package, or the repository root on `sys.path`. Written `import ... as`, not
    # `from ... import`: diffusers' loader scans a custom pipeline's `from X import` lines for missing packages and
    # would tell a Hub user (who runs the branch above) to `pip install pipeline_balancing_act`, not a PyPI package.
    import pipeline_balancing_act as _core

    BalanceState = _core.BalanceState
    BalancingActMixin = _core.BalancingActMixin
    GuidanceArguments = _core.GuidanceArguments
    HClassifier = _core.HClassifier
    MidBlockHook = _core.MidBlockHook
    _GuidanceRun = _core._GuidanceRun
    guidance_args_docstring = _core.guidance_args_docstring
    is_compiled = _core.is_compiled


# Class gaps per guided step for unconditional (pixel) models, chosen on the toy DDPM's tuning seeds by the rule that
# chose DEFAULT_GUIDANCE_STRENGTH on the toy SD (docs/lab/results/unconditional/sweep_strength.md): its decoder draws
# the face from h, so the text-to-image default moves it too far and breaks images.
DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH = 1.0


if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline

        >>> pipe = BalancingActUnconditionalPipeline.from_pretrained("google/ddpm-celebahq-256")
        >>> images = pipe(
        ...     batch_size=16,
        ...     eta=1.0,
        ...     num_inference_steps=50,
        ...     h_classifier="path/to/gender-h-classifier",  # trained on this UNet's h, [512, 8, 8]
        ...     guidance_mode="distribution",
        ...     target_distribution=[0.5, 0.5],
        ... ).images
        ```
"""


class BalancingActUnconditionalPipeline(BalancingActMixin, DDIMPipeline):
    r"""
    Unconditional image generation (`DDIMPipeline`) with Balancing Act h-space guidance (Parihar et al., CVPR 2024).

    During denoising, the UNet bottleneck h = `unet.mid_block(...)` is read by per-timestep linear h-classifiers
    (`HClassifier`) and moved towards classes, and the rest of the UNet (up blocks, same skip connections) runs on
    the moved h. `guidance_mode="distribution"` steers the batch to a target distribution of an attribute
    (debiasing): by default the target becomes exact class counts, assigned to the images at the least cost;
    `guidance_mode="sample"` steers each image to a class.

    Everything else is `DDIMPipeline`: the same components (a `UNet2DModel` with a mid block, and a scheduler, which
    `DDIMPipeline` turns into a `DDIMScheduler`), arguments and output. With `guidance_mode=None` and no
    `callback_on_step_end` the call is `DDIMPipeline.__call__` itself (bit-for-bit).

    Parameters:
        unet ([`UNet2DModel`]):
            A `UNet2DModel` to denoise the images. It must have a mid block (h is its output).
        scheduler ([`SchedulerMixin`]):
            A scheduler to be used in combination with `unet` to denoise the encoded image; converted to a
            [`DDIMScheduler`] as in `DDIMPipeline` (so `DDPMPipeline` checkpoints load too).
    """

    _callback_tensor_inputs = ["image"]
    # words of the error messages and of the argument documentation
    _images_argument = "batch_size"
    _unguided_name = "the plain DDIMPipeline"
    _wrapped_call = "BalancingActUnconditionalPipeline.__call__"

    @staticmethod
    def check_call_inputs(batch_size: Any, eta: Any, num_inference_steps: Any) -> None:
        """The `DDIMPipeline` arguments a wrong value of which would fail deep inside torch or give noise with only a
        warning: one-line `ValueError`s naming the argument instead."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            hint = " (an unconditional model takes no prompt)" if isinstance(batch_size, str) else ""
            raise ValueError(f"`batch_size` must be a positive integer{hint}; got {batch_size!r}.")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"`eta` must be a number from 0 (DDIM) to 1 (DDPM); got {eta!r}.")
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, numbers.Integral)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be a positive integer; got {num_inference_steps!r}.")

    def _sample_size(self) -> tuple[int, int]:
        """The (height, width) in pixels of the images this UNet generates (its `sample_size`)."""
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @guidance_args_docstring(
        unguided=_unguided_name,
        images=_images_argument,
        strength_divisor="1 (there is no classifier-free guidance)",
        strength_default="DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH",
    )
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["image"],
        h_classifier: "HClassifier | str | os.PathLike | Sequence[HClassifier | str | os.PathLike] | None" = None,
        guidance_mode: str | None = None,
        target_distribution: Any = None,
        target_classes: Any = None,
        guidance_strength: float | list[float] = DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH,
        guidance_steps: tuple[float, float] | list[int] = (0.0, 1.0),
        distribution_solver: str = "assign",
        classifier_temperature: float | None = None,
        balance_state: BalanceState | None = None,
        global_batch: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation. The arguments from `batch_size` to `return_dict`, their
        defaults and the return value are exactly those of [`DDIMPipeline.__call__`]; the arguments below are added.
        The Balancing Act arguments are those of `BalancingActPipeline.__call__` without classifier-free guidance:
        there is no prompt, every row the UNet sees is an image.

        Args:
            callback_on_step_end (`Callable`, `PipelineCallback`, `MultiPipelineCallbacks`, *optional*):
                A function or a subclass of `PipelineCallback` or `MultiPipelineCallbacks` called at the end of each
                denoising step as `callback_on_step_end(self, step: int, timestep: int, callback_kwargs: dict)`.
                `callback_kwargs` holds the tensors named by `callback_on_step_end_tensor_inputs`; a returned
                `"image"` replaces the sample. The callback must not run the UNet on a guided call (guidance reads
                and moves h once per step).
            callback_on_step_end_tensor_inputs (`list`, *optional*, defaults to `["image"]`):
                The tensor inputs of `callback_on_step_end`: a subset of `._callback_tensor_inputs` (`["image"]`, the
                sample being denoised).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`:
                If `return_dict` is `True`, [`~pipelines.ImagePipelineOutput`] is returned, otherwise a `tuple` is
                returned where the first element is a list with the generated images (as `DDIMPipeline`).
        """
        guidance = GuidanceArguments.from_call(locals())  # no guided_branches: every row is an image
        self.check_call_inputs(batch_size, eta, num_inference_steps)
        guidance = self.check_guidance_inputs(guidance)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                    f"{unknown}."
                )
        if guidance_mode is None and callback_on_step_end is None:
            return super().__call__(
                batch_size=batch_size,
                generator=generator,
                eta=eta,
                num_inference_steps=num_inference_steps,
                use_clipped_model_output=use_clipped_model_output,
                output_type=output_type,
                return_dict=return_dict,
            )

        run = None
        if guidance_mode is not None:
            settings = self.prepare_guidance(guidance)
            run = _GuidanceRun(settings, is_compiled(self.unet), getattr(self.scheduler, "timesteps", None))

        # As `DDIMPipeline.__call__` from here on, plus the guided call's start, its h function and its step ends.
        height, width = self._sample_size()
        image_shape = (batch_size, self.unet.config.in_channels, height, width)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                f" size of {batch_size}. Make sure the batch size matches the length of the generators."
            )

        device = self._execution_device
        image = randn_tensor(image_shape, generator=generator, device=device, dtype=self.unet.dtype)

        # set step values
        self.scheduler.set_timesteps(num_inference_steps)
        if run is not None:
            # checked against the batch, the UNet's h shape and the timesteps, before the first step
            self.start_guidance(run, batch_size, height, width, device, cfg=False, guidance_scale=1.0)
        with MidBlockHook(self.unet, run.on_h) if run is not None else contextlib.nullcontext():
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                # 1. predict noise model_output (on a guided step the up blocks run on the moved h)
                model_output = self.unet(image, t).sample

                # 2. predict previous mean of image x_t-1 and add variance depending on eta
                # eta corresponds to η in paper and should be between [0, 1]
                # do x_t -> x_t-1
                image = self.scheduler.step(
                    model_output,
                    t,
                    image,
                    eta=eta,
                    use_clipped_model_output=use_clipped_model_output,
                    generator=generator,
                ).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {"image": image}
                    callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    image = callback_outputs.pop("image", image)
                if run is not None:
                    run.end_step(i)  # h was read (and on a guided step moved) exactly once in step i

                if XLA_AVAILABLE:
                    xm.mark_step()
        if run is not None:
            run.finish()

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return ImagePipelineOutput(images=image)
