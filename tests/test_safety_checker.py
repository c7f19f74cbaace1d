"""The model's safety checker: kept unless `--no-safety-checker`, and the images it blacks out are counted, left
unlabelled and reported by every generating command."""

import json

import pytest
import torch
from tiny_models import tiny_classifier, tiny_sd_pipeline

import h_classifiers.evaluation
from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.commands import extract as extract_command
from h_classifiers.commands import generate as generate_command
from h_classifiers.toy_world import TOY_MODEL_PATH


class Loaded(Exception):
    """Stops `from_pretrained` once its arguments are recorded."""


def test_load_pipeline_keeps_the_models_safety_checker_unless_told_not_to(monkeypatch):
    from pipeline_balancing_act import BalancingActPipeline

    calls = []

    def from_pretrained(model, **kwargs):
        calls.append(kwargs)
        raise Loaded

    monkeypatch.setattr(BalancingActPipeline, "from_pretrained", from_pretrained)
    for keep in (True, False):
        with pytest.raises(Loaded):
            h_classifiers.evaluation.load_pipeline("someone/sd", safety_checker=keep)
    kept, dropped = calls
    assert "safety_checker" not in kept and "requires_safety_checker" not in kept
    assert dropped["safety_checker"] is None and dropped["requires_safety_checker"] is False


def test_the_toy_model_declares_no_checker_and_loads_without_a_warning(capfd):
    pipe = h_classifiers.evaluation.load_pipeline(TOY_MODEL_PATH)
    assert pipe.safety_checker is None
    assert "safety checker" not in capfd.readouterr().err.lower()


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-assets")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_classifier(scale=0.05).save_pretrained(root / "skin")
    return root


@pytest.fixture
def checker_blacks_out_the_first_image(monkeypatch):
    """Every command's pipeline gets a stand-in safety checker that flags the first image of each call; records the
    `safety_checker` argument of each load."""
    real = h_classifiers.evaluation.load_pipeline
    kept = []

    def load_pipeline(*args, **kwargs):
        pipe = real(*args, **kwargs)
        kept.append(kwargs.get("safety_checker", args[4] if len(args) > 4 else True))

        def run_safety_checker(image, device, dtype):
            flags = [i == 0 for i in range(len(image))]
            image = image.clone()
            image[0] = 0
            return image, flags

        pipe.run_safety_checker = run_safety_checker
        return pipe

    monkeypatch.setattr(h_classifiers.evaluation, "load_pipeline", load_pipeline)  # the commands import it there
    return kept


def test_generate_says_how_many_images_were_blacked_out(
    tiny_assets, checker_blacks_out_the_first_image, tmp_path, capsys
):
    argv = ["--model", str(tiny_assets / "sd"), "--classifier", str(tiny_assets / "skin"), "--steps", "2"]
    argv += ["--num-images", "4", "--batch-size", "2", "--threads", "1", "--output-dir", str(tmp_path)]
    report = generate_command.main(argv)
    out = capsys.readouterr().out
    assert checker_blacks_out_the_first_image == [True]
    # two calls of 2 images per set: 2 of 4 flagged in each set
    assert "vanilla: 2 of 4 images blacked out by the model's safety checker" in out
    assert "balanced: 2 of 4 images blacked out" in out
    assert report["results"]["balanced"]["num_blacked_out"] == 2


def test_evaluate_leaves_blacked_out_images_unlabelled_and_reports_them(
    tiny_assets, checker_blacks_out_the_first_image, tmp_path, capsys
):
    argv = ["--model", str(tiny_assets / "sd"), "--classifier", str(tiny_assets / "skin"), "--steps", "2"]
    argv += ["--num-images", "4", "--batch-size", "4", "--labeller", "toy:skin", "--threads", "1"]
    argv += ["--configurations", "vanilla", "--output-dir", str(tmp_path), "--no-progress"]
    report = evaluate_command.main(argv)
    summary = report["results"]["vanilla"]
    assert summary["num_blacked_out"] == 1 and summary["num_valid"] <= 3
    assert "1 blacked out by the safety checker" in capsys.readouterr().out


def test_no_safety_checker_flag_reaches_every_load(tiny_assets, checker_blacks_out_the_first_image, tmp_path):
    common = ["--model", str(tiny_assets / "sd"), "--steps", "2", "--threads", "1", "--no-safety-checker"]
    generate_command.main(
        common + ["--classifier", str(tiny_assets / "skin"), "--num-images", "2", "--output-dir", str(tmp_path / "g")]
    )
    extract_command.main(
        common
        + ["--prompt", "a face", "--num-images", "2", "--labeller", "toy:skin", "--output-dir", str(tmp_path / "h")]
    )
    assert checker_blacks_out_the_first_image == [False, False]


def test_extract_counts_blacked_out_images_and_every_labellers_classes(
    tiny_assets, checker_blacks_out_the_first_image, tmp_path, capsys
):
    argv = ["--model", str(tiny_assets / "sd"), "--steps", "2", "--threads", "1", "--no-progress"]
    argv += ["--prompt", "a face", "--num-images", "3", "--batch-size", "3", "--output-dir", str(tmp_path)]
    extract_command.main(argv + ["--labeller", "toy:skin", "--labeller", "toy:glasses"])
    out = capsys.readouterr().out
    assert "skin: light " in out and "; glasses: without " in out  # both labellers' counts, not only the first
    assert "extract: 1 of 3 images blacked out by the model's safety checker (NSFW content detected). They are " in out
    records = json.loads((tmp_path / "manifest.json").read_text())["images"]
    assert [r.get("blacked_out", False) for r in records] == [True, False, False]
    assert records[0]["label"] == -1 and records[0]["labels"] == {"skin": -1, "glasses": -1}


def test_summaries_count_blacked_out_images_as_unlabelled():
    from h_classifiers.evaluation import summarize_labels

    summary = summarize_labels(torch.tensor([0, 1, 1, 0]), [0.5, 0.5], asked=[0, 1, 1, 1], blacked_out=[0])
    assert summary["num_blacked_out"] == 1 and summary["counts"] == [1, 2] and summary["num_valid"] == 3
    assert summary["hit_rate_strict"] == 0.5  # the blacked-out image is a miss
    assert "num_blacked_out" not in summarize_labels(torch.tensor([0, 1]), [0.5, 0.5])  # no safety checker ran


def test_fair_diffusion_passes_on_what_the_safety_checker_flagged():
    from h_classifiers.baselines import FairDiffusion

    pipe = tiny_sd_pipeline()
    baseline = FairDiffusion(pipe, ["a light face", "a dark face"], {"edit_guidance_scale": 2.0})
    call = {"num_inference_steps": 2, "output_type": "pil"}
    prompts, classes = ["a face"] * 3, [0, 1, 0]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert baseline(prompts, generators, classes, **call).nsfw_content_detected is None  # no checker

    def flag_first(image, device, dtype):
        return image, [i == 0 for i in range(len(image))]

    baseline.sega.run_safety_checker = flag_first  # one SEGA call per class: its first image flagged
    output = baseline(prompts, [torch.Generator().manual_seed(i) for i in range(3)], classes, **call)
    assert output.nsfw_content_detected == [True, True, False]
