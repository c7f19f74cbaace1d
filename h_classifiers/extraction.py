"""Extract h-vectors (the UNet mid-block output) at every denoising step, for training h-classifiers.

Two recipes, both batched and resumable, both writing the same storage format:

- `extract_from_folders`: labelled images, one sub-folder per class (class names = folder names). Each image is
  VAE-encoded (the latent distribution's mean) and inverted with deterministic DDIM (eta = 0) through the UNet with
  an inversion prompt (classifier-free guidance off by default); h is recorded at every step.
- `extract_from_generation`: the paper's recipe for Stable Diffusion. The pipeline generates images from prompts,
  h is recorded at every step (the conditional rows of `[uncond; cond]` by default), and a labeller
  (`h_classifiers.labellers`) labels the finished images (pseudo-labels).

Storage (one output directory):

    manifest.json                      run description + per-image records (rewritten after each chunk)
    chunks/chunk_00000/step_000.safetensors   h of every image of the chunk at step 0 (generation order)
    chunks/chunk_00000/step_001.safetensors   ...
    chunks/chunk_00000/chunk.json             per-image records of the chunk (written last)
    chunks/chunk_00001/...

Each `step_XXX.safetensors` holds `h_<branch>` tensors `[n, C, H, W]` (fp16 by default; `branch` is `cond` or
`uncond`), `labels` `[n]` (int64, -1 = unlabelled) and `image_index` `[n]` (position in the run's image plan), so one
timestep's slice is read by opening one small file per chunk. A chunk is built in a temporary directory (every file
written under a temporary name, then renamed) and renamed into place only when complete: an interrupted run leaves
no partial chunk, and the next run with the same arguments skips completed chunks and redoes only the missing ones.
Images are assigned to chunks by their position in a fixed plan (the sorted file list, or the seed/prompt list), so
a resumed run writes exactly the shards an uninterrupted run writes.

Step index s refers to the scheduler's timesteps in generation order (s = 0 is the noisiest step), in both recipes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline_balancing_act import MidBlockHook

from .labellers import Labeller


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNKS_DIR = "chunks"
CHUNK_INFO_NAME = "chunk.json"
CHUNK_PATTERN = re.compile(r"^chunk_(\d{5})$")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
RECORD_BRANCHES = ("cond", "uncond", "both")
# Manifest keys that define a run: a resumed run must match them exactly.
RUN_KEYS = (
    "format_version",
    "recipe",
    "model",
    "scheduler",
    "num_inference_steps",
    "timesteps",
    "guidance_scale",
    "prompts",
    "negative_prompt",
    "branches",
    "dtype",
    "chunk_size",
    "batch_size",
    "seed",
    "height",
    "width",
    "plan",
    "class_names",
    "attribute",
    "label_source",
    "label_sets",
)


# ----------------------------------------------------------------------------------------------------------------
# Atomic file writes
# ----------------------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` with the permissions a plain `mkdir` would give (mkdtemp makes it private)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())
    return path


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes it private; the renamed file should be like any other
    return Path(name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file` to a temporary name, then rename."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HSlice:
    """One timestep's slice: `features` [N, C, H, W] (storage dtype), `labels` [N] and `image_index` [N]."""

    features: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor


class HFeatureStore:
    """Reads an extraction output directory, one timestep at a time.

    Only completed chunks are visible. `load_timestep(step)` opens one file per chunk and reads only the requested
    branches, so memory is bounded by one timestep's slice.

    Args:
        root: the extraction output directory.
        label_set: which labels to read when the generation recipe ran several labellers (one per attribute, see
            `manifest["label_sets"]`); default: the first labeller's, stored in the shards.
    """

    def __init__(self, root: str | os.PathLike, label_set: str | None = None):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"`features_dir` {str(self.root)!r} has no {MANIFEST_NAME}; run the extraction first."
            )
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has format_version {self.manifest.get('format_version')!r}; this reader reads "
                f"{FORMAT_VERSION}."
            )
        self.chunk_dirs = completed_chunks(self.root)
        sets = self.manifest.get("label_sets") or {}
        if label_set is not None and label_set not in sets:
            raise ValueError(f"`label_set` must be one of the store's label sets {sorted(sets)}, got {label_set!r}.")
        primary = self.manifest.get("attribute")
        self.label_set = label_set if label_set is not None else primary
        # Labels of another label set are looked up by image index (from the chunks' records), not read from shards.
        self._lookup = self._label_lookup(label_set) if label_set is not None and label_set != primary else None

    def _label_lookup(self, label_set: str) -> torch.Tensor:
        pairs = []
        for chunk in self.chunk_dirs:
            info = json.loads((chunk / CHUNK_INFO_NAME).read_text(encoding="utf-8"))
            pairs += [(r["index"], r["labels"][label_set]) for r in info["images"]]
        lookup = torch.full((max((i for i, _ in pairs), default=-1) + 1,), -1, dtype=torch.long)
        for index, label in pairs:
            lookup[index] = label
        return lookup

    @property
    def timesteps(self) -> list[float]:
        return list(self.manifest["timesteps"])

    @property
    def num_steps(self) -> int:
        return len(self.manifest["timesteps"])

    @property
    def class_names(self) -> list[str]:
        if self._lookup is not None:
            return list(self.manifest["label_sets"][self.label_set]["class_names"])
        return list(self.manifest["class_names"])

    @property
    def label_source(self) -> str | None:
        if self._lookup is not None:
            return self.manifest["label_sets"][self.label_set]["label_source"]
        return self.manifest.get("label_source")

    @property
    def branches(self) -> list[str]:
        return list(self.manifest["branches"])

    @property
    def h_shape(self) -> list[int]:
        if self.manifest.get("h_shape") is None:
            raise ValueError(f"{self.root} holds no completed chunk yet, so h's shape is unknown.")
        return list(self.manifest["h_shape"])

    def _check_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"`step` must be an integer in [0, {self.num_steps - 1}], got {step!r}.")
        return step

    def _check_branches(self, branches: Sequence[str] | None) -> list[str]:
        if branches is None:
            return self.branches
        branches = [branches] if isinstance(branches, str) else list(branches)
        unknown = [b for b in branches if b not in self.branches]
        if unknown or not branches:
            raise ValueError(f"`branches` must be a non-empty subset of the recorded {self.branches}, got {branches}.")
        return branches

    def _labels_of(self, f) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels, image_index) of one open shard, in the selected label set."""
        index = f.get_tensor("image_index")
        labels = f.get_tensor("labels") if self._lookup is None else self._lookup[index]
        return labels, index

    def labels(self, drop_unlabelled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and image indices of every stored row of one branch (read from step 0's files)."""
        if not self.chunk_dirs:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        labels, index = [], []
        for chunk in self.chunk_dirs:
            with safe_open(str(chunk / step_file_name(0)), framework="pt") as f:
                chunk_labels, chunk_index = self._labels_of(f)
            labels.append(chunk_labels)
            index.append(chunk_index)
        labels, index = torch.cat(labels), torch.cat(index)
        if drop_unlabelled:
            keep = labels >= 0
            labels, index = labels[keep], index[keep]
        return labels, index

    def iter_timestep(
        self, step: int, branches: Sequence[str] | None = None, drop_unlabelled: bool = True
    ) -> Iterator[HSlice]:
        """Yields the slice of `step` chunk by chunk (rows of several branches are concatenated, labels repeated)."""
        step = self._check_step(step)
        branches = self._check_branches(branches)
        for chunk in self.chunk_dirs:
            with safe_open(str(chunk / step_file_name(step)), framework="pt") as f:
                labels, index = self._labels_of(f)
                keep = labels >= 0 if drop_unlabelled else torch.ones_like(labels, dtype=torch.bool)
                for branch in branches:
                    h = f.get_tensor(f"h_{branch}")
                    yield HSlice(h if keep.all() else h[keep], labels[keep], index[keep])

    def load_timestep(self, step: int, branches: Sequence[str] | None = None, drop_unlabelled: bool = True) -> HSlice:
        """The whole slice of `step` across chunks: features [N, C, H, W] in the storage dtype.

        The output is allocated once (row counts come from the small label tensors) and filled chunk by chunk, so
        the peak memory is the slice plus one chunk's part, not twice the slice.
        """
        step = self._check_step(step)
        branches = self._check_branches(branches)
        labels, index = [], []
        for chunk in self.chunk_dirs:
            with safe_open(str(chunk / step_file_name(step)), framework="pt") as f:
                chunk_labels, chunk_index = self._labels_of(f)
            keep = chunk_labels >= 0 if drop_unlabelled else torch.ones_like(chunk_labels, dtype=torch.bool)
            labels += [chunk_labels[keep]] * len(branches)
            index += [chunk_index[keep]] * len(branches)
        num_rows = sum(len(part) for part in labels)
        shape = self.manifest.get("h_shape") or [0, 0, 0]
        features = torch.empty(num_rows, *shape, dtype=getattr(torch, self.manifest["dtype"]))
        row = 0
        for part in self.iter_timestep(step, branches, drop_unlabelled):
            if part.labels.numel():  # chunks without rows may lack h's shape
                features[row : row + len(part.labels)] = part.features
                row += len(part.labels)
        empty = torch.zeros(0, dtype=torch.long)
        return HSlice(features, torch.cat(labels) if labels else empty, torch.cat(index) if index else empty.clone())


def load_timestep(features_dir: str | os.PathLike, step: int, **kwargs) -> HSlice:
    """Shortcut: `HFeatureStore(features_dir).load_timestep(step, **kwargs)`."""
    return HFeatureStore(features_dir).load_timestep(step, **kwargs)


def step_file_name(step: int) -> str:
    return f"step_{step:03d}.safetensors"


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}"


def completed_chunks(root: str | os.PathLike) -> list[Path]:
    """The completed chunk directories of an output directory, in order (temporary ones are never listed)."""
    chunks = Path(root) / CHUNKS_DIR
    if not chunks.is_dir():
        return []
    return sorted(p for p in chunks.iterdir() if p.is_dir() and CHUNK_PATTERN.match(p.name))


# ----------------------------------------------------------------------------------------------------------------
# Shared extraction machinery
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _BatchResult:
    h: dict[str, torch.Tensor]  # branch -> [T, n, C, H, W] (storage dtype, CPU), rows of the kept items
    labels: torch.Tensor  # [n]
    records: list[dict]  # one per kept item
    skipped: list[dict]  # items that could not be processed


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"`dtype` must be one of {list(STORAGE_DTYPES)}, got {dtype!r}.")
    return STORAGE_DTYPES[dtype]


def _scheduler_info(scheduler) -> dict:
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return json.loads(json.dumps({"class": type(scheduler).__name__, "config": config}, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def _model_name(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "unknown")


def _timesteps_list(timesteps: torch.Tensor) -> list[float | int]:
    values = timesteps.detach().cpu()
    if values.is_floating_point():
        return [float(v) for v in values.tolist()]
    return [int(v) for v in values.tolist()]


def _prepare_output_dir(output_dir: Path, run: dict) -> dict:
    """Creates the output directory or checks a previous run's manifest; returns the manifest to continue."""
    manifest_path = output_dir / MANIFEST_NAME
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        differing = [k for k in RUN_KEYS if previous.get(k) != run.get(k)]
        if differing:
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} holds a different extraction run (differs in {differing}); pass the "
                "same arguments to resume it, or choose another `output_dir`."
            )
        manifest = previous
    else:
        if output_dir.exists() and any(output_dir.iterdir()):
            raise ValueError(
                f"`output_dir` {str(output_dir)!r} exists, is not empty and holds no {MANIFEST_NAME}; choose an empty "
                "or new directory."
            )
        manifest = dict(run, h_shape=None, complete=False)
    (output_dir / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    # Leftovers of an interrupted run: partial chunks and temporary files (ours, named .tmp-*).
    for leftover in list((output_dir / CHUNKS_DIR).glob(".tmp-*")) + list(output_dir.glob(".tmp-*")):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    atomic_write_json(manifest_path, manifest)
    return manifest


def _refresh_manifest(output_dir: Path, manifest: dict, complete: bool) -> dict:
    """Rebuilds the per-image records from the completed chunks (so a crash between a chunk's rename and this
    update loses nothing) and rewrites the manifest atomically."""
    images, skipped, chunks, h_shape = [], [], [], manifest.get("h_shape")
    counts = [0] * len(manifest["class_names"]) if manifest.get("class_names") else []
    for chunk in completed_chunks(output_dir):
        info = json.loads((chunk / CHUNK_INFO_NAME).read_text(encoding="utf-8"))
        images.extend(info["images"])
        skipped.extend(info["skipped"])
        chunks.append({"name": chunk.name, "num_images": len(info["images"]), "num_skipped": len(info["skipped"])})
        h_shape = info.get("h_shape") or h_shape
    for record in images:
        if counts and record["label"] >= 0:
            counts[record["label"]] += 1
    manifest.update(
        images=images,
        labels=[r["label"] for r in images],
        skipped=skipped,
        num_images=len(images),
        num_unlabelled=sum(r["label"] < 0 for r in images),
        num_skipped=len(skipped),
        class_counts=dict(zip(manifest.get("class_names") or [], counts)),
        chunks=chunks,
        h_shape=h_shape,
        complete=complete,
    )
    atomic_write_json(output_dir / MANIFEST_NAME, manifest)
    return manifest


def _write_chunk(
    output_dir: Path, index: int, results: list[_BatchResult], branches: list[str], timesteps: list, dtype: str
) -> None:
    """Writes one chunk into a temporary directory, then renames it into place (the chunk is complete only then)."""
    chunks_dir = output_dir / CHUNKS_DIR
    tmp_dir = make_temp_dir(chunks_dir, f".tmp-{chunk_name(index)}-")
    try:
        records = [r for res in results for r in res.records]
        skipped = [s for res in results for s in res.skipped]
        labels = torch.cat([res.labels for res in results]) if records else torch.zeros(0, dtype=torch.long)
        image_index = torch.tensor([r["index"] for r in records], dtype=torch.long)
        shapes = [tuple(res.h[branches[0]].shape[2:]) for res in results if res.records]
        h_shape = list(shapes[0]) if shapes else None
        for step, timestep in enumerate(timesteps):
            tensors = {"labels": labels, "image_index": image_index}
            for branch in branches:
                parts = [res.h[branch][step] for res in results if res.records]
                tensors[f"h_{branch}"] = (
                    torch.cat(parts) if parts else torch.zeros(0, *(h_shape or [0, 0, 0]), dtype=getattr(torch, dtype))
                )
            metadata = {"step": str(step), "timestep": str(timestep), "format_version": str(FORMAT_VERSION)}
            atomic_save_file(tensors, tmp_dir / step_file_name(step), metadata)
        info = {"chunk": index, "images": records, "skipped": skipped, "h_shape": h_shape}
        atomic_write_json(tmp_dir / CHUNK_INFO_NAME, info)
        os.replace(tmp_dir, chunks_dir / chunk_name(index))
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def create_store(
    output_dir: str | os.PathLike,
    timesteps: Sequence[int | float],
    class_names: Sequence[str],
    branches: Sequence[str] = ("cond",),
    dtype: str = "fp16",
    attribute: str | None = None,
    model: str = "synthetic",
    label_source: str = "synthetic",
    **extra: Any,
) -> dict:
    """Starts (or reopens) a feature store for h produced elsewhere, e.g. synthetic features for tests and benchmarks.

    Fill it with `write_chunk`, then `finish_store`; the result reads like an extraction output.
    """
    storage_dtype = _check_dtype(dtype)
    unknown = [b for b in branches if b not in ("cond", "uncond")]
    if unknown or not branches:
        raise ValueError(f"`branches` must be a non-empty subset of ['cond', 'uncond'], got {list(branches)}.")
    run = dict.fromkeys(RUN_KEYS)
    run.update(
        format_version=FORMAT_VERSION,
        recipe="external",
        model=model,
        num_inference_steps=len(timesteps),
        timesteps=list(timesteps),
        branches=list(branches),
        dtype=str(storage_dtype).replace("torch.", ""),
        class_names=list(class_names),
        attribute=attribute,
        label_source=label_source,
        **extra,
    )
    return _prepare_output_dir(Path(output_dir), run)


def write_chunk(
    output_dir: str | os.PathLike,
    manifest: dict,
    index: int,
    h: dict[str, torch.Tensor],
    labels: torch.Tensor,
    records: list[dict] | None = None,
) -> dict:
    """Writes chunk `index` atomically: `h` maps each branch to [T, n, C, H, W]; `labels` [n] (-1 = unlabelled).

    `records` (one dict per row, with at least "index", the image's position in the run) default to consecutive
    indices after the rows already stored. Returns the refreshed manifest.
    """
    output_dir = Path(output_dir)
    storage_dtype = STORAGE_DTYPES["fp16" if manifest["dtype"] == "float16" else "fp32"]
    labels = torch.as_tensor(labels, dtype=torch.long)
    if records is None:
        start = manifest.get("num_images") or 0
        records = [{"index": start + i} for i in range(labels.numel())]
    records = [dict(r, label=int(k)) for r, k in zip(records, labels.tolist())]
    h = {b: h[b].to("cpu", storage_dtype) for b in manifest["branches"]}
    _write_chunk(
        output_dir,
        index,
        [_BatchResult(h, labels, records, [])],
        manifest["branches"],
        manifest["timesteps"],
        manifest["dtype"],
    )
    return _refresh_manifest(output_dir, manifest, complete=False)


def finish_store(output_dir: str | os.PathLike, manifest: dict) -> dict:
    """Marks the store complete (rewrites the manifest from its chunks)."""
    return _refresh_manifest(Path(output_dir), manifest, complete=True)


def _run_chunks(
    output_dir: Path,
    manifest: dict,
    plan: list,
    chunk_size: int,
    batch_size: int,
    process_batch: Callable[[list[int]], _BatchResult],
    progress: bool,
    desc: str,
) -> dict:
    num_chunks = math.ceil(len(plan) / chunk_size)
    done = {int(CHUNK_PATTERN.match(p.name).group(1)) for p in completed_chunks(output_dir)}
    done_items = sum(min(chunk_size, len(plan) - c * chunk_size) for c in done if c < num_chunks)
    if done:
        logger.info("Resuming %s: %d of %d chunks already complete.", output_dir, len(done), num_chunks)
    bar = tqdm(total=len(plan), initial=done_items, desc=desc, unit="img", disable=not progress)
    try:
        for c in range(num_chunks):
            if c in done:
                continue
            items = list(range(c * chunk_size, min((c + 1) * chunk_size, len(plan))))
            results = []
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                results.append(process_batch(batch))
                bar.update(len(batch))
            _write_chunk(output_dir, c, results, manifest["branches"], manifest["timesteps"], manifest["dtype"])
            manifest = _refresh_manifest(output_dir, manifest, complete=False)
    finally:
        bar.close()
    manifest = _refresh_manifest(output_dir, manifest, complete=True)
    if manifest["num_skipped"]:
        warnings.warn(
            f"{manifest['num_skipped']} image(s) could not be read and were skipped (see manifest 'skipped')."
        )
    return manifest


class _Recorder:
    """Collects h from `MidBlockHook` calls: one entry per UNet call, moved to the CPU in the storage dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.calls: list[torch.Tensor] = []

    def __call__(self, h: torch.Tensor) -> None:
        self.calls.append(h.detach().to("cpu", self.dtype))
        return None


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


# ----------------------------------------------------------------------------------------------------------------
# Recipe 1: labelled folders + DDIM inversion
# ----------------------------------------------------------------------------------------------------------------


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


def _load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """RGB, resized to cover (height, width) and centre-cropped; float [3, H, W] in [-1, 1]."""
    with Image.open(path) as image:
        image.load()
        image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _ddim_move(x: torch.Tensor, out: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor, prediction_type: str):
    """Deterministic DDIM move of x from noise level alpha_bar = a_from to a_to (eta = 0), in float32."""
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
    prompt_embeds: torch.Tensor,
    guidance_scale: float = 1.0,
    storage_dtype: torch.dtype = torch.float16,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DDIM-inverts a batch of images ([-1, 1]); returns (h at every step in generation order, step 0 first; the
    inverted latents at the noisiest timestep, from which a DDIM generation with eta = 0 reconstructs the images).

    The clean latent is first moved to the lowest noise level of the schedule, then for each timestep t (ascending)
    the UNet is evaluated on the inverted latent x_t at t: h is recorded there (the pair (x_t, t) a generation sees)
    and the same prediction moves x_t to the next, noisier level. That is one UNet call more than the number of steps.
    `prompt_embeds` is [uncond; cond] when `guidance_scale` > 1, else cond only.
    """
    device, unet, vae = pipe._execution_device, pipe.unet, pipe.vae
    latents = vae.encode(images.to(device, vae.dtype)).latent_dist.mode()
    latents = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    latents = latents.to(unet.dtype)
    cfg = guidance_scale > 1.0
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    ascending = list(reversed(scheduler.timesteps.tolist()))
    prediction_type = scheduler.config.prediction_type
    recorder = _Recorder(storage_dtype)

    def predict(x: torch.Tensor, t) -> torch.Tensor:
        model_in = torch.cat([x, x]) if cfg else x
        out = unet(model_in, t, encoder_hidden_states=prompt_embeds).sample
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
) -> dict:
    """Recipe 1: labelled image folders -> DDIM inversion -> h at every step. Returns the manifest.

    Args:
        pipe: a `StableDiffusionPipeline` (or subclass); its scheduler's config defines the DDIM schedule.
        image_dir: one sub-folder per class; class names are the folder names (sorted, or in `class_names` order).
        output_dir: new or empty directory, or the directory of an interrupted run with the same arguments (resumed).
        inversion_prompt: the text condition used during inversion (default: empty prompt).
        guidance_scale: classifier-free guidance during inversion; 1.0 (default) turns it off.
        record_branch: with guidance, which rows of [uncond; cond] to store: "cond", "uncond" or "both".
        chunk_size: images per chunk (the unit of resumption); `batch_size`: images per UNet call.
        dtype: storage dtype, "fp16" (default) or "fp32".
    Unreadable or corrupt images are skipped with a warning and listed in the manifest ("skipped").
    """
    output_dir = Path(output_dir)
    batch_size, chunk_size = (
        _check_positive_int("batch_size", batch_size),
        _check_positive_int("chunk_size", chunk_size),
    )
    num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
    storage_dtype = _check_dtype(dtype)
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 1.0:
        raise ValueError(
            f"`guidance_scale` must be a number >= 1 (1 = no classifier-free guidance), got {guidance_scale!r}."
        )
    cfg = guidance_scale > 1.0
    branches = _check_branches(record_branch, cfg)
    height, width = _resolution(pipe, height, width)
    class_names, plan = list_labelled_images(image_dir, class_names)
    scheduler = ddim_schedule(pipe, num_inference_steps)
    timesteps = _timesteps_list(scheduler.timesteps)
    run = {
        "format_version": FORMAT_VERSION,
        "recipe": "inversion",
        "model": _model_name(pipe),
        "scheduler": _scheduler_info(scheduler),
        "num_inference_steps": num_inference_steps,
        "timesteps": timesteps,
        "guidance_scale": float(guidance_scale),
        "prompts": [inversion_prompt],
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
    }
    manifest = _prepare_output_dir(output_dir, run)
    device = pipe._execution_device
    cond, uncond = pipe.encode_prompt(
        inversion_prompt, device, 1, do_classifier_free_guidance=cfg, negative_prompt=negative_prompt
    )

    def process_batch(items: list[int]) -> _BatchResult:
        tensors, records, skipped = [], [], []
        for i in items:
            rel, label = plan[i]
            try:
                tensors.append(_load_image(Path(image_dir) / rel, height, width))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                warnings.warn(f"Skipping unreadable image {rel!r}: {error}")
                skipped.append({"index": i, "path": rel, "error": f"{type(error).__name__}: {error}"})
                continue
            records.append({"index": i, "path": rel, "label": label, "class": class_names[label]})
        if not records:
            return _BatchResult({b: torch.zeros(0) for b in branches}, torch.zeros(0, dtype=torch.long), [], skipped)
        n = len(records)
        embeds = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)]) if cfg else cond.expand(n, -1, -1)
        calls, _ = invert_and_record(pipe, torch.stack(tensors), scheduler, embeds, guidance_scale, storage_dtype)
        labels = torch.tensor([r["label"] for r in records], dtype=torch.long)
        return _BatchResult(_split_branches(calls, n, cfg, branches), labels, records, skipped)

    return _run_chunks(output_dir, manifest, plan, chunk_size, batch_size, process_batch, progress, "invert")


# ----------------------------------------------------------------------------------------------------------------
# Recipe 2: generation + pseudo-labels
# ----------------------------------------------------------------------------------------------------------------


def extract_from_generation(
    pipe,
    prompts: str | Sequence[str],
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
) -> dict:
    """Recipe 2: generate with `pipe`, record h at every step, pseudo-label the images with `labeller`.

    Image i uses prompt `prompts[i % len(prompts)]` and its own CPU generator seeded `seed + i`, so the images (and a
    resumed run) do not depend on batch composition or device. The pipeline's own scheduler is used (recorded in the
    manifest); with a stochastic scheduler (eta > 0, ancestral samplers) h still matches the image it produced.
    Images the labeller cannot label (label -1, e.g. invalid toy images, or flagged by a safety checker) keep their h
    in the shards with label -1; readers drop them by default.

    Args:
        labeller: one `Labeller`, or several with distinct `attribute` names: each gives a label set (the first is
            stored in the shards, all are in the per-image records), so one generation serves several attribute
            classifiers (`HFeatureStore(..., label_set=...)`, `balancing-act train --attribute ...`).
        record_branch: with classifier-free guidance (`guidance_scale` > 1) the UNet sees [uncond; cond]: store the
            "cond" rows (default), the "uncond" rows or "both".
        Others as in `extract_from_folders`.
    """
    output_dir = Path(output_dir)
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
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
    cfg = guidance_scale > 1.0
    branches = _check_branches(record_branch, cfg)
    height, width = _resolution(pipe, height, width)
    planned = copy.deepcopy(pipe.scheduler)
    planned.set_timesteps(num_inference_steps)
    timesteps = _timesteps_list(planned.timesteps)
    run = {
        "format_version": FORMAT_VERSION,
        "recipe": "generation",
        "model": _model_name(pipe),
        "scheduler": _scheduler_info(pipe.scheduler),
        "num_inference_steps": num_inference_steps,
        "timesteps": timesteps,
        "guidance_scale": float(guidance_scale),
        "prompts": prompts,
        "negative_prompt": negative_prompt,
        "branches": branches,
        "dtype": str(storage_dtype).replace("torch.", ""),
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "seed": seed,
        "height": height,
        "width": width,
        "plan": {"num_images": num_images},
        "class_names": list(labeller.class_names),
        "attribute": labeller.attribute,
        "label_source": labeller.source,
        "label_sets": {
            item.attribute: {"class_names": list(item.class_names), "label_source": item.source}
            for item in labellers
            if item.attribute is not None
        },
    }
    manifest = _prepare_output_dir(output_dir, run)
    plan = list(range(num_images))

    def process_batch(items: list[int]) -> _BatchResult:
        batch_prompts = [prompts[i % len(prompts)] for i in items]
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in items]
        recorder = _Recorder(storage_dtype)
        seen_timesteps = []

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            seen_timesteps.append(timestep)
            return callback_kwargs

        with MidBlockHook(pipe.unet, recorder):
            output = pipe(
                prompt=batch_prompts,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=[negative_prompt] * len(items) if negative_prompt is not None else None,
                generator=generators,
                height=height,
                width=width,
                output_type="pil",
                callback_on_step_end=on_step_end,
            )
        if len(recorder.calls) != len(timesteps) or _timesteps_list(torch.stack(seen_timesteps)) != timesteps:
            raise RuntimeError(
                f"Recorded {len(recorder.calls)} UNet calls at timesteps {seen_timesteps}, expected one per planned "
                f"timestep {timesteps}; this scheduler/pipeline calls the UNet differently."
            )
        every = [item(output.images) for item in labellers]
        flagged = getattr(output, "nsfw_content_detected", None)
        if flagged is not None:
            flags = torch.tensor([bool(f) for f in flagged])
            every = [torch.where(flags, torch.full_like(labels, -1), labels) for labels in every]
        labels = every[0]
        records = [
            {"index": i, "prompt": p, "seed": seed + i, "label": int(every[0][j])}
            | ({"labels": {a: int(lab[j]) for a, lab in zip(attributes, every)}} if attributes[0] is not None else {})
            for j, (i, p) in enumerate(zip(items, batch_prompts))
        ]
        return _BatchResult(_split_branches(recorder.calls, len(items), cfg, branches), labels, records, [])

    return _run_chunks(output_dir, manifest, plan, chunk_size, batch_size, process_batch, progress, "generate")
