"""Atomic writes (`h_classifiers.io_utils`): the one helper module every tool writes its files with."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from h_classifiers import io_utils


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_each_writer_gives_the_file_normal_permissions_and_leaves_no_temporary_file(tmp_path, umask_022):
    out = tmp_path / "new" / "dir"  # created on the way
    io_utils.atomic_write_text(out / "a.txt", "hello")
    io_utils.atomic_write_json(out / "b.json", {"t": torch.tensor([1, 2]), "p": Path("x/y")}, indent=2)
    io_utils.atomic_save_file({"w": torch.ones(2, 3).t()}, out / "c.safetensors", {"step": "3"})
    io_utils.atomic_save_image(Image.new("RGB", (4, 4), (9, 8, 7)), out / "d.png")
    assert (out / "a.txt").read_text() == "hello"
    assert json.loads((out / "b.json").read_text()) == {"t": [1, 2], "p": "x/y"}
    assert (out / "b.json").read_text().startswith('{\n  "t"')
    assert torch.equal(load_file(str(out / "c.safetensors"))["w"], torch.ones(3, 2))
    with Image.open(out / "d.png") as image:
        assert image.format == "PNG" and image.getpixel((0, 0)) == (9, 8, 7)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.json", "c.safetensors", "d.png"]
    assert {mode(p) for p in out.iterdir()} == {0o644}
    folder = io_utils.make_temp_dir(tmp_path, ".tmp-x-")
    assert folder.parent == tmp_path and folder.name.startswith(".tmp-x-") and mode(folder) == 0o755


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "results.json"
    io_utils.atomic_write_json(path, {"old": True})
    with pytest.raises(TypeError):
        io_utils.atomic_write_json(path, {"new": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_evaluation_outputs_are_readable_by_others(tmp_path, umask_022):
    """They were written through private temporary files (mode 0600) before the shared helper."""
    from h_classifiers.evaluation import write_outputs

    report = {"spec": {"target": [0.5, 0.5], "prompt": "p"}, "class_names": ["a", "b"], "results": {}}
    write_outputs(report, {"vanilla": [Image.new("RGB", (8, 8))]}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fractions.png", "grid_vanilla.png", "results.json"]
    assert {mode(p) for p in tmp_path.iterdir()} == {0o644}


def test_one_json_encoder_for_tensors_numpy_paths_and_an_optional_fallback():
    import functools

    import numpy as np

    value = {"t": torch.tensor([1, 2]), "a": np.arange(2), "i": np.int64(3), "f": np.float32(0.5), "p": Path("x")}
    assert json.loads(json.dumps(value, default=io_utils.json_default)) == {
        "t": [1, 2],
        "a": [0, 1],
        "i": 3,
        "f": 0.5,
        "p": "x",
    }
    with pytest.raises(TypeError, match="not JSON serializable"):
        json.dumps({"o": object()}, default=io_utils.json_default)
    lenient = functools.partial(io_utils.json_default, fallback=str)
    assert json.loads(json.dumps({"d": torch.float16}, default=lenient)) == {"d": "torch.float16"}


def test_portable_paths_hide_the_machines_absolute_paths(tmp_path, monkeypatch):
    from h_classifiers.toy_world import TOY_MODEL_PATH

    assert io_utils.portable_path(TOY_MODEL_PATH) == "h_classifiers/assets/toy-sd"
    assert io_utils.portable_path(str(TOY_MODEL_PATH) + "/") == "h_classifiers/assets/toy-sd"
    assert io_utils.portable_path("someone/sd") == "someone/sd"  # a Hub id
    assert io_utils.portable_path(str(tmp_path)) == str(tmp_path)  # outside the package's root: as given
