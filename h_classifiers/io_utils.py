"""Atomic file writes shared by the tools: text, JSON (with the one JSON encoder of the package), safetensors, PNG,
temporary directories, and whole directories (`atomic_directory`). (The rule that tells a local path from a Hub id is
the pipeline's `looks_like_local_path`.)

Every file is written to a temporary file in the destination's directory (named `.tmp-<name>-XXXX`, so readers and
Hub uploads can skip it), then renamed over the destination with `os.replace`: a reader never sees a half-written
file, and an interrupted write leaves at most the temporary file, which is removed on error. Files and directories
get the permissions a plain `open` / `mkdir` would give (the umask applies), not the private ones of `tempfile`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    import torch


TEMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent` with the permissions a plain `mkdir` would give (mkdtemp makes it private)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path` to write to; on success it is renamed to `path`, on error removed.

    The destination's directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes it private (and some writers create the file anew): the renamed file should be like any other.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# The directory that holds the package (a checkout's root): paths inside it are written relative to it.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def portable_path(path: str | os.PathLike) -> str:
    """`path` as a report records it: a path inside `PACKAGE_ROOT` (the toy model, the shipped classifiers) relative
    to it, so that a written file shows no absolute path of the machine that wrote it; anything else (a Hub id,
    another path) unchanged."""
    text = os.fspath(path)
    if not os.path.isabs(text) and not os.path.exists(text):
        return text  # a Hub id, or a relative path as given
    try:
        return Path(text).resolve().relative_to(PACKAGE_ROOT).as_posix()
    except ValueError:
        return text


def json_default(value: Any, fallback: Callable[[Any], Any] | None = None) -> Any:
    """The package's one JSON encoder (`json.dumps(..., default=json_default)`) for the values our files hold besides
    the JSON types: tensors, numpy arrays and numpy scalars as lists / numbers, paths as strings. Anything else is a
    TypeError, unless `fallback` converts it (e.g. `functools.partial(json_default, fallback=str)`)."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if fallback is not None:
        return fallback(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def atomic_save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` (tensors made contiguous, on the CPU), atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def atomic_save_image(image, path: str | os.PathLike, **save_kwargs: Any) -> None:
    """A PIL image as PNG, atomically (`save_kwargs` go to `Image.save`, e.g. `pnginfo`)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", **save_kwargs)


def atomic_save_figure(figure, path: str | os.PathLike, dpi: float | None = None) -> None:
    """A matplotlib figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a new temporary directory next to `path` to fill; on success it takes the place of `path` (an existing
    `path` is moved aside first, and put back if the rename fails), on error it is removed and `path` is untouched. A
    reader sees the old folder or the new one, never a mix of the two."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f"{TEMP_PREFIX}{path.name}-")
    old = None
    try:
        yield tmp
        for file in tmp.rglob("*"):  # writers that go through private temporary files leave them 0600
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o666 & ~_umask())
        if path.exists():
            old = make_temp_dir(path.parent, f"{TEMP_PREFIX}old-{path.name}-")
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None:
            if not path.exists():  # the new folder never landed: put the previous one back
                os.replace(old / path.name, path)
            shutil.rmtree(old, ignore_errors=True)


def store_weights_as(folder: str | os.PathLike, dtype: torch.dtype) -> None:
    """Rewrite the weights file that `save_pretrained` wrote in `folder` with its floats in `dtype` (e.g. a folder
    being built by `atomic_directory`); a file already in `dtype` is left as it is."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    path = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    tensors = load_file(str(path))
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
        stored = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        atomic_save_file(stored, path, {"format": "pt"})
