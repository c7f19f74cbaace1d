"""The commands on 2 processes: `accelerate launch` of `python -m h_classifiers.cli generate|evaluate|extract` on the
CPU (gloo, loopback only) with the committed toy model, compared with one process making the same images.

accelerate's `--cpu` launches one process unless MPI is set up, so the launch is accelerate's torchrun route
(`--multi_gpu`); without CUDA the processes are CPU processes on gloo (`distributed.process_state`).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.commands import extract as extract_command
from h_classifiers.commands import generate as generate_command
from h_classifiers.saved_images import MANIFEST_NAME, image_name
from h_classifiers.toy_world import TOY_CLASSIFIERS_PATH, TOY_MODEL_PATH


ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not (TOY_MODEL_PATH / "model_index.json").exists() or not (TOY_CLASSIFIERS_PATH / "skin").exists(),
    reason="the committed toy model and classifiers are missing",
)
N = 8
STEPS = 3


# A launch whose rendezvous lost its port to another process (the launcher picks a free port, then binds it).
ADDRESS_IN_USE = re.compile(r"address already in use|EADDRINUSE|errno:? 98", re.IGNORECASE)
LAUNCH_TIMEOUT_S = 240  # per launch: a hung process fails the test instead of hanging it
LAUNCH_ATTEMPTS = 3


def launch(tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 processes on this machine's loopback interface; returns the finished process.

    The processes run this checkout's code: its root is first on PYTHONPATH, and each process records where it
    imported `h_classifiers` and the pipeline from (`IMPORTED_FROM`, run before the command), checked after every
    launch. The launcher picks the port (`--main_process_port 0`), and a launch that lost its port to another process
    before binding it is run again."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PYTHONPATH"))}
    # No network, no accelerate config file of the user's, one thread per process, sockets on loopback only.
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    env |= {"GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", "0"]
    wrapper = tmp_path / "imported_from.py"
    wrapper.write_text(IMPORTED_FROM)
    target = [str(wrapper), *(command if command[0].endswith(".py") else ["-m", "h_classifiers.cli", *command])]
    for _ in range(LAUNCH_ATTEMPTS):
        result = subprocess.run(
            [*launcher, *target],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT_S,
        )
        if result.returncode == 0 or not ADDRESS_IN_USE.search(result.stderr):
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for rank in range(2):  # each launched process ran this checkout's code, not an installation elsewhere
        files = json.loads((tmp_path / f"imported-from-rank{rank}.json").read_text())
        assert Path(files["h_classifiers"]).resolve() == (ROOT / "h_classifiers" / "__init__.py").resolve(), files
        assert Path(files["pipeline"]).resolve() == (ROOT / "pipeline_balancing_act.py").resolve(), files
    return result


# Run by every launched process before its command (`-m module args` or `script.py args`): records where it imports
# the package and the pipeline from, in the working directory.
IMPORTED_FROM = """import json, os, runpy, sys
import h_classifiers, pipeline_balancing_act
files = {"h_classifiers": h_classifiers.__file__, "pipeline": pipeline_balancing_act.__file__}
with open(f"imported-from-rank{os.environ['RANK']}.json", "w") as f:
    json.dump(files, f)
if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def manifest_lines(images_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (images_dir / MANIFEST_NAME).read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_generate_on_two_processes_makes_the_images_of_one_process_and_resumes(tmp_path):
    common = ["--num-images", str(N), "--steps", str(STEPS), "--threads", "1", "--seed", "3"]
    # 2 processes x batch 2 = global batches of 4: the one-process reference runs batch 4.
    two = ["generate", *common, "--batch-size", "2", "--output-dir", "out2", "--save-images", "images2"]
    result = launch(tmp_path, *two)
    assert result.stdout.count("grid:") == 1  # the main process reports
    generate_command.main(
        [*common, "--batch-size", "4", "--output-dir", str(tmp_path / "out1"), "--save-images", str(tmp_path / "one")]
    )
    images2, images1 = tmp_path / "images2", tmp_path / "one"
    names = {image_name(i, 3 + i) for i in range(N)}
    for subset in ("vanilla", "balanced"):
        assert {p.name for p in (images2 / subset).iterdir()} == names  # exactly the requested set
        worst = max(np.abs(pixels(images2 / subset / n) - pixels(images1 / subset / n)).max() for n in names)
        assert worst <= 2, (subset, worst)  # measured: 0 (bit-identical PNGs)
    lines2, lines1 = manifest_lines(images2), manifest_lines(images1)
    assert [(line["set"], line["index"], line["seed"], line["prompt"]) for line in lines2] == [
        (line["set"], line["index"], line["seed"], line["prompt"]) for line in lines1
    ]
    assert len({line["seed"] for line in lines2 if line["set"] == "balanced"}) == N
    # rounds [0, 4) and [4, 8): process p made images 4r + 2p, 4r + 2p + 1
    assert [line["process_index"] for line in lines2[:N]] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [line["predicted_class"] for line in lines2] == [line["predicted_class"] for line in lines1]
    report2 = json.loads((tmp_path / "out2" / "generate_results.json").read_text())
    report1 = json.loads((tmp_path / "out1" / "generate_results.json").read_text())
    assert report2["num_processes"] == 2
    for subset in ("vanilla", "balanced"):
        assert report2["results"][subset]["counts"] == report1["results"][subset]["counts"]

    # Resume after an interruption: image 5 (round [4, 8) of the global batch) missing, a torn temporary file.
    missing = images2 / "balanced" / image_name(5, 8)
    missing.unlink()
    (images2 / "balanced" / ".tmp-000005_seed8.png-x1y2").write_bytes(b"torn")
    stamps = {p: p.stat().st_mtime_ns for p in images2.rglob("*.png")}
    launch(tmp_path, *two)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing complete written again
    assert {p.name for p in (images2 / "balanced").iterdir()} == names
    assert np.abs(pixels(missing) - pixels(images1 / "balanced" / missing.name)).max() <= 2
    assert len(manifest_lines(images2)) == 2 * N


def test_evaluate_on_two_processes_measures_what_one_process_measures(tmp_path):
    common = ["--num-images", str(N), "--steps", str(STEPS), "--threads", "1", "--no-progress"]
    common += ["--configurations", "vanilla,sample,distribution", "--target", "0.25,0.75"]
    launch(tmp_path, "evaluate", *common, "--batch-size", "2", "--output-dir", "two")
    evaluate_command.main([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    for name, summary in one["results"].items():
        measured = {k: v for k, v in two["results"][name].items() if k != "seconds"}
        assert measured == {k: v for k, v in summary.items() if k != "seconds"}, name
    assert (tmp_path / "two" / "grid_distribution.png").exists()


def read_chunks(root: Path) -> dict:
    shards = {}
    for path in sorted((root / "chunks").rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shards[str(path.relative_to(root))] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return shards


def test_extract_on_two_processes_writes_the_store_of_one_process(tmp_path):
    common = ["--prompt", "a photo of a face", "--num-images", "6", "--labeller", "toy:skin", "--steps", str(STEPS)]
    common += ["--batch-size", "2", "--chunk-size", "2", "--threads", "1", "--no-progress"]
    launch(tmp_path, "extract", *common, "--output-dir", "two")
    extract_command.main([*common, "--output-dir", str(tmp_path / "one")])
    two, one = read_chunks(tmp_path / "two"), read_chunks(tmp_path / "one")
    assert sorted(two) == sorted(one) and len(one) == 3 * STEPS  # 3 chunks of 2 images, one file per step
    for name, (tensors, metadata) in one.items():
        assert two[name][1] == metadata
        assert sorted(two[name][0]) == sorted(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(two[name][0][key], tensor), (name, key)
    manifest_two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    manifest_one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest_two == manifest_one and manifest_two["complete"] and manifest_two["num_images"] == 6
    assert not list((tmp_path / "two").rglob(".tmp-*"))
