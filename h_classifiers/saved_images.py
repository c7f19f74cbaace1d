"""`generate --save-images DIR`: every image as a PNG named by its index and seed, and a JSONL manifest.

    DIR/vanilla/000123_seed123.png     image 123 of the vanilla set (seed = --seed + 123)
    DIR/balanced/000123_seed123.png    image 123 of the guided set
    DIR/manifest.jsonl                 one line per image: file, set, index, seed, prompt, process index, settings,
                                       predicted class (the labeller's, else the h-classifier's reading)

Each PNG carries its own record (a PNG text chunk `balancing-act`: index, seed, prompt, the process that made it,
the run's settings, the h-classifier's reading of its h at the last step) and is written atomically
(`io_utils.atomic_save_image`), so a PNG that exists is complete and says what it is. A run with the same arguments
resumes: every process lists the saved images before any process writes (`distributed.wait`), then generation skips
what is complete (a whole round of a global batch, or one process's batch). The main process writes the manifest at
the end from the PNGs, in index order: one line per requested image, never a duplicate, never half-written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .distributed import is_main, num_processes, process_index, wait
from .generation import GeneratedBatch
from .io_utils import TEMP_PREFIX, atomic_save_image, atomic_write_text


RECORD_KEY = "balancing-act"
MANIFEST_NAME = "manifest.jsonl"
NAME_PATTERN = re.compile(r"^(\d{6,})_seed(-?\d+)\.png$")


def image_name(index: int, seed: int) -> str:
    return f"{index:06d}_seed{seed}.png"


def read_record(path: str | Path) -> dict | None:
    """The record a saved PNG carries, or None (not ours)."""
    with Image.open(path) as image:
        text = image.info.get(RECORD_KEY)
    return json.loads(text) if text else None


class LastStepReading:
    """The h-classifier's class for each image of a pipeline call, read from h at the call's last denoising step
    (calibrated logits, before any guidance move; the reading guidance itself counts): a `MidBlockHook` keeps the
    last h, read after the call. Use as a context manager around the calls."""

    def __init__(self, pipe, classifier):
        from pipeline_balancing_act import MidBlockHook

        self.pipe, self.classifier = pipe, classifier
        self.h: torch.Tensor | None = None
        self._hook = MidBlockHook(pipe.unet, self._keep)

    def _keep(self, h: torch.Tensor) -> None:
        self.h = h.detach()

    def __enter__(self) -> LastStepReading:
        self._hook.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hook.__exit__(*exc_info)

    def classes(self, num_images: int) -> list[str]:
        """The classes of the last call's `num_images` images (its last rows: [uncond; cond] with CFG)."""
        timestep = self.pipe.scheduler.timesteps[-1]
        logits = self.classifier.calibrated_logits(self.h[-num_images:], timestep)
        names = list(self.classifier.config.class_names)
        return [names[k] for k in logits.argmax(1).tolist()]


class ImageSet:
    """The saved images of one set (e.g. `vanilla`, `balanced`) of a run: what is done, saving, loading.

    Args:
        root: the `--save-images` directory; this set lives in `root / name`.
        prompts, seed: image i has prompt `prompts[i]` and seed `seed + i`.
        settings: what defines the images (model, mode, target, steps, global batch, ...); a saved image with other
            settings means the directory holds another run: an error, never a mix.
        batch_size: the per-process batch, recorded with each image.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        prompts: Sequence[str],
        seed: int,
        settings: dict[str, Any],
        state=None,
        batch_size: int | None = None,
    ):
        self.root, self.name, self.dir = Path(root), name, Path(root) / name
        self.prompts, self.seed, self.settings = list(prompts), seed, json.loads(json.dumps(settings))
        self.state, self.batch_size = state, batch_size
        self.reading: LastStepReading | None = None
        self.done = self._scan()
        if is_main(state) and self.dir.is_dir():  # what an interrupted write left (never a saved image)
            for leftover in self.dir.glob(f"{TEMP_PREFIX}*"):
                leftover.unlink(missing_ok=True)
        wait(state)  # every process has listed the saved images before any process writes one

    def _scan(self) -> set[int]:
        done = set()
        if not self.dir.is_dir():
            return done
        for path in sorted(self.dir.glob("*.png")):
            match = NAME_PATTERN.match(path.name)
            record = read_record(path) if match else None
            if record is None:
                continue
            saved = record.get("settings") or {}
            if saved != self.settings:
                differing = sorted(k for k in {**saved, **self.settings} if saved.get(k) != self.settings.get(k))
                raise ValueError(
                    f"`--save-images` {str(self.root)!r} holds images of another run ({self.name}/{path.name} differs "
                    f"in {differing}); pass the same arguments to resume it, or choose another directory."
                )
            index = int(match.group(1))
            if index < len(self.prompts) and int(match.group(2)) == self.seed + index:
                done.add(index)
        return done

    def path(self, index: int) -> Path:
        return self.dir / image_name(index, self.seed + index)

    def skip(self, indices: range) -> bool:
        """Whether every image of `indices` is already saved (as listed when the run started)."""
        return all(i in self.done for i in indices)

    def on_batch(self, batch: GeneratedBatch) -> None:
        """Save the images of a generated batch, each with its record (an image saved before is left as it is: a
        round of a global batch is generated again when one of its images is missing)."""
        classes = self.reading.classes(len(batch.indices)) if self.reading is not None else None
        for j, (index, image) in enumerate(zip(batch.indices, batch.output.images)):
            if index in self.done:
                continue
            record = {
                "file": f"{self.name}/{image_name(index, self.seed + index)}",
                "set": self.name,
                "index": index,
                "seed": self.seed + index,
                "prompt": self.prompts[index],
                "process_index": process_index(self.state),
                "num_processes": num_processes(self.state),
                "batch_size": self.batch_size,
                "settings": self.settings,
            }
            if classes is not None:
                record["classifier_class"] = classes[j]
            info = PngInfo()
            info.add_text(RECORD_KEY, json.dumps(record))
            atomic_save_image(image, self.path(index), pnginfo=info)

    def generation_options(self, pipe=None, classifier=None) -> dict[str, Any]:
        """`skip` and `on_batch` for `generation.generate_batches` (with `pipe` and `classifier`: the classifier's
        reading is recorded too; generate inside `with self.reading:`)."""
        if pipe is not None and classifier is not None:
            self.reading = LastStepReading(pipe, classifier)
        return {"skip": self.skip, "on_batch": self.on_batch}

    def load(self) -> tuple[list[dict], list[Image.Image]]:
        """Every requested image's record and image, in index order (after every process has finished)."""
        records, images = [], []
        for index in range(len(self.prompts)):
            path = self.path(index)
            if not path.is_file():
                raise RuntimeError(f"Image {index} of the {self.name!r} set is missing: {path}.")
            with Image.open(path) as image:
                records.append(json.loads(image.info[RECORD_KEY]))
                images.append(image.convert("RGB"))
        return records, images


def write_manifest(root: str | Path, lines: list[dict]) -> Path:
    """`root/manifest.jsonl`, one JSON object per line, written atomically."""
    path = Path(root) / MANIFEST_NAME
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return path
