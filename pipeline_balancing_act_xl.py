# Copyright 2026 The Balancing Act diffusers contributors. Licensed under the Apache License, Version 2.0.
"""Balancing Act for Stable Diffusion XL (Parihar et al., CVPR 2024): `StableDiffusionXLPipeline` plus h-space
guidance.

A diffusers community pipeline for SDXL base models (two text encoders, `text_time` micro-conditioning), e.g.
`stabilityai/stable-diffusion-xl-base-1.0`, whose h = `unet.mid_block(...)` output is [B, 1280, 32, 32] at 1024 x 1024
pixels ([B, 1280, 16, 16] at 512). The guidance itself (`HClassifier`, calibration, anchors, exact counts,
`BalanceState`, the mid-block hook, the guidance arguments and their documentation) is not copied here: it is imported
from `pipeline_balancing_act.py`, which must be installed (`pip install` of this repository) or sit next to this file
(routes: docs/sdxl.md).
"""

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.utils import replace_example_docstring


# Only names that are not pipelines: diffusers' `custom_pipeline` loader takes the one `DiffusionPipeline` subclass of
# this module, so `BalancingActPipeline` must not be imported here.
if __package__:
    # Loaded by diffusers' `custom_pipeline` loader as `diffusers_modules.<...>.<file>`: diffusers reads this relative
    # import and copies (local folder) or downloads (Hub repo) `pipeline_balancing_act.py` from the same place.
    from .pipeline_balancing_act import (
        _CURRENT_RUN,
        DEFAULT_GUIDANCE_STRENGTH,
        BalanceState,
        BalancingActMixin,
        GuidanceArguments,
        HClassifier,
        MidBlockHook,
        _GuidanceRun,
        guidance_args_docstring,
        is_compiled,
        tokenizer_lock,
        unexpected_keywords_message,
    )
else:
    # A top-level module: the installed package, or the repository root on `sys.path`. Written `import ... as`, not
    # `from ... import`: diffusers' loader scans a custom pipeline's `from X import` lines for missing packages and
    # would tell a Hub user (who runs the branch above) to `pip install pipeline_balancing_act`, not a PyPI package.
    import pipeline_balancing_act as _core

    _CURRENT_RUN = _core._CURRENT_RUN
    DEFAULT_GUIDANCE_STRENGTH = _core.DEFAULT_GUIDANCE_STRENGTH
    BalanceState = _core.BalanceState
    BalancingActMixin = _core.BalancingActMixin
    GuidanceArguments = _core.GuidanceArguments
    HClassifier = _core.HClassifier
    MidBlockHook = _core.MidBlockHook
    _GuidanceRun = _core._GuidanceRun
    guidance_args_docstring = _core.guidance_args_docstring
    is_compiled = _core.is_compiled
    tokenizer_lock = _core.tokenizer_lock
    unexpected_keywords_message = _core.unexpected_keywords_message


# The arguments of `StableDiffusionXLPipeline.__call__`, passed on as they are (read from it, not copied).
_STABLE_DIFFUSION_XL_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(StableDiffusionXLPipeline.__call__).parameters.items()
    if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from pipeline_balancing_act_xl import BalancingActXLPipeline

        >>> pipe = BalancingActXLPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16, variant="fp16"
        ... ).to("cuda")
        >>> images = pipe(
        ...     "a photo of a doctor",
        ...     num_images_per_prompt=8,
        ...     h_classifier="path/to/gender-h-classifier",  # trained on this UNet's h at 1024 px, [1280, 32, 32]
        ...     guidance_mode="distribution",
        ...     target_distribution=[0.5, 0.5],
        ... ).images
        ```
"""


class BalancingActXLPipeline(BalancingActMixin, StableDiffusionXLPipeline):
    r"""
    Stable Diffusion XL with Balancing Act h-space guidance (Parihar et al., CVPR 2024): during denoising, the UNet
    bottleneck h = `unet.mid_block(...)` is read by h-classifiers and moved towards classes, per image
    (`guidance_mode="sample"`) or to a target distribution over the batch (`"distribution"`, debiasing).

    Everything else is `StableDiffusionXLPipeline` (components, arguments, micro-conditioning, schedulers, callbacks,
    LoRA, offload, `torch.compile` without `fullgraph=True`, `denoising_end` for a refiner); with `guidance_mode=None`
    the output is identical. Guidance acts only on the call that asked for it: pipelines sharing these components
    (`from_pipe`) in other threads run unguided.
    """

    # words of the error messages and of the argument documentation
    _images_argument = "batch size x num_images_per_prompt"
    _unguided_name = "vanilla Stable Diffusion XL"
    _wrapped_call = "StableDiffusionXLPipeline.__call__"

    # `wraps`: the arguments and documentation are `StableDiffusionXLPipeline.encode_prompt`'s (as `inspect.signature`
    # and `help` show them: diffusers' tests read its arguments), not `*args, **kwargs`.
    @functools.wraps(StableDiffusionXLPipeline.encode_prompt)
    def encode_prompt(self, *args, **kwargs):
        # A fast tokenizer keeps its padding and truncation settings on the (shared) object: calls take turns on it.
        # Both tokenizers are held, each once, in one order (by id), so two pipelines sharing them cannot deadlock.
        tokenizers = {id(t): t for t in (self.tokenizer, self.tokenizer_2) if t is not None}
        with contextlib.ExitStack() as held:
            for key in sorted(tokenizers):
                held.enter_context(tokenizer_lock(tokenizers[key]))
            return super().encode_prompt(*args, **kwargs)

    def _loop_steps(self, timesteps: torch.Tensor) -> int:
        """How many of `timesteps` the denoising loop runs: all of them, or with `denoising_end` those at or above its
        cut-off (the arithmetic of `StableDiffusionXLPipeline.__call__`, "8.1 Apply denoising_end")."""
        end = self.denoising_end
        if not (end is not None and isinstance(end, float) and 0 < end < 1):
            return len(timesteps)
        train_steps = self.scheduler.config.num_train_timesteps
        cutoff = int(round(train_steps - (end * train_steps)))
        return sum(1 for t in timesteps.cpu() if t >= cutoff)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        # Called once per call, after the batch size, image size and timesteps are set: where a guided call starts.
        current = _CURRENT_RUN.get()
        if current is not None and current[0] is self and not current[1].started:
            run, schedule = current[1], getattr(self.scheduler, "timesteps", None)
            # With `denoising_end` diffusers cuts the schedule after this point and the loop runs its first steps
            # only (the base part of a refiner hand-off): the run starts on those, so that its step count, its
            # `guidance_steps` and its heads are the loop's. The scheduler's timesteps are put back at once. (No
            # schedule yet, or the previous call's: `start_guidance` refuses it and says why.)
            fresh = schedule is not None and schedule is not run.stale_timesteps
            steps = self._loop_steps(schedule) if fresh else None
            cut = steps is not None and steps < len(schedule)
            if cut:
                self.scheduler.timesteps = schedule[:steps]
            try:
                cfg, scale = self.do_classifier_free_guidance, self.guidance_scale
                self.start_guidance(run, batch_size, height, width, device, cfg, scale)
            finally:
                if cut:
                    self.scheduler.timesteps = schedule
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
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
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
    ) -> StableDiffusionXLPipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation. The arguments from `prompt` to
        `callback_on_step_end_tensor_inputs`, their defaults, `**kwargs` (the deprecated `callback` and
        `callback_steps`) and the return value are exactly those of [`StableDiffusionXLPipeline.__call__`]; the
        Balancing Act arguments below are added. With `denoising_end` (a base + refiner hand-off) a guided call is
        the steps this pipeline runs: `guidance_steps` counts those steps, and the refiner runs unguided.

        Args:

        Examples:

        Returns:
            [`~pipelines.stable_diffusion_xl.StableDiffusionXLPipelineOutput`] or `tuple`, as
            `StableDiffusionXLPipeline`.
        """
        arguments = locals()
        unknown = sorted(set(kwargs) - {"callback", "callback_steps"})
        if unknown:
            raise TypeError(
                unexpected_keywords_message(BalancingActXLPipeline, unknown, _STABLE_DIFFUSION_XL_ARGUMENTS)
            )
        guidance = self.check_guidance_inputs(GuidanceArguments.from_call(arguments))
        standard = {name: arguments[name] for name in _STABLE_DIFFUSION_XL_ARGUMENTS} | kwargs
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
