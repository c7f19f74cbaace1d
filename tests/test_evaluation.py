"""Evaluation library: targets, class assignment, metrics, configurations and output files.

The configuration logic runs against a recording fake pipeline (fast, exact about what each call receives); the
generation itself runs on a tiny in-process Stable Diffusion where the pipeline matters (batch independence).
"""

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from h_classifiers.evaluation import (
    EvaluationSpec,
    asked_classes,
    class_counts,
    class_fractions,
    evaluate,
    fairness_discrepancy,
    make_grid,
    parse_target,
    run_configuration,
    summarize_labels,
    target_verdicts,
)
from h_classifiers.generation import batch_ranges


class RecordingPipe:
    """Stands in for the pipeline: one 4x4 image per prompt whose red value is its generator's seed mod 256."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, output_type, **kwargs):
        assert output_type == "pil"
        assert len(prompt) == len(generator)
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"prompt": list(prompt), "seeds": seeds, **kwargs})
        images = [Image.new("RGB", (4, 4), (s % 256, 0, 0)) for s in seeds]
        return SimpleNamespace(images=images)


def seed_parity_labeller(images):
    """Label = red value mod 2 (so image i gets (seed + i) mod 2), and -1 for red values divisible by 5."""
    reds = torch.tensor([image.getpixel((0, 0))[0] for image in images])
    return torch.where(reds % 5 == 0, -1, reds % 2)


# ---------------------------------------------------------------------------------------------------------------
# Targets and class assignment
# ---------------------------------------------------------------------------------------------------------------


def test_parse_target_forms():
    names = ["light", "dark"]
    assert parse_target("0.3,0.7", names) == [0.3, 0.7]
    assert parse_target([0.25, 0.75], names) == [0.25, 0.75]
    assert parse_target("uniform", ["a", "b", "c"]) == pytest.approx([1 / 3] * 3)
    assert parse_target("dark", names) == [0.0, 1.0]


@pytest.mark.parametrize(
    "text, fragment",
    [("0.5,0.6", "sums to 1.1"), ("0.5", "has 1 values"), ("-0.2,1.2", "negative"), ("nan,1", "NaN"), ("abc", "abc")],
)
def test_parse_target_errors_name_the_argument_and_accepted_values(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_target(text, ["light", "dark"], argument="--target")
    message = str(info.value)
    assert "--target" in message and fragment in message and "'uniform'" in message


@pytest.mark.parametrize("target, n", [([0.5, 0.5], 512), ([0.3, 0.7], 512), ([1 / 3] * 3, 512), ([0.3, 0.7], 7)])
def test_class_counts_follow_the_target(target, n):
    counts = class_counts(target, n)
    assert sum(counts) == n
    assert all(abs(c - p * n) < 1 for c, p in zip(counts, target))
    classes = asked_classes(target, n)
    assert [classes.count(k) for k in range(len(target))] == counts


def test_assigned_classes_are_interleaved_so_every_batch_follows_the_target():
    target = [0.3, 0.7]
    classes = asked_classes(target, 512)
    for start in range(0, 512, 8):
        batch = classes[start : start + 8]
        assert abs(batch.count(0) - 0.3 * 8) <= 1.5


def test_batch_ranges_cover_everything_in_near_equal_batches():
    batches = batch_ranges(10, 8)
    assert [len(b) for b in batches] == [5, 5]
    assert [i for b in batches for i in b] == list(range(10))
    assert [len(b) for b in batch_ranges(512, 64)] == [64] * 8


# ---------------------------------------------------------------------------------------------------------------
# Metrics on known labels
# ---------------------------------------------------------------------------------------------------------------


def test_fractions_and_fd_use_one_hot_labels_over_valid_images():
    labels = torch.tensor([0, 0, 1, -1, 1, 1, 1, -1])  # 6 valid: 2 of class 0, 4 of class 1
    assert class_fractions(labels, 2) == pytest.approx([2 / 6, 4 / 6])
    summary = summarize_labels(labels, [0.5, 0.5])
    assert summary["counts"] == [2, 4]
    assert summary["valid_rate"] == pytest.approx(6 / 8)
    assert summary["fd"] == pytest.approx(math.sqrt(2 * (0.5 - 2 / 6) ** 2))
    assert fairness_discrepancy([0.3, 0.7], [0.3, 0.7]) == 0
    assert fairness_discrepancy([1, 0, 0], [0, 1, 0]) == pytest.approx(math.sqrt(2))


def test_hit_rate_counts_the_asked_class():
    labels = torch.tensor([0, 1, 1, -1])
    summary = summarize_labels(labels, [0.5, 0.5], asked=[0, 0, 1, 1])
    assert summary["hit_rate"] == pytest.approx(2 / 3)  # among the 3 valid images
    assert summary["hit_rate_strict"] == pytest.approx(2 / 4)  # invalid counts as a miss


def test_no_valid_image_gives_no_fractions():
    summary = summarize_labels(torch.tensor([-1, -1]), [0.5, 0.5])
    assert summary["fractions"] is None and summary["fd"] is None and summary["valid_rate"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


def make_spec(**kwargs):
    defaults = {
        "prompt": "a photo of a face",
        "target": [0.3, 0.7],
        "num_images": 20,
        "batch_size": 8,
        "seed": 100,
        "num_inference_steps": 3,
        "guidance_scale": 2.0,
        "class_prompts": ["a light face", "a dark face"],
        "guidance": {"guidance_strength": 1.5},
    }
    defaults.update(kwargs)
    return EvaluationSpec(**defaults)


def test_vanilla_generates_n_images_with_one_seed_per_image_and_no_guidance():
    pipe = RecordingPipe()
    generation = run_configuration(pipe, None, make_spec(), "vanilla")
    assert len(generation.images) == 20 and generation.asked is None
    assert [s for call in pipe.calls for s in call["seeds"]] == list(range(100, 120))
    assert all(len(call["prompt"]) <= 8 for call in pipe.calls)
    for call in pipe.calls:
        assert set(call["prompt"]) == {"a photo of a face"}
        assert "guidance_mode" not in call and "h_classifier" not in call
        assert call["num_inference_steps"] == 3 and call["guidance_scale"] == 2.0


def test_prompt_baseline_draws_classes_to_match_the_target():
    pipe = RecordingPipe()
    spec = make_spec(num_images=50)
    generation = run_configuration(pipe, None, spec, "prompt")
    prompts = [p for call in pipe.calls for p in call["prompt"]]
    assert len(prompts) == 50 and generation.asked == asked_classes(spec.target, 50)
    assert prompts.count("a dark face") == 35 and prompts.count("a light face") == 15
    assert [spec.class_prompts[k] for k in generation.asked] == prompts
    assert all("guidance_mode" not in call for call in pipe.calls)


def test_sample_mode_passes_one_target_class_per_image():
    pipe = RecordingPipe()
    classifier = object()
    spec = make_spec()
    generation = run_configuration(pipe, classifier, spec, "sample")
    passed = [c for call in pipe.calls for c in call["target_classes"]]
    assert passed == generation.asked == asked_classes(spec.target, 20)
    for call in pipe.calls:
        assert call["guidance_mode"] == "sample" and call["h_classifier"] is classifier
        assert call["guidance_strength"] == 1.5 and len(call["target_classes"]) == len(call["prompt"])


def test_distribution_mode_passes_the_target_to_every_batch():
    pipe = RecordingPipe()
    generation = run_configuration(pipe, "clf", make_spec(), "distribution")
    assert len(generation.images) == 20 and generation.asked is None
    for call in pipe.calls:
        assert call["guidance_mode"] == "distribution" and call["target_distribution"] == [0.3, 0.7]
        assert "target_classes" not in call


def test_unknown_configuration_and_missing_class_prompts_are_refused():
    with pytest.raises(ValueError, match="configuration"):
        run_configuration(RecordingPipe(), None, make_spec(), "best")
    with pytest.raises(ValueError, match="explicit prompt per class"):
        run_configuration(RecordingPipe(), None, make_spec(class_prompts=None), "prompt")


def test_evaluate_measures_each_configuration_and_writes_json_and_pngs(tmp_path):
    spec = make_spec(num_images=30, seed=0)
    configurations = ["vanilla", "sample", "distribution", "prompt"]  # Fair Diffusion needs a real pipeline
    report = evaluate(
        RecordingPipe(),
        "clf",
        spec,
        seed_parity_labeller,
        configurations,
        output_dir=tmp_path,
        class_names=["light", "dark"],
    )
    assert list(report["results"]) == configurations
    # Seeds 0..29: multiples of 5 are unlabelled (6), the rest alternate classes by parity.
    expected = [sum(1 for s in range(30) if s % 5 and s % 2 == k) for k in (0, 1)]
    for summary in report["results"].values():
        assert summary["num_images"] == 30 and summary["num_valid"] == 24
        assert summary["counts"] == expected
        assert summary["fd"] == pytest.approx(fairness_discrepancy([0.3, 0.7], [c / 24 for c in expected]))
    assert "hit_rate" in report["results"]["sample"] and "hit_rate" not in report["results"]["vanilla"]

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["vanilla"]["counts"] == expected and saved["class_names"] == ["light", "dark"]
    for name in ("grid_vanilla", "grid_sample", "grid_distribution", "grid_prompt", "fractions"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_grid_shape_and_tile_size():
    small = [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(10)]
    grid = make_grid(small, columns=4, padding=1)
    assert grid.size == (4 * 65 + 1, 3 * 65 + 1)  # 16 px enlarged x4 to 64 px
    assert grid.getpixel((1 + 65 + 10, 1 + 10)) == (1, 0, 0)  # second tile holds the second image
    large = [Image.new("RGB", (512, 512)) for _ in range(3)]
    assert make_grid(large, padding=0).size == (3 * 128, 128)
    assert make_grid(large, tile=32, padding=0).size == (3 * 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# On a tiny real pipeline
# ---------------------------------------------------------------------------------------------------------------


def as_array(images):
    import numpy as np

    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_only_distribution_mode_depends_on_the_batch_size(ba_pipe, classifier):
    """Why reproduce may reuse vanilla / sample / prompt images across batch sizes, but not distribution mode."""
    # 1/4 : 3/4 is [1, 3] images for a batch of 4 but [1, 1] + [0, 2] or [1, 1] for batches of 2: other assignments
    spec = make_spec(target=[0.25, 0.75], num_images=4, batch_size=4, seed=7, guidance={"guidance_strength": 5.0})
    small = replace(spec, batch_size=2)
    runs = {}
    for configuration in ("vanilla", "sample", "prompt", "distribution"):
        a = as_array(run_configuration(ba_pipe, classifier, spec, configuration).images)
        b = as_array(run_configuration(ba_pipe, classifier, small, configuration).images)
        runs[configuration] = (a, b)
        if configuration != "distribution":
            assert abs(a - b).max() <= 1, configuration  # equal up to float rounding of batched kernels
    assert abs(runs["sample"][0] - runs["vanilla"][0]).max() > 8  # the guidance did move the images
    assert abs(runs["distribution"][0] - runs["distribution"][1]).max() > 1


def test_distribution_mode_carries_the_counts_across_batches(monkeypatch, ba_pipe, classifier):
    """With more images than one batch, every call of a run gets the same BalanceState (the run lands on the target)."""
    states = []
    call = type(ba_pipe).__call__

    def recording_call(pipe, *args, **kwargs):
        states.append(kwargs.get("balance_state"))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(ba_pipe), "__call__", recording_call)
    spec = make_spec(target=[0.5, 0.5], num_images=4, batch_size=2, seed=3)
    run_configuration(ba_pipe, classifier, spec, "distribution")
    assert len(states) == 2 and states[0] is not None and states[0] is states[1]
    assert states[0].num_images == 4
    states.clear()
    run_configuration(ba_pipe, classifier, replace(spec, batch_size=4), "distribution")
    assert states == [None]  # one batch: nothing to carry


# ---------------------------------------------------------------------------------------------------------------
# Readable targets, one definition of the measures, verdicts, safety checker, plots without a backend
# ---------------------------------------------------------------------------------------------------------------


def test_target_errors_show_float32_values_readably():
    with pytest.raises(ValueError) as info:
        parse_target(torch.tensor([0.6, 0.5]), ["light", "dark"], argument="--target")
    message = str(info.value)
    assert "[0.6, 0.5] sums to 1.1" in message and "0.6000000238" not in message


def test_a_negative_target_says_probabilities_must_be_non_negative():
    with pytest.raises(ValueError, match=r"`--target` \[-0.2, 1.2\]: probabilities must be non-negative"):
        parse_target("-0.2,1.2", ["light", "dark"], argument="--target")


def test_the_target_tolerance_is_the_pipelines(monkeypatch):
    import pipeline_balancing_act as pba
    from h_classifiers import metrics

    assert metrics.TARGET_SUM_TOLERANCE == pba.TARGET_SUM_TOLERANCE  # the command line's copy (no diffusers import)
    assert parse_target("0.5,0.5009", ["a", "b"]) == [0.5, 0.5009]  # within 1e-3
    monkeypatch.setattr(metrics, "TARGET_SUM_TOLERANCE", 1e-4)
    with pytest.raises(ValueError, match="sums to"):
        parse_target("0.5,0.5009", ["a", "b"])


def test_class_fractions_over_the_images_kept_and_the_toy_worlds_fractions_use_them():
    from h_classifiers import toy_world

    labels = torch.tensor([0, 1, 1, 0, -1])
    assert class_fractions(labels, 2, keep=[True, True, True, False, True]) == pytest.approx([1 / 3, 2 / 3])
    assert class_fractions(labels, 2, keep=[False] * 5) is None
    read = {"skin": torch.tensor([0, 1, 1, 1]), "glasses": torch.tensor([0, 0, 1, 0]), "hair": torch.tensor([2] * 4)}
    read["valid"] = torch.tensor([True, True, False, False])
    assert toy_world.class_fractions(read)["skin"] == [0.25, 0.75]
    valid_only = toy_world.class_fractions(read, only_valid=True)
    assert valid_only["skin"] == [0.5, 0.5] and valid_only["hair"] == [0.0, 0.0, 1.0]
    read["valid"][:] = False
    assert toy_world.class_fractions(read, only_valid=True)["glasses"] == [0.0, 0.0]


def test_verdicts_say_which_configurations_met_the_target_and_which_came_closest():
    results = {
        "vanilla": {"fd": 0.30},
        "sample": {"fd": 0.02},
        "distribution": {"fd": 0.01},
        "prompt": {"fd": None},
    }
    verdict = target_verdicts(results, threshold=0.03)
    assert verdict["met"] == {"vanilla": False, "sample": True, "distribution": True, "prompt": None}
    assert verdict["closest"] == "distribution" and verdict["threshold_fd"] == 0.03
    assert target_verdicts({"vanilla": {"fd": None}})["closest"] is None


class FlaggingPipe(RecordingPipe):
    """A pipeline whose safety checker flags every image with an even seed."""

    def __call__(self, prompt, generator, output_type, **kwargs):
        output = super().__call__(prompt, generator, output_type, **kwargs)
        output.nsfw_content_detected = [g.initial_seed() % 2 == 0 for g in generator]
        return output


def test_evaluate_reports_the_images_the_safety_checker_blacked_out():
    report = evaluate(FlaggingPipe(), None, make_spec(num_images=10, seed=0), seed_parity_labeller, ["vanilla"])
    summary = report["results"]["vanilla"]
    assert summary["num_blacked_out"] == 5 and summary["counts"][0] == 0  # even seeds (class 0) blacked out
    assert report["verdict"]["closest"] == "vanilla"
    unchecked = evaluate(RecordingPipe(), None, make_spec(), seed_parity_labeller, ["vanilla"])
    assert "num_blacked_out" not in unchecked["results"]["vanilla"]  # no safety checker ran: nothing to report


def test_the_plots_need_no_matplotlib_backend(tmp_path, monkeypatch):
    """Library code never calls `matplotlib.use` (it would change the caller's backend)."""
    import matplotlib

    from h_classifiers.evaluation import save_fraction_chart
    from h_classifiers.model_card import plot_metrics

    def must_not_run(*args, **kwargs):
        raise AssertionError("matplotlib.use called by library code")

    monkeypatch.setattr(matplotlib, "use", must_not_run)
    save_fraction_chart([0.5, 0.5], {"vanilla": [0.3, 0.7]}, ["light", "dark"], tmp_path / "f.png", "title")
    metric = {"step": 0, "accuracy": 0.5, "balanced_accuracy": 0.5, "train_accuracy": 0.6}
    plot_metrics([metric, metric | {"step": 1}], tmp_path / "a.png", "title")
    for name in ("f.png", "a.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
