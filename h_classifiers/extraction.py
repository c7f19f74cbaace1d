"""Extract h-vectors (the UNet mid-block output) at every denoising step, for training h-classifiers.

Two recipes, both batched and resumable, both writing the feature store format (`h_classifiers.feature_store`):

- `extract_from_folders`: labelled images, one sub-folder per class (class names = folder names). Each image is
  VAE-encoded (the latent distribution's mean) and inverted with deterministic DDIM (eta = 0) through the UNet with
  an inversion prompt (classifier-free guidance off by default; an SDXL pipeline adds the pooled embedding and the
  size ids of the image's size, as its generation does); h is recorded at every step (`h_classifiers.inversion`). An
  unconditional pixel-space pipeline (`BalancingActUnconditionalPipeline`, the paper's unconditional setting) inverts
  the images themselves, at its UNet's size, without a prompt.
- `extract_from_generation`: the paper's recipe for Stable Diffusion (and SDXL). The pipeline generates images from
  prompts, h is recorded at every step (the conditional rows of `[uncond; cond]` by default), and a labeller
  (`h_classifiers.labellers`) labels the finished images (pseudo-labels). With `prompts=None` the same for an
  unconditional pipeline (`BalancingActUnconditionalPipeline`, the paper's unconditional setting).

Images are assigned to chunks by their position in a fixed plan (the sorted file list, or the seed/prompt list), so
a resumed run writes exactly the shards an uninterrupted run writes. With several processes (`state`, an accelerate
`PartialState`: `accelerate launch ... -m h_classifiers.cli extract`) the pending chunks are shared between them, each
process writes its own chunks and the main process the manifest: the store is the one a single process writes.

Step index s refers to the scheduler's timesteps in generation order (s = 0 is the noisiest step), in both recipes.
With `pool_size` g both store h average-pooled to g x g (all a pooled classifier reads: `HClassifier(pool_size=g)`),
the manifest recording `pool_size` and `pooled_from`, the shape of h before pooling.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .feature_store import FORMAT_VERSION, _BatchResult, _check_dtype, _prepare_output_dir, _run_chunks
from .generation import generate_batches, nsfw_flags
from .inversion import (
    HRecorder,
    ddim_schedule,
    encode_inversion_prompt,
    invert_and_record,
    is_xl_pipeline,
    list_labelled_images,
    load_image,
)
from .io_utils import json_default
from .labellers import Labeller
from .preflight import RECORD_BRANCHES as RECORD_BRANCHES


# ----------------------------------------------------------------------------------------------------------------
# Shared recipe machinery
# ----------------------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _scheduler_info(scheduler) -> dict:
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    # A value of a custom scheduler's config that JSON cannot hold is recorded as its text rather than failing.
    encode = functools.partial(json_default, fallback=str)
    return json.loads(json.dumps({"class": type(scheduler).__name__, "config": config}, default=encode))


def _model_name(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "unknown")


def _timesteps_list(timesteps: torch.Tensor) -> list[float | int]:
    values = timesteps.detach().cpu()
    if values.is_floating_point():
        return [float(v) for v in values.tolist()]
    return [int(v) for v in values.tolist()]


def _split_branches(calls: list[torch.Tensor], n: int, cfg: bool, branches: list[str]) -> dict[str, torch.Tensor]:
    """[T x [rows, C, H, W]] -> branch -> [T, n, C, H, W]; with classifier-free guidance rows are [uncond; cond]."""
    stacked = torch.stack(calls)
    if not cfg:
        return {"cond": stacked}
    if stacked.shape[1] != 2 * n:
        raise RuntimeError(f"Expected h with {2 * n} rows ([uncond; cond]), got {stacked.shape[1]}.")
    rows = {"uncond": stacked[:, :n], "cond": stacked[:, n:]}
    return {b: rows[b].contiguous() for b in branches}


def _check_branches(record_branch: str, cfg: bool) -> list[str]:
    if record_branch not in RECORD_BRANCHES:
        raise ValueError(f"`record_branch` must be one of {list(RECORD_BRANCHES)}, got {record_branch!r}.")
    if record_branch != "cond" and not cfg:
        raise ValueError(
            f"`record_branch={record_branch!r}` needs classifier-free guidance (`guidance_scale` > 1): without it the "
            "UNet sees only the conditional branch."
        )
    return ["uncond", "cond"] if record_branch == "both" else [record_branch]


def _resolution(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    for name, value in (("height", height), ("width", width)):
        _check_positive_int(name, value)
        if value % pipe.vae_scale_factor:
            raise ValueError(
                f"`{name}` must be a multiple of the VAE scale factor {pipe.vae_scale_factor}, got {value}."
            )
    return height, width


def _pooled_from(pipe, height: int, width: int, pool_size: int | None) -> list[int] | None:
    """The shape [C, H, W] of the h that a store of `pool_size` pools (None: a flat store), at `height` x `width`
    pixels; a grid larger than h is refused."""
    if pool_size is None:
        return None
    from pipeline_balancing_act import mid_block_h_shape

    _check_positive_int("pool_size", pool_size)
    scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
    shape = mid_block_h_shape(pipe.unet, height // scale, width // scale)
    if pool_size > min(shape[1:]):
        raise ValueError(
            f"`pool_size` {pool_size} is larger than h: the UNet gives h of shape {shape} at {height}x{width} pixels; "
            f"give a pool size of at most {min(shape[1:])}."
        )
    return shape


def _pipeline_name(pipe) -> str:
    """The Balancing Act pipeline that guides the store's model (recorded in the manifest; the model card's usage)."""
    if _is_unconditional(pipe):
        return "BalancingActUnconditionalPipeline"
    return "BalancingActXLPipeline" if is_xl_pipeline(pipe) else "BalancingActPipeline"


def _unet_size(pipe) -> tuple[int, int]:
    """An unconditional pipeline's image (height, width): its UNet's `sample_size`."""
    size = pipe.unet.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_unconditional(pipe) -> bool:
    """A pipeline without a text encoder: an unconditional one (`BalancingActUnconditionalPipeline`)."""
    return getattr(pipe, "text_encoder", None) is None


def _check_unconditional(pipe, negative_prompt, height, width, record_branch: str, **prompt_settings: Any) -> None:
    """Refuses what an unconditional pipeline has no use for; `prompt_settings` (argument name -> value) are further
    prompt settings of the recipe, refused when set (not None or "")."""
    if not _is_unconditional(pipe):
        raise ValueError("`prompts=None` is for an unconditional pipeline; this one has a text encoder: give prompts.")
    if record_branch != "cond":
        raise ValueError(
            f"`record_branch={record_branch!r}`: an unconditional pipeline has no classifier-free guidance, every row "
            "the UNet sees is an image: record 'cond' (all of them)."
        )
    settings = {**prompt_settings, "negative_prompt": negative_prompt, "height": height, "width": width}
    given = [name for name, value in settings.items() if value not in (None, "")]
    if given:
        raise ValueError(
            f"{given}: an unconditional pipeline takes no prompt and makes images of its UNet's size (no classifier-free "
            "guidance, no height or width)."
        )


# ----------------------------------------------------------------------------------------------------------------
# Recipe 1: labelled folders + DDIM inversion
# ----------------------------------------------------------------------------------------------------------------


def extract_from_folders(
    pipe,
    image_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    inversion_prompt: str = "",
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    record_branch: str = "cond",
    class_names: Sequence[str] | None = None,
    attribute: str | None = None,
    batch_size: int = 16,
    chunk_size: int = 256,
    dtype: str = "fp16",
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    state=None,
    pool_size: int | None = None,
) -> dict:
    """Recipe 1: labelled image folders -> DDIM inversion -> h at every step. Returns the manifest.

    Args:
        pipe: a `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (or a subclass), or an unconditional
            pixel-space pipeline (no VAE, no text encoder: `BalancingActUnconditionalPipeline`, `DDIMPipeline`), which
            inverts the images themselves at its UNet's `sample_size`, takes none of the prompt settings
            (`inversion_prompt`, `guidance_scale` other than 1, `negative_prompt`, `height`, `width`, `record_branch`
            other than "cond") and writes a manifest with `"prompts": None` and `"guidance_scale": None`, as
            `extract_from_generation` does. Its scheduler's config defines the DDIM schedule.
        image_dir: one sub-folder per class; class names are the folder names (sorted, or in `class_names` order).
        output_dir: new or empty directory, or the directory of an interrupted run with the same arguments (resumed).
        inversion_prompt: the text condition used during inversion (default: empty prompt).
        guidance_scale: classifier-free guidance during inversion; 1.0 (default) turns it off.
        record_branch: with guidance, which rows of [uncond; cond] to store: "cond", "uncond" or "both".
        chunk_size: images per chunk (the unit of resumption); `batch_size`: images per UNet call.
        dtype: storage dtype, "fp16" (default) or "fp32".
        pool_size: None (default) stores h as the UNet gives it; g stores h average-pooled to g x g, what a pooled
            classifier (`balancing-act train` of this store) reads: C * g * g values per image and step.
        state: an accelerate `PartialState` of several processes (each makes its share of the chunks), or None.
    Unreadable or corrupt images are skipped with a warning and listed in the manifest ("skipped").
    """
    output_dir = Path(output_dir)
    batch_size, chunk_size = (
        _check_positive_int("batch_size", batch_size),
        _check_positive_int("chunk_size", chunk_size),
    )
    num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
    storage_dtype = _check_dtype(dtype)
    unconditional = _is_unconditional(pipe)
    if unconditional:
        if getattr(pipe, "vae", None) is not None:
            raise ValueError(
                "`pipe` has a VAE but no text encoder: the folder recipe inverts with a Stable Diffusion pipeline or "
                "an unconditional pixel-space one (a UNet on the images, e.g. `BalancingActUnconditionalPipeline`)."
            )
        _check_unconditional(
            pipe,
            negative_prompt,
            height,
            width,
            record_branch,
            inversion_prompt=inversion_prompt,
            guidance_scale=None if guidance_scale == 1.0 else guidance_scale,
        )
    elif not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 1.0:
        raise ValueError(
            f"`guidance_scale` must be a number >= 1 (1 = no classifier-free guidance), got {guidance_scale!r}."
        )
    cfg = not unconditional and guidance_scale > 1.0
    branches = _check_branches(record_branch, cfg)
    height, width = _unet_size(pipe) if unconditional else _resolution(pipe, height, width)
    pooled_from = _pooled_from(pipe, height, width, pool_size)
    class_names, plan = list_labelled_images(image_dir, class_names)
    scheduler = ddim_schedule(pipe, num_inference_steps)
    timesteps = _timesteps_list(scheduler.timesteps)
    run = {
        "format_version": FORMAT_VERSION,
        "recipe": "inversion",
        "model": _model_name(pipe),
        "pipeline": _pipeline_name(pipe),
        "scheduler": _scheduler_info(scheduler),
        "num_inference_steps": num_inference_steps,
        "timesteps": timesteps,
        "guidance_scale": None if unconditional else float(guidance_scale),
        "prompts": None if unconditional else [inversion_prompt],
        "negative_prompt": negative_prompt,
        "branches": branches,
        "dtype": str(storage_dtype).replace("torch.", ""),
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "seed": None,
        "height": height,
        "width": width,
        "plan": {"image_dir": str(Path(image_dir).resolve()), "images": [p for p, _ in plan]},
        "class_names": class_names,
        "attribute": attribute,
        "label_source": "folders",
        "site": "mid_block",  # where h is recorded (a key kept from the versions with other sites)
        "pool_size": pool_size,
        "pooled_from": pooled_from,
    }
    manifest = _prepare_output_dir(output_dir, run, state)
    if not unconditional:
        condition = encode_inversion_prompt(pipe, inversion_prompt, negative_prompt, cfg, height, width)
    image_processor = getattr(pipe, "image_processor", None)  # None: a plain [-1, 1] conversion (pixel space)

    def process_batch(items: list[int]) -> _BatchResult:
        tensors, records, skipped = [], [], []
        for i in items:
            rel, label = plan[i]
            try:
                tensors.append(load_image(Path(image_dir) / rel, height, width, image_processor))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                warnings.warn(f"Skipping unreadable image {rel!r}: {error}")
                skipped.append({"index": i, "path": rel, "error": f"{type(error).__name__}: {error}"})
                continue
            records.append({"index": i, "path": rel, "label": label, "class": class_names[label]})
        if not records:
            return _BatchResult({b: torch.zeros(0) for b in branches}, torch.zeros(0, dtype=torch.long), [], skipped)
        n = len(records)
        embeds, added = (None, None) if unconditional else condition.rows(n, cfg)
        scale = 1.0 if unconditional else guidance_scale
        calls, _ = invert_and_record(
            pipe, torch.stack(tensors), scheduler, embeds, scale, storage_dtype, pool_size, added
        )
        labels = torch.tensor([r["label"] for r in records], dtype=torch.long)
        return _BatchResult(_split_branches(calls, n, cfg, branches), labels, records, skipped)

    return _run_chunks(output_dir, manifest, plan, chunk_size, batch_size, process_batch, progress, "invert", state)


# ----------------------------------------------------------------------------------------------------------------
# Recipe 2: generation + pseudo-labels
# ----------------------------------------------------------------------------------------------------------------


def extract_from_generation(
    pipe,
    prompts: str | Sequence[str] | None,
    num_images: int,
    output_dir: str | os.PathLike,
    labeller: Labeller | Sequence[Labeller],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    record_branch: str = "cond",
    seed: int = 0,
    batch_size: int = 16,
    chunk_size: int = 256,
    dtype: str = "fp16",
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    state=None,
    eta: float | None = None,
    pool_size: int | None = None,
) -> dict:
    """Recipe 2: generate with `pipe`, record h at every step, pseudo-label the images with `labeller`.

    Image i uses prompt `prompts[i % len(prompts)]` and its own CPU generator seeded `seed + i`
    (`generation.generate_batches`), so the images (and a resumed run) do not depend on batch composition or device.
    The pipeline's own scheduler is used (recorded in the manifest); with a stochastic scheduler (eta > 0, ancestral
    samplers) h still matches the image it produced. Images the labeller cannot label (label -1, e.g. invalid toy
    images, or flagged by a safety checker) keep their h in the shards with label -1; readers drop them by default.

    Args:
        labeller: one `Labeller`, or several with distinct `attribute` names: each gives a label set (the first is
            stored in the shards, all are in the per-image records), so one generation serves several attribute
            classifiers (`HFeatureStore(..., label_set=...)`, `balancing-act train --attribute ...`).
        record_branch: with classifier-free guidance (`guidance_scale` > 1) the UNet sees [uncond; cond]: store the
            "cond" rows (default), the "uncond" rows or "both".
        prompts: None for an unconditional pipeline (`BalancingActUnconditionalPipeline`): each call gets
            `batch_size=`, `guidance_scale` is unused (recorded as None) and the images have the UNet's size (no
            `negative_prompt`, `height` or `width`).
        eta: passed to every call when given (DDIM's eta: 0 deterministic, 1 DDPM-like); recorded in the plan.
        Others as in `extract_from_folders`.
    """
    from pipeline_balancing_act import MidBlockHook

    output_dir = Path(output_dir)
    unconditional = prompts is None
    if unconditional:
        _check_unconditional(pipe, negative_prompt, height, width, record_branch)
    else:
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        if not prompts:
            raise ValueError("`prompts` must hold at least one prompt.")
    num_images = _check_positive_int("num_images", num_images)
    batch_size, chunk_size = (
        _check_positive_int("batch_size", batch_size),
        _check_positive_int("chunk_size", chunk_size),
    )
    num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
    storage_dtype = _check_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")
    labellers = [labeller] if isinstance(labeller, Labeller) else list(labeller)
    for item in labellers:
        if not isinstance(item, Labeller):
            raise TypeError(f"`labeller` must be h_classifiers.labellers.Labeller(s), got {type(item).__name__}.")
    attributes = [item.attribute for item in labellers]
    if not labellers or (len(labellers) > 1 and (None in attributes or len(set(attributes)) != len(attributes))):
        raise ValueError(
            f"`labeller` must be one labeller, or several with distinct attribute names (one label set each), got "
            f"attributes {attributes}."
        )
    labeller = labellers[0]
    if unconditional:
        guidance_scale = None
    elif not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
    cfg = not unconditional and guidance_scale > 1.0
    branches = _check_branches(record_branch, cfg)
    height, width = _unet_size(pipe) if unconditional else _resolution(pipe, height, width)
    pooled_from = _pooled_from(pipe, height, width, pool_size)
    call = {"eta": eta} if eta is not None else {}
    if not unconditional:
        call.update(guidance_scale=guidance_scale, height=height, width=width)
    planned = copy.deepcopy(pipe.scheduler)
    planned.set_timesteps(num_inference_steps)
    timesteps = _timesteps_list(planned.timesteps)
    run = {
        "format_version": FORMAT_VERSION,
        "recipe": "generation",
        "model": _model_name(pipe),
        "pipeline": _pipeline_name(pipe),
        "scheduler": _scheduler_info(pipe.scheduler),
        "num_inference_steps": num_inference_steps,
        "timesteps": timesteps,
        "guidance_scale": None if unconditional else float(guidance_scale),
        "prompts": prompts,
        "negative_prompt": negative_prompt,
        "branches": branches,
        "dtype": str(storage_dtype).replace("torch.", ""),
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "seed": seed,
        "height": height,
        "width": width,
        "plan": {"num_images": num_images} | ({"eta": float(eta)} if eta is not None else {}),
        "class_names": list(labeller.class_names),
        "attribute": labeller.attribute,
        "label_source": labeller.source,
        "label_sets": {
            item.attribute: {"class_names": list(item.class_names), "label_source": item.source}
            for item in labellers
            if item.attribute is not None
        },
        "site": "mid_block",  # where h is recorded (a key kept from the versions with other sites)
        "pool_size": pool_size,
        "pooled_from": pooled_from,
    }
    manifest = _prepare_output_dir(output_dir, run, state)
    plan = list(range(num_images))

    def process_batch(items: list[int]) -> _BatchResult:
        batch_prompts = None if unconditional else [prompts[i % len(prompts)] for i in items]
        recorder = HRecorder(storage_dtype, pool_size)
        seen_timesteps = []

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            seen_timesteps.append(timestep)
            return callback_kwargs

        with MidBlockHook(pipe.unet, recorder):
            # One call for the batch; `items` are consecutive image indices, so image items[j] is seeded seed + items[j].
            (generated,) = generate_batches(
                pipe,
                batch_prompts,
                seed + items[0],
                len(items),
                num_images=len(items) if unconditional else None,
                num_inference_steps=num_inference_steps,
                output_type="pil",
                callback_on_step_end=on_step_end,
                **call,
                **({"negative_prompt": [negative_prompt] * len(items)} if negative_prompt is not None else {}),
            )
        output = generated.output
        if len(recorder.calls) != len(timesteps) or _timesteps_list(torch.stack(seen_timesteps)) != timesteps:
            raise RuntimeError(
                f"Recorded {len(recorder.calls)} UNet calls at timesteps {seen_timesteps}, expected one per planned "
                f"timestep {timesteps}; this scheduler/pipeline calls the UNet differently."
            )
        every = [item(output.images) for item in labellers]
        # An image the safety checker blacked out is unlabelled (its h stays), and its record says so.
        flags = [bool(flag) for flag in nsfw_flags(output)]
        if any(flags):
            blacked = torch.tensor(flags)
            every = [torch.where(blacked, torch.full_like(labels, -1), labels) for labels in every]
        labels = every[0]
        records = [
            {"index": i}
            | ({} if unconditional else {"prompt": batch_prompts[j]})
            | {"seed": seed + i, "label": int(every[0][j])}
            | ({"labels": {a: int(lab[j]) for a, lab in zip(attributes, every)}} if attributes[0] is not None else {})
            | ({"blacked_out": True} if flags[j] else {})
            for j, i in enumerate(items)
        ]
        return _BatchResult(_split_branches(recorder.calls, len(items), cfg, branches), labels, records, [])

    return _run_chunks(output_dir, manifest, plan, chunk_size, batch_size, process_batch, progress, "generate", state)
