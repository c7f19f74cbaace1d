"""The h feature store: the on-disk format of extracted h-vectors, its reader and its writer.

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
A store extracted with a pool size g holds h average-pooled to g x g, `[n, C, g, g]` (the manifest's `pool_size`;
its `pooled_from` is h's shape before pooling).

Step index s refers to the scheduler's timesteps in generation order (s = 0 is the noisiest step). The extraction
recipes that fill a store are in `h_classifiers.extraction`; `create_store` / `write_chunk` / `finish_store` fill one
with h produced elsewhere (synthetic features for tests and benchmarks).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .distributed import is_main, share, wait
from .io_utils import atomic_save_file, atomic_write_json, make_temp_dir


logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHUNKS_DIR = "chunks"
CHUNK_INFO_NAME = "chunk.json"
CHUNK_PATTERN = re.compile(r"^chunk_(\d{5})$")
STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Manifest keys that define a run: a resumed run must match them exactly.
RUN_KEYS = tuple(
    "format_version recipe model scheduler num_inference_steps timesteps guidance_scale prompts negative_prompt "
    "branches dtype chunk_size batch_size seed height width plan class_names attribute label_source label_sets "
    "site pool_size".split()
)


def _run_value(manifest: dict, key: str) -> Any:
    # A store written before sites existed recorded h at the mid block.
    return (manifest.get(key) or "mid_block") if key == "site" else manifest.get(key)


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
    def site(self) -> str:
        """Where h was recorded: `"mid_block"` (a store of an older version may name an up block, which the
        classifier then refuses)."""
        return _run_value(self.manifest, "site")

    @property
    def pool_size(self) -> int | None:
        """g when the store holds h average-pooled to g x g (`extract --pool-size g`), else None."""
        return self.manifest.get("pool_size")

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
# Writer: chunks written atomically, the manifest rebuilt from them, runs resumed chunk by chunk
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _BatchResult:
    h: dict[str, torch.Tensor]  # branch -> [T, n, C, H, W] (storage dtype, CPU), rows of the kept items
    labels: torch.Tensor  # [n]
    records: list[dict]  # one per kept item
    skipped: list[dict]  # items that could not be processed


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"`dtype` must be one of {list(STORAGE_DTYPES)}, got {dtype!r}.")
    return STORAGE_DTYPES[dtype]


def _prepare_output_dir(output_dir: Path, run: dict, state=None) -> dict:
    """Creates the output directory or checks a previous run's manifest; returns the manifest to continue. With
    several processes (an accelerate `state`) all check, then the main process prepares while the others wait."""
    manifest_path = output_dir / MANIFEST_NAME
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        differing = [k for k in RUN_KEYS if _run_value(previous, k) != _run_value(run, k)]
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
    wait(state)
    if not is_main(state):
        wait(state)
        return manifest
    (output_dir / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    # Leftovers of an interrupted run: partial chunks and temporary files (ours, named .tmp-*).
    for leftover in list((output_dir / CHUNKS_DIR).glob(".tmp-*")) + list(output_dir.glob(".tmp-*")):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    atomic_write_json(manifest_path, manifest)
    wait(state)
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
    state=None,
) -> dict:
    """Makes the chunks not yet complete. Several processes (an accelerate `state`): the pending chunks, listed by all
    before any is written, are shared between them (`distributed.share`); each process writes its own chunks and the
    main process the manifest, so the store is the one a single process writes."""
    num_chunks = math.ceil(len(plan) / chunk_size)
    done = {int(CHUNK_PATTERN.match(p.name).group(1)) for p in completed_chunks(output_dir)}
    wait(state)
    done_items = sum(min(chunk_size, len(plan) - c * chunk_size) for c in done if c < num_chunks)
    if done and is_main(state):
        logger.info("Resuming %s: %d of %d chunks already complete.", output_dir, len(done), num_chunks)
    mine = share([c for c in range(num_chunks) if c not in done], state)
    total = done_items + sum(min(chunk_size, len(plan) - c * chunk_size) for c in mine)
    bar = tqdm(total=total, initial=done_items, desc=desc, unit="img", disable=not progress or not is_main(state))
    try:
        for c in mine:
            items = list(range(c * chunk_size, min((c + 1) * chunk_size, len(plan))))
            results = []
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                results.append(process_batch(batch))
                bar.update(len(batch))
            _write_chunk(output_dir, c, results, manifest["branches"], manifest["timesteps"], manifest["dtype"])
            if is_main(state):
                manifest = _refresh_manifest(output_dir, manifest, complete=False)
    finally:
        bar.close()
    wait(state)
    if not is_main(state):
        wait(state)
        return json.loads((output_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest = _refresh_manifest(output_dir, manifest, complete=True)
    wait(state)
    if manifest["num_skipped"]:
        warnings.warn(
            f"{manifest['num_skipped']} image(s) could not be read and were skipped (see manifest 'skipped')."
        )
    return manifest
