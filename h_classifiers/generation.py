"""The one image-generation loop: batches of a pipeline call, image i with its own seed and its own prompt.

Image i of a run always uses a CPU generator seeded `seed + i`, prompt `prompts[i]` and row i of every per-image
argument, whatever the batch size, so the images do not depend on how they are batched (unless the pipeline couples
the images of a call, as distribution guidance does) nor on the device. Evaluation, the extraction recipe, the toy
report and the benchmark all generate through `generate_batches`.

Several processes (an accelerate `state`, see `h_classifiers.distributed`): the images are generated in rounds of
`batch_size x num_processes` (`batch_ranges(n, batch_size * num_processes)`: the batches one process would make with
that batch size) and each process takes its contiguous part of every round (`split_between_processes`), so image i
keeps its seed and prompt whatever the number of processes. Distribution mode then guides each round as one global
batch (`global_batch=True`): P processes x batch B guide exactly the images that 1 process x batch P*B guides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import num_processes, share_range


@dataclass
class GeneratedBatch:
    """One pipeline call: the image indices it generated (positions in the run) and the pipeline's output."""

    indices: range
    output: Any


@dataclass
class Generation:
    """What one configuration of an evaluation generated (`evaluation.run_configuration`, `selection.run_selection`)."""

    images: list[Any]  # PIL images
    seconds: float
    asked: list[int] | None  # the class asked of each image (sample mode, prompt baseline), else None
    # The indices of the images the safety checker blacked out (None: the pipeline has no safety checker).
    blacked_out: list[int] | None = None
    labels: torch.Tensor | None = None  # selection: the kept images' labels, and `Selector.report()`
    selection: dict[str, Any] | None = None


def nsfw_flags(output: Any) -> list[bool | None]:
    """Per image of a pipeline output: whether its safety checker blacked it out (`nsfw_content_detected`); None for
    every image when no safety checker ran."""
    flags = getattr(output, "nsfw_content_detected", None)
    if flags is None:
        return [None] * len(output.images)
    return [bool(flag) for flag in flags]


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Split `range(n)` into ceil(n / batch_size) batches of near-equal size."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"`num_images` and `batch_size` must be positive, got {n} and {batch_size}.")
    num_batches = math.ceil(n / batch_size)
    bounds = [round(i * n / num_batches) for i in range(num_batches + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def process_rounds(n: int, batch_size: int, state=None) -> list[tuple[range, range]]:
    """(round, this process's batch) for every round: rounds are `batch_ranges(n, batch_size * num_processes)`, each
    split between the processes in order (`distributed.share_range`; a batch may be empty when a round holds fewer
    images than processes). One process: its batches, each its own round."""
    return [(images, share_range(images, state)) for images in batch_ranges(n, batch_size * num_processes(state))]


def check_global_rounds(n: int, batch_size: int, state=None) -> None:
    """A global batch needs every process in every call: a ValueError when a round leaves a process without an
    image (the same answer on every process)."""
    if any(len(batch) == 0 for _, batch in process_rounds(n, batch_size, state)):
        raise ValueError(
            f"{n} images in rounds of {batch_size} x {num_processes(state)} processes leave a process without an image "
            "in some round, and a global batch (distribution mode) needs every process in every call: use more "
            "images or a smaller batch size."
        )


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
    state=None,
    skip: Callable[[range], bool] | None = None,
    on_batch: Callable[[GeneratedBatch], None] | None = None,
    num_images: int | None = None,
    **call_kwargs: Any,
) -> Iterator[GeneratedBatch]:
    """Calls `pipe` batch by batch and yields each call's output with the indices of its images.

    Args:
        prompts: one prompt per image; None when `per_image` holds `prompt_embeds` (one row per image) instead, or
            for an unconditional pipeline (`num_images`).
        seed: image i uses a CPU generator seeded `seed + i`.
        batch_size: images per call; the images are split into near-equal batches (`batch_ranges`).
        per_image: pipeline arguments with one entry per image (a list, or a tensor with one row per image, e.g.
            `target_classes`, `prompt_embeds`), sliced per batch.
        progress: called with the number of images after each batch (with several processes: of each round, all
            processes together).
        state: an accelerate `PartialState` of several processes (`distributed.process_state()`), or None for one:
            this process generates its part of each round (see the module docstring) and yields only its batches.
            Distribution mode (`guidance_mode="distribution"`) then passes `global_batch=True` unless `call_kwargs`
            says otherwise, and needs every round to give each process at least one image.
        skip: called with a round of a global batch (else with this process's batch); True skips it (e.g. images
            already saved by an interrupted run). With a global batch every process must answer alike.
        on_batch: called with each batch after its call (e.g. to save its images at once).
        num_images: an unconditional pipeline (`prompts=None`): the number of images; each call gets
            `batch_size=` (its number of images) instead of prompts.
        call_kwargs: arguments for every call (`num_inference_steps`, `output_type`, guidance arguments, ...).
    """
    per_image = dict(per_image or {})
    sizes = {key: len(values) for key, values in per_image.items()}
    if prompts is not None:
        sizes["prompts"] = len(prompts)
    unconditional = num_images is not None
    if unconditional:
        if prompts is not None:
            raise ValueError("Give `prompts` (a text-to-image pipeline) or `num_images` (unconditional), not both.")
        sizes["num_images"] = num_images
    if not sizes:
        raise ValueError(
            "`prompts` and `num_images` are None and `per_image` is empty: nothing says how many images to generate."
        )
    if len(set(sizes.values())) != 1:
        raise ValueError(f"`prompts` and every `per_image` value need one entry per image, got lengths {sizes}.")
    num_images = next(iter(sizes.values()))
    rounds = process_rounds(num_images, batch_size, state)
    coupled = False  # one global batch per round: the processes' calls are coupled (collectives at every step)
    if num_processes(state) > 1 and call_kwargs.get("guidance_mode") == "distribution":
        coupled = bool(call_kwargs.setdefault("global_batch", True))
    if coupled:
        check_global_rounds(num_images, batch_size, state)
    for images, batch in rounds:
        if skip is not None and (coupled or len(batch)) and skip(images if coupled else batch):
            continue
        generated = None
        if len(batch):
            kwargs = {key: _rows(values, batch) for key, values in per_image.items()}
            if prompts is not None:
                kwargs["prompt"] = [prompts[i] for i in batch]
            elif unconditional:
                kwargs["batch_size"] = len(batch)
            generated = GeneratedBatch(batch, pipe(generator=image_generators(seed, batch), **kwargs, **call_kwargs))
            if on_batch is not None:
                on_batch(generated)
        if progress is not None:
            progress(len(images))
        if generated is not None:
            yield generated
