"""Sharing work between processes without launching any: rounds and seeds (`generation.generate_batches` with an
accelerate-like state), the helpers of `h_classifiers.distributed`, and `generate --save-images` in one process
(names, records, manifest, resume). The launched multi-process runs are in test_multiprocess.py."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image

from h_classifiers import distributed
from h_classifiers.commands import generate as generate_command
from h_classifiers.generation import batch_ranges, generate_batches, process_rounds
from h_classifiers.saved_images import MANIFEST_NAME, RECORD_KEY, image_name


class FakeState:
    """Process `process_index` of `num_processes`, splitting with accelerate's own `split_between_processes`."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, process_index: int, num_processes: int):
        self.process_index, self.num_processes = process_index, num_processes
        self.is_main_process = process_index == 0
        self.device = torch.device("cuda", process_index)

    def wait_for_everyone(self):
        pass


class RecordingPipe:
    def __init__(self):
        self.calls = []

    def __call__(self, generator, prompt, output_type="pil", **kwargs):
        self.calls.append({"seeds": [g.initial_seed() for g in generator], "prompt": prompt, **kwargs})
        return SimpleNamespace(images=[f"image of {p} seed {g.initial_seed()}" for p, g in zip(prompt, generator)])


@pytest.mark.parametrize("n, batch_size, processes", [(8, 2, 2), (13, 3, 2), (10, 2, 3), (7, 4, 1), (5, 1, 2)])
def test_rounds_give_every_image_to_one_process_in_order(n, batch_size, processes):
    shares = [process_rounds(n, batch_size, FakeState(p, processes)) for p in range(processes)]
    rounds = batch_ranges(n, batch_size * processes)
    for r, images in enumerate(rounds):
        assert [share[r][0] for share in shares] == [images] * processes
        parts = [share[r][1] for share in shares]
        assert [i for part in parts for i in part] == list(images)  # contiguous, in process order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and max(map(len, parts)) <= batch_size


@pytest.mark.parametrize("processes, batch_size", [(1, 4), (2, 2), (4, 1)])
def test_image_i_keeps_seed_and_prompt_whatever_the_number_of_processes(processes, batch_size):
    n, seed = 8, 100
    prompts = [f"p{i}" for i in range(n)]
    got = {}
    for p in range(processes):
        pipe = RecordingPipe()
        state = FakeState(p, processes) if processes > 1 else None
        batches = list(generate_batches(pipe, prompts, seed, batch_size, state=state, guidance_mode="distribution"))
        for batch in batches:
            for i, image in zip(batch.indices, batch.output.images):
                assert i not in got
                got[i] = image
        # Distribution mode guides each round as one global batch (the default with several processes).
        assert all(call.get("global_batch") is (True if processes > 1 else None) for call in pipe.calls)
        assert all(len(call["seeds"]) == batch_size for call in pipe.calls)
    assert got == {i: f"image of p{i} seed {seed + i}" for i in range(n)}


def test_a_global_batch_needs_an_image_for_every_process_in_every_round():
    pipe = RecordingPipe()
    # 5 images in rounds of 1 x 2: batch_ranges(5, 2) = [0, 2), [2, 3), [3, 5): process 1 has none in round 1.
    with pytest.raises(ValueError, match="leave a process without an image"):
        list(generate_batches(pipe, ["p"] * 5, 0, 1, state=FakeState(1, 2), guidance_mode="distribution"))
    assert pipe.calls == []
    # Without a global batch the process just has nothing to do in that round.
    batches = list(generate_batches(pipe, ["p"] * 5, 0, 1, state=FakeState(1, 2), guidance_mode="sample"))
    assert [list(b.indices) for b in batches] == [[1], [4]]


def test_skip_sees_whole_rounds_of_a_global_batch_and_batches_otherwise():
    asked = {"distribution": [], "sample": []}
    for mode, seen in asked.items():

        def skip(indices, seen=seen):
            seen.append(list(indices))
            return 4 not in indices

        saved = []
        pipe = RecordingPipe()
        batches = generate_batches(
            pipe, ["p"] * 8, 0, 2, state=FakeState(1, 2), skip=skip, on_batch=saved.append, guidance_mode=mode
        )
        assert [list(b.indices) for b in batches] == ([[6, 7]] if mode == "distribution" else [])
        assert [list(b.indices) for b in saved] == ([[6, 7]] if mode == "distribution" else [])
    assert asked == {"distribution": [[0, 1, 2, 3], [4, 5, 6, 7]], "sample": [[2, 3], [6, 7]]}


def test_process_state_is_none_for_a_plain_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.process_state() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.process_state() is None
    assert not torch.distributed.is_initialized()


def test_helpers_for_one_process_and_for_several():
    assert distributed.share([1, 2, 3], None) == [1, 2, 3]
    assert distributed.share([1, 2, 3], FakeState(0, 2)) == [1, 2] and distributed.share(
        [1, 2, 3], FakeState(1, 2)
    ) == [3]
    assert distributed.share_range(range(4, 5), FakeState(1, 2)) == range(5, 5)
    assert distributed.gather_indexed([(2, "b"), (0, "a")], None) == ["a", "b"]
    with pytest.raises(RuntimeError, match="same image index"):
        distributed.gather_indexed([(1, "a"), (1, "b")], None)
    assert distributed.process_device(FakeState(1, 2), torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.process_device(FakeState(1, 2), torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert distributed.process_device(None, torch.device("cpu")) == torch.device("cpu")


# --- generate --save-images in one process: names, records, manifest, resume ------------------------------------

N = 6


def save_images_argv(images_dir, output_dir, *extra):
    argv = ["--num-images", str(N), "--batch-size", "3", "--steps", "3", "--threads", "1", "--seed", "10"]
    return argv + ["--output-dir", str(output_dir), "--save-images", str(images_dir), *extra]


def test_generate_saves_every_image_with_its_record_and_resumes(tmp_path):
    images_dir = tmp_path / "images"
    report = generate_command.main(save_images_argv(images_dir, tmp_path / "out"))
    names = {image_name(i, 10 + i) for i in range(N)}
    for subset in ("vanilla", "balanced"):
        assert {p.name for p in (images_dir / subset).iterdir()} == names
    lines = [json.loads(line) for line in (images_dir / MANIFEST_NAME).read_text().splitlines()]
    assert [(line["set"], line["index"], line["seed"]) for line in lines] == [
        (s, i, 10 + i) for s in ("vanilla", "balanced") for i in range(N)
    ]
    first = lines[N]
    assert first["file"] == "balanced/000000_seed10.png" and first["process_index"] == 0
    assert first["settings"]["configuration"] == "distribution" and first["settings"]["global_batch_size"] == 3
    assert first["predicted_by"].startswith("toy_world") and first["classifier_class"] in ("light", "dark")
    # the measured fractions are those of the labels in the manifest
    balanced = [line["predicted_class"] for line in lines[N:]]
    assert report["results"]["balanced"]["counts"] == [balanced.count("light"), balanced.count("dark")]

    # An interrupted run: one image of the second batch missing, a temporary file left by a write.
    missing = images_dir / "balanced" / image_name(4, 14)
    before = Image.open(missing).convert("RGB")
    missing.unlink()
    (images_dir / "balanced" / ".tmp-000004_seed14.png-abcd").write_bytes(b"torn")
    stamps = {p: p.stat().st_mtime_ns for p in images_dir.rglob("*.png")}
    generate_command.main(save_images_argv(images_dir, tmp_path / "out"))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing complete is written again
    assert {p.name for p in (images_dir / "balanced").iterdir()} == names  # the missing one, no leftover
    assert np.array_equal(np.asarray(Image.open(missing).convert("RGB")), np.asarray(before))
    assert len((images_dir / MANIFEST_NAME).read_text().splitlines()) == 2 * N
    with Image.open(missing) as image:
        assert json.loads(image.info[RECORD_KEY])["index"] == 4


def test_save_images_refuses_a_directory_of_another_run(tmp_path, capsys):
    images_dir = tmp_path / "images"
    generate_command.main(save_images_argv(images_dir, tmp_path / "out", "--mode", "sample"))
    with pytest.raises(SystemExit):
        generate_command.main(save_images_argv(images_dir, tmp_path / "out", "--mode", "sample", "--target", "dark"))
    err = capsys.readouterr().err
    assert "holds images of another run" in err and "differs in ['target']" in err
