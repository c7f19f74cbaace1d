"""`generate` and `evaluate` end to end: on a tiny Stable Diffusion saved to disk, and on the committed
toy model with its shipped classifier (the README's main command)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import tiny_classifier, tiny_sd_pipeline

from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.commands import generate as generate_command
from h_classifiers.evaluation import TARGET_FD
from h_classifiers.toy_world import TOY_CLASSIFIERS_PATH, TOY_MODEL_PATH


ROOT = Path(__file__).resolve().parent.parent
TOY_ASSETS = (TOY_MODEL_PATH / "model_index.json").exists() and (
    TOY_CLASSIFIERS_PATH / "skin" / "config.json"
).exists()


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny SD directory and a classifiers directory holding a `skin` classifier that fits it."""
    root = tmp_path_factory.mktemp("tiny-assets")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_classifier(scale=0.05).save_pretrained(root / "classifiers" / "skin")
    return root


def test_generate_on_a_tiny_model_writes_the_side_by_side_grid(tiny_assets, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_assets / "sd"), "--classifier", str(tiny_assets / "classifiers" / "skin")]
    argv += ["--num-images", "4", "--batch-size", "4", "--steps", "3", "--strength", "50", "--threads", "1"]
    report = generate_command.main(argv + ["--output-dir", str(out)])
    assert report["results"]["vanilla"]["num_images"] == 4 and report["results"]["balanced"]["num_images"] == 4
    assert "No labeller" in capsys.readouterr().out  # a non-toy model is not measured unless a labeller is given
    with Image.open(out / "generate_grid.png") as grid:
        # two panels of 4 tiles, 16 px images shown at 64 px, 2 px padding, 12 px gap
        assert grid.width == 2 * (4 * (64 + 2) + 2) + 12
    saved = json.loads((out / "generate_results.json").read_text())
    assert saved["mode"] == "distribution" and saved["spec"]["target"] == [0.5, 0.5]


def test_generate_sample_mode_with_a_labeller(tiny_assets, tmp_path, capsys):
    argv = ["--model", str(tiny_assets / "sd"), "--classifier", str(tiny_assets / "classifiers" / "skin")]
    argv += ["--mode", "sample", "--target", "dark", "--num-images", "3", "--steps", "2", "--labeller", "toy:skin"]
    report = generate_command.main(argv + ["--output-dir", str(tmp_path), "--threads", "1"])
    balanced = report["results"]["balanced"]
    assert "hit_rate" in balanced and balanced["num_images"] == 3  # every image was asked for "dark"
    assert report["labeller"].startswith("toy_world.ToyOracle")
    assert "balanced" in capsys.readouterr().out


def test_evaluate_command_on_a_tiny_model(tiny_assets, tmp_path, capsys):
    argv = ["--model", str(tiny_assets / "sd"), "--classifier", str(tiny_assets / "classifiers" / "skin")]
    argv += ["--num-images", "4", "--batch-size", "2", "--steps", "2", "--labeller", "toy:skin", "--threads", "1"]
    argv += ["--class-prompts", "a light face|a dark face", "--target", "0.25,0.75", "--output-dir", str(tmp_path)]
    report = evaluate_command.main(argv)
    # What was asked, and per configuration whether the target was met and which came closest.
    out = capsys.readouterr().out
    assert "attribute 'skin', classes ['light', 'dark'], target [0.25, 0.75], 4 images per configuration" in out
    assert f"target met (FD <= {TARGET_FD:g}):" in out
    verdict = report["verdict"]
    for name, met in verdict["met"].items():
        shown = "not measured" if met is None else "met" if met else "missed"
        assert f"  {name:<14} {shown}" in out
    if verdict["closest"] is None:
        assert "closest to the target: none" in out
    else:
        fd = report["results"][verdict["closest"]]["fd"]
        assert fd == min(s["fd"] for s in report["results"].values() if s["fd"] is not None)
        assert f"closest to the target: {verdict['closest']} (FD {fd:.3f})" in out
    assert list(report["results"]) == ["vanilla", "sample", "distribution", "prompt", "fair_diffusion"]
    # Fair Diffusion's hit rate: the class drawn for each image
    assert "hit_rate" in report["results"]["fair_diffusion"]
    assert all(s["num_images"] == 4 for s in report["results"].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["spec"]["target"] == [0.25, 0.75] and saved["labeller"].startswith("toy_world")
    assert (tmp_path / "fractions.png").exists() and (tmp_path / "grid_prompt.png").exists()


def test_evaluate_needs_class_prompts_for_the_prompt_baseline(tiny_assets, capsys):
    argv = ["--model", str(tiny_assets / "sd"), "--classifier", str(tiny_assets / "classifiers" / "skin")]
    with pytest.raises(SystemExit):
        evaluate_command.main(argv + ["--labeller", "toy:skin"])
    assert "--class-prompts" in capsys.readouterr().err


def test_generate_script_runs_from_a_checkout():
    result = subprocess.run(
        [sys.executable, "scripts/generate.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "--scheduler" in result.stdout and "--target" in result.stdout


@pytest.mark.skipif(not TOY_ASSETS, reason="this checkout lacks the committed toy model or its skin classifier")
def test_main_command_on_the_toy_model(tmp_path, capsys):
    """The README's main command with its defaults (toy model, shipped skin classifier, 50/50), fewer images/steps:
    the balanced images are closer to the target than the vanilla ones from the same seeds."""
    report = generate_command.main(["--num-images", "16", "--steps", "10", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "vanilla" in out and "balanced" in out and "FD" in out
    assert report["labeller"].startswith("toy_world.ToyOracle")
    vanilla, balanced = report["results"]["vanilla"], report["results"]["balanced"]
    for summary in (vanilla, balanced):
        assert summary["num_images"] == 16 and summary["fractions"] is not None
    assert balanced["fd"] < vanilla["fd"], (balanced["fractions"], vanilla["fractions"])
    assert (tmp_path / "generate_grid.png").exists()
