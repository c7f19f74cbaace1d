"""The one image-generation loop: batches of a pipeline call, image i with its own seed and its own prompt.

Image i of a run always uses a CPU generator seeded `seed + i`, prompt `prompts[i]` and row i of every per-image
argument, whatever the batch size, so the images do not depend on how they are batched (unless the pipeline couples
the images of a call, as distribution guidance does) nor on the device. Evaluation, the extraction recipe, the toy
report and the benchmark all generate through `generate_batches`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class GeneratedBatch:
    """One pipeline call: the image indices it generated (positions in the run) and the pipeline's output."""

    indices: range
    output: Any


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Split `range(n)` into ceil(n / batch_size) batches of near-equal size."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"`num_images` and `batch_size` must be positive, got {n} and {batch_size}.")
    num_batches = math.ceil(n / batch_size)
    bounds = [round(i * n / num_batches) for i in range(num_batches + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, image i seeded `seed + i`."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in indices]


def _rows(values: Any, batch: range) -> Any:
    if isinstance(values, torch.Tensor):  # e.g. prompt_embeds: one row per image
        return values[batch.start : batch.stop]
    return [values[i] for i in batch]


def generate_batches(
    pipe,
    prompts: Sequence[str] | None,
    seed: int,
    batch_size: int,
    per_image: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    **call_kwargs: Any,
) -> Iterator[GeneratedBatch]:
    """Calls `pipe` batch by batch and yields each call's output with the indices of its images.

    Args:
        prompts: one prompt per image; None when `per_image` holds `prompt_embeds` (one row per image) instead.
        seed: image i uses a CPU generator seeded `seed + i`.
        batch_size: images per call; the images are split into near-equal batches (`batch_ranges`).
        per_image: pipeline arguments with one entry per image (a list, or a tensor with one row per image, e.g.
            `target_classes`, `prompt_embeds`), sliced per batch.
        progress: called with the number of images after each batch.
        call_kwargs: arguments for every call (`num_inference_steps`, `output_type`, guidance arguments, ...).
    """
    per_image = dict(per_image or {})
    sizes = {key: len(values) for key, values in per_image.items()}
    if prompts is not None:
        sizes["prompts"] = len(prompts)
    if not sizes:
        raise ValueError("`prompts` is None and `per_image` is empty: nothing says how many images to generate.")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"`prompts` and every `per_image` value need one entry per image, got lengths {sizes}.")
    num_images = next(iter(sizes.values()))
    for batch in batch_ranges(num_images, batch_size):
        kwargs = {key: _rows(values, batch) for key, values in per_image.items()}
        if prompts is not None:
            kwargs["prompt"] = [prompts[i] for i in batch]
        output = pipe(generator=image_generators(seed, batch), **kwargs, **call_kwargs)
        if progress is not None:
            progress(len(batch))
        yield GeneratedBatch(batch, output)
