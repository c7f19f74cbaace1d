"""DDIM inversion of images: loading a labelled image folder, the DDIM schedule and its deterministic moves, the text
condition of the inversion (Stable Diffusion's prompt embeddings; SDXL's add the pooled embedding and the size ids),
and h recorded at every step (the first recipe of `h_classifiers.extraction`).

Step index s refers to the scheduler's timesteps in generation order (s = 0 is the noisiest step).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class HRecorder:
    """Collects h from `MidBlockHook` calls: one entry per UNet call, moved to the CPU in the storage dtype. With
    `pool_size` g, h is average-pooled to g x g on its device first (in float32): what a pooled classifier reads."""

    def __init__(self, dtype: torch.dtype, pool_size: int | None = None):
        self.dtype, self.pool_size = dtype, pool_size
        self.calls: list[torch.Tensor] = []

    def __call__(self, h: torch.Tensor) -> None:
        h = h.detach()
        if self.pool_size is not None:
            h = F.adaptive_avg_pool2d(h.float(), self.pool_size)
        self.calls.append(h.to("cpu", self.dtype))
        return None


def list_labelled_images(image_dir: str | os.PathLike, class_names: Sequence[str] | None = None) -> tuple[list, list]:
    """Scans `image_dir/<class>/*.<image ext>`; returns (class names, [(relative path, class index)]) sorted."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"`image_dir` {str(image_dir)!r} is not a directory (expected one sub-folder per class)."
        )
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = folders
    class_names = list(class_names)
    if sorted(class_names) != folders:
        raise ValueError(
            f"`class_names` {class_names} must name exactly the sub-folders of `image_dir` {folders} (in any order)."
        )
    if len(class_names) < 2:
        raise ValueError(f"`image_dir` must hold at least 2 class sub-folders, found {folders}.")
    plan = []
    for k, name in enumerate(class_names):
        files = sorted(
            p for p in (image_dir / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"Class folder {str(image_dir / name)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
        plan.extend((p.relative_to(image_dir).as_posix(), k) for p in files)
    return class_names, plan


def load_image(path: Path, height: int, width: int, image_processor=None) -> torch.Tensor:
    """RGB, resized to cover (height, width) and centre-cropped; the pipeline's image processor (`VaeImageProcessor`)
    makes the float tensor [3, H, W] in [-1, 1] the VAE expects. A pipeline without one (an unconditional pixel-space
    model, whose UNet takes the image itself in [-1, 1]) passes None: a plain `VaeImageProcessor` does the same
    conversion.

    The resize and crop stay ours: `VaeImageProcessor.preprocess(..., resize_mode="crop")` floors the resized size
    where this rounds it and resamples with Lanczos where this uses bicubic, so an image that needs resizing would give
    another tensor (a 512x384 image at 32x32: max |difference| 0.13 on [-1, 1]); at the target size both agree.
    """
    with Image.open(path) as image:
        image.load()
        image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    if image_processor is None:
        from diffusers.image_processor import VaeImageProcessor

        # The image is already (height, width): no resize, only [0, 255] -> [-1, 1] ("vae" is a misnomer here).
        image_processor = VaeImageProcessor(vae_scale_factor=1, do_resize=False)
    return image_processor.preprocess(image, height=height, width=width)[0]


def _ddim_move(x: torch.Tensor, out: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor, prediction_type: str):
    """Deterministic DDIM move of x from noise level alpha_bar = a_from to a_to (eta = 0), in float32.

    Not `diffusers.DDIMInverseScheduler` (compared in tests/test_library_replacements.py): its loop evaluates the UNet
    at timestep t on the latent of the previous, lower level, so h would be recorded at pairs (x, t) that no generation
    sees (relative difference up to 0.35 on the toy model); calling its `step` with the next timestep reproduces these
    moves exactly only when the timesteps are evenly spaced by num_train_timesteps // steps (its fixed stride), and it
    refuses "linspace" spacing and mis-steps "trailing" spacing otherwise, where this move works for any DDIM schedule.
    """
    x32, out32 = x.float(), out.float()
    if prediction_type == "epsilon":
        eps = out32
        x0 = (x32 - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_from.sqrt() * x32 - (1 - a_from).sqrt() * out32
        eps = a_from.sqrt() * out32 + (1 - a_from).sqrt() * x32
    elif prediction_type == "sample":
        x0 = out32
        eps = (x32 - a_from.sqrt() * x0) / (1 - a_from).sqrt()
    else:
        raise ValueError(
            f"Unsupported scheduler `prediction_type` {prediction_type!r} (epsilon, v_prediction, sample)."
        )
    return (a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps).to(x.dtype)


def is_xl_pipeline(pipe) -> bool:
    """An SDXL pipeline (`StableDiffusionXLPipeline` or a subclass): two text encoders, a UNet that also takes the
    pooled text embedding and the size ids (`added_cond_kwargs`)."""
    from diffusers import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline)


@dataclass
class InversionCondition:
    """The text condition of one image's inversion, for the conditional row and (with classifier-free guidance) the
    unconditional one: encoder hidden states and, for SDXL, the UNet's `added_cond_kwargs` (`text_embeds`: the
    pooled embedding, `time_ids`: original size, crop corner, target size), as `StableDiffusionXLPipeline.__call__`
    builds them."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    added_cond: dict[str, torch.Tensor] | None = None
    added_uncond: dict[str, torch.Tensor] | None = None

    def rows(self, n: int, cfg: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(encoder hidden states, added conditioning) for `n` images: `[uncond; cond]` rows with `cfg`, else cond."""

        def repeat(cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
            rows = cond.expand(n, *cond.shape[1:])
            return torch.cat([uncond.expand(n, *uncond.shape[1:]), rows]) if cfg else rows

        embeds = repeat(self.cond, self.uncond)
        if self.added_cond is None:
            return embeds, None
        added = {
            k: repeat(v, None if self.added_uncond is None else self.added_uncond[k])
            for k, v in self.added_cond.items()
        }
        return embeds, added


def encode_inversion_prompt(
    pipe, prompt: str, negative_prompt: str | None, cfg: bool, height: int, width: int
) -> InversionCondition:
    """The condition of an inversion with `prompt` on a Stable Diffusion or SDXL pipeline; the SDXL size ids are
    those of a generation at `height` x `width` without cropping (original = target size, crop corner (0, 0)),
    `StableDiffusionXLPipeline.__call__`'s defaults."""
    device = pipe._execution_device
    if not is_xl_pipeline(pipe):
        cond, uncond = pipe.encode_prompt(
            prompt, device, 1, do_classifier_free_guidance=cfg, negative_prompt=negative_prompt
        )
        return InversionCondition(cond, uncond)
    cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
        prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt,
    )
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection_dim = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=cond.dtype, text_encoder_projection_dim=projection_dim
    ).to(device)
    added_uncond = {"text_embeds": negative_pooled, "time_ids": time_ids} if cfg else None
    return InversionCondition(cond, uncond, {"text_embeds": pooled, "time_ids": time_ids}, added_uncond)


@contextlib.contextmanager
def _upcast_vae(pipe) -> Iterator[None]:
    """An SDXL VAE that asks for it (`force_upcast`: SDXL base's overflows in float16) encodes in float32 and goes back
    to its dtype afterwards, as `StableDiffusionXLImg2ImgPipeline.prepare_latents` does; other pipelines unchanged."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = is_xl_pipeline(pipe) and dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype=dtype)


def ddim_schedule(pipe, num_inference_steps: int):
    """The DDIM scheduler (from the pipeline's scheduler config) set to `num_inference_steps`."""
    from diffusers import DDIMScheduler

    # Without `_use_default_values`: from_config would otherwise reset keys a pipeline fixed (e.g. steps_offset).
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


@torch.no_grad()
def invert_and_record(
    pipe,
    images: torch.Tensor,
    scheduler,
    prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    storage_dtype: torch.dtype = torch.float16,
    pool_size: int | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DDIM-inverts a batch of images ([-1, 1]); returns (h at every step in generation order, step 0 first; the
    inverted latents at the noisiest timestep, from which a DDIM generation with eta = 0 reconstructs the images).

    The clean latent is first moved to the lowest noise level of the schedule, then for each timestep t (ascending)
    the UNet is evaluated on the inverted latent x_t at t: h is recorded there (the pair (x_t, t) a generation sees)
    and the same prediction moves x_t to the next, noisier level. That is one UNet call more than the number of steps.

    A Stable Diffusion pipeline: the clean latent is the VAE's (the latent distribution's mode), and `prompt_embeds`
    conditions the UNet, [uncond; cond] when `guidance_scale` > 1, else cond only. An unconditional pixel-space
    pipeline (no VAE, no text encoder: `BalancingActUnconditionalPipeline`, `DDIMPipeline`): the clean latent is the
    image itself, `prompt_embeds` is None and `guidance_scale` 1 (the UNet takes no condition).

    An SDXL pipeline: `added_cond_kwargs` (`text_embeds`, `time_ids`; one row per row of `prompt_embeds`,
    `InversionCondition.rows`) goes to every UNet call, and a `force_upcast` VAE in float16 encodes in float32.

    `pool_size` g records h average-pooled to g x g (`HRecorder`).
    """
    from pipeline_balancing_act import MidBlockHook

    device, unet, vae = pipe._execution_device, pipe.unet, getattr(pipe, "vae", None)
    if getattr(pipe, "text_encoder", None) is not None and prompt_embeds is None:
        raise ValueError(
            "`prompt_embeds` is needed: this pipeline has a text encoder, its UNet takes a text condition."
        )
    if getattr(pipe, "text_encoder", None) is None and (prompt_embeds is not None or guidance_scale != 1.0):
        raise ValueError(
            f"A pipeline without a text encoder (an unconditional UNet) takes no condition: `prompt_embeds` must be "
            f"None and `guidance_scale` 1, got {'embeddings' if prompt_embeds is not None else None} and "
            f"{guidance_scale!r}."
        )
    if vae is not None:
        with _upcast_vae(pipe):
            latents = vae.encode(images.to(device, vae.dtype)).latent_dist.mode()
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:  # a VAE with per-channel statistics, as SDXL's pipelines treat it
            shape = (1, -1, 1, 1)
            mean, std = torch.tensor(mean).view(shape).to(latents), torch.tensor(std).view(shape).to(latents)
            latents = (latents - mean) * vae.config.scaling_factor / std
        else:
            latents = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    else:
        latents = images  # a pixel-space UNet denoises the image itself, in [-1, 1]
    latents = latents.to(device, unet.dtype)
    cfg = guidance_scale > 1.0
    condition = {} if prompt_embeds is None else {"encoder_hidden_states": prompt_embeds}
    if added_cond_kwargs is not None:
        condition["added_cond_kwargs"] = added_cond_kwargs
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    ascending = list(reversed(scheduler.timesteps.tolist()))
    prediction_type = scheduler.config.prediction_type
    recorder = HRecorder(storage_dtype, pool_size)

    def predict(x: torch.Tensor, t) -> torch.Tensor:
        model_in = torch.cat([x, x]) if cfg else x
        out = unet(model_in, t, **condition).sample
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    with MidBlockHook(unet, recorder):
        out = predict(latents, ascending[0])
        latents = _ddim_move(
            latents, out, scheduler.final_alpha_cumprod.float(), alphas[int(ascending[0])], prediction_type
        )
        recorder.calls.clear()  # the first call sees the clean latent: not a recorded step
        for j, t in enumerate(ascending):
            out = predict(latents, t)
            if j + 1 < len(ascending):
                latents = _ddim_move(latents, out, alphas[int(t)], alphas[int(ascending[j + 1])], prediction_type)
    return list(reversed(recorder.calls)), latents
