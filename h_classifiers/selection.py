"""The selection baseline: what a user with compute to spare does instead of guidance.

Generate vanilla images (image i with seed `seed + i`, one generator per image, as every configuration does), read
each with a labeller, and keep an image only while its class still has room, until the target counts are filled.
The target counts are the largest-remainder apportionment of the number of images over the target
(`metrics.class_counts`, the counts distribution guidance aims at); an image the labeller cannot read (-1) is never
kept. Generation stops when every count is filled, or when `max_images` have been generated (default
`SELECTION_MAX_FACTOR` x the number of images): the report then says which classes fell short.

The images are generated in rounds (`selection_rounds`): first the rounds the vanilla configuration makes of its
`num_images` images, so the first images are exactly vanilla's, then rounds of `batch_size x processes` more images
until the counts are filled. Every process generates its share of a round (`generation.generate_batches` with an
accelerate `state`) and labels its own images; the labels are gathered after each round, so every process takes the
same decision to go on or to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .distributed import gather_indexed, num_processes
from .generation import Generation, batch_ranges, generate_batches, nsfw_flags
from .metrics import class_counts


# The default cap on the images generated: this many times the number of images asked for.
SELECTION_MAX_FACTOR = 20


def default_max_images(num_images: int) -> int:
    return SELECTION_MAX_FACTOR * num_images


def check_max_images(max_images: int | None, num_images: int, argument: str = "max_images") -> int:
    """`max_images` (None: `SELECTION_MAX_FACTOR` x `num_images`), at least `num_images`."""
    if max_images is None:
        return default_max_images(num_images)
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < num_images:
        raise ValueError(
            f"`{argument}` must be an integer >= the number of images kept ({num_images}): selection generates at "
            f"least that many; got {max_images!r}."
        )
    return max_images


def selection_rounds(num_images: int, round_size: int, max_images: int) -> Iterator[range]:
    """The image indices of each round: `batch_ranges(num_images, round_size)` (the rounds of the vanilla
    configuration), then rounds of `round_size` images, the last one cut at `max_images`."""
    yield from batch_ranges(num_images, round_size)
    for start in range(num_images, max_images, round_size):
        yield range(start, min(start + round_size, max_images))


class Selector:
    """Keeps images in the order they come while their class (or joint cell) still has room.

    Args:
        counts: the number of images to keep of each class (e.g. `metrics.class_counts(target, n)`).
        max_images: the cap on the images offered; None: no cap (the caller stops).
    """

    def __init__(self, counts: Sequence[int], max_images: int | None = None):
        self.counts = [int(c) for c in counts]
        if not self.counts or min(self.counts) < 0:
            raise ValueError(f"`counts` must be non-negative class counts, got {list(counts)}.")
        self.max_images = max_images
        self.kept_counts = [0] * len(self.counts)
        self.kept: list[int] = []  # indices of the kept images, in the order offered
        self.offered = 0
        self.labelled = 0

    @property
    def filled(self) -> bool:
        return self.kept_counts == self.counts

    def offer(self, labels: Sequence[int] | torch.Tensor) -> list[int]:
        """Offer the next images (their labels, -1 for an image the labeller could not read); returns the indices
        (in the whole sequence offered) of those kept. Images offered after the counts are filled are counted as
        generated but not kept."""
        kept = []
        for label in torch.as_tensor(labels, dtype=torch.long).flatten().tolist():
            index = self.offered
            self.offered += 1
            if label >= len(self.counts):
                raise ValueError(f"Label {label} of image {index} is out of range for {len(self.counts)} classes.")
            if label < 0:
                continue
            self.labelled += 1
            if self.kept_counts[label] < self.counts[label]:
                self.kept_counts[label] += 1
                self.kept.append(index)
                kept.append(index)
        return kept

    def report(self) -> dict[str, Any]:
        """What selection cost and whether it filled the counts (`shortfall`: images missing per class)."""
        kept = len(self.kept)
        return {
            "images_generated": self.offered,
            "images_kept": kept,
            "images_generated_per_kept": self.offered / kept if kept else None,
            "filled": self.filled,
            "target_counts": list(self.counts),
            "kept_counts": list(self.kept_counts),
            "shortfall": [c - k for c, k in zip(self.counts, self.kept_counts)],
            "max_images": self.max_images,
            "generated_valid_rate": self.labelled / self.offered if self.offered else None,
        }


@dataclass
class SelectionRun:
    images: list[Image.Image]  # the kept images, in generation order
    labels: torch.Tensor  # their labels
    seconds: float  # wall time of generating every image generated (the cost), labelling excluded
    report: dict[str, Any]  # `Selector.report()`, with `labelling_seconds` (and `generated_blacked_out`)


def generate_selection(
    pipe,
    prompt: str | None,
    target: Sequence[float],
    num_images: int,
    labeller: Callable[[list[Image.Image]], torch.Tensor],
    seed: int,
    batch_size: int,
    max_images: int | None = None,
    progress: Callable[[int], None] | None = None,
    state=None,
    **call_kwargs: Any,
) -> SelectionRun:
    """
    Generate vanilla images and keep them to the target counts (see the module docstring).

    Args:
        prompt: the prompt of every image; None for an unconditional pipeline (each call gets `batch_size=`).
        target: the class probabilities; `class_counts(target, num_images)` images of each class are kept.
        labeller: images -> class index per image, -1 when it cannot label one.
        max_images: the cap on the images generated (None: `SELECTION_MAX_FACTOR` x `num_images`).
        progress: called after each round with the number of images newly kept.
        state: an accelerate state of several processes (None: one process).
        call_kwargs: arguments of every pipeline call (`num_inference_steps`, `guidance_scale`, `eta`, ...).
    """
    max_images = check_max_images(max_images, num_images)
    selector = Selector(class_counts(target, num_images), max_images)
    kept_images: dict[int, Image.Image] = {}
    kept_labels: dict[int, int] = {}
    seconds = labelling = 0.0
    checked, blacked_out = False, 0
    for images in selection_rounds(num_images, batch_size * num_processes(state), max_images):
        start = time.perf_counter()
        # One round, generated as `generate_batches` generates it within a longer run: image i keeps seed + i.
        batches = list(
            generate_batches(
                pipe,
                None if prompt is None else [prompt] * len(images),
                seed + images.start,
                batch_size,
                state=state,
                num_images=len(images) if prompt is None else None,
                output_type="pil",
                **call_kwargs,
            )
        )
        seconds += time.perf_counter() - start
        start = time.perf_counter()
        mine = []
        for batch in batches:
            flags = nsfw_flags(batch.output)
            labels = labeller(batch.output.images).tolist()
            for i, image, flag, label in zip(batch.indices, batch.output.images, flags, labels):
                # A blacked-out image says nothing about the attribute: unlabelled, never kept.
                mine.append((images.start + i, (image, flag, -1 if flag else label)))
        labelling += time.perf_counter() - start
        start = time.perf_counter()
        gathered = gather_indexed(mine, state)  # every process decides on the same labels
        seconds += time.perf_counter() - start
        checked = checked or any(flag is not None for _, flag, _ in gathered)
        blacked_out += sum(bool(flag) for _, flag, _ in gathered)
        kept = selector.offer([label for _, _, label in gathered])
        for index in kept:
            image, _, label = gathered[index - images.start]
            kept_images[index], kept_labels[index] = image, label
        if progress is not None:
            progress(len(kept))
        if selector.filled:
            break
    report = selector.report() | {"labelling_seconds": labelling}
    if checked:
        report["generated_blacked_out"] = blacked_out
    order = sorted(kept_images)
    labels = torch.tensor([kept_labels[i] for i in order], dtype=torch.long)
    return SelectionRun([kept_images[i] for i in order], labels, seconds, report)


def run_selection(
    pipe,
    spec,
    call_kwargs: dict[str, Any],
    labeller: Callable[[list[Image.Image]], torch.Tensor] | None,
    progress: Callable[[int], None] | None = None,
    **options: Any,
):
    """The `selection` configuration of `evaluation.run_configuration`: an `EvaluationSpec`'s images with vanilla's
    `call_kwargs`, kept to the target counts. Returns a `generation.Generation` of the kept images, with their
    `labels` and the `selection` report (a blacked-out image is never kept: `generated_blacked_out` counts them)."""
    if labeller is None:
        raise ValueError("The selection configuration reads every image it generates: pass a `labeller`.")
    unsupported = sorted(set(options) - {"state"})
    if unsupported:
        raise ValueError(
            f"The selection configuration takes only `state` of the generation options, got {unsupported}: which "
            "images it keeps depends on their labels, so it can neither skip images nor hand out batches as made."
        )
    call_kwargs = {k: v for k, v in call_kwargs.items() if k != "num_images"}  # it sizes its own rounds
    run = generate_selection(
        pipe,
        spec.prompt,
        spec.target,
        spec.num_images,
        labeller,
        spec.seed,
        spec.batch_size,
        spec.selection_max_images,
        progress,
        options.get("state"),
        **call_kwargs,
    )
    return Generation(run.images, run.seconds, None, None, run.labels, run.report)
