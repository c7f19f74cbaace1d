"""What training adds to the heads for guidance: the calibration and the class anchors, and how they are saved."""

import json
import math
import os

import pytest
import torch
from tiny_models import H_SHAPE, make_generator, tiny_classifier

from h_classifiers.calibration import (
    ANCHOR_SEPARATION,
    calibration_metrics,
    class_anchors,
    class_means,
    class_separation,
    fit_calibration,
)
from pipeline_balancing_act import HClassifier


def test_calibration_recovers_a_known_temperature_and_offsets():
    generator = make_generator(0)
    logits = torch.randn(20000, 3, generator=generator) * 3
    true_scale, true_bias = 0.4, torch.tensor([0.0, 1.0, -0.5])
    labels = torch.multinomial(torch.softmax(logits * true_scale + true_bias, 1), 1, generator=generator).flatten()
    scale, bias = fit_calibration(logits, labels)
    assert scale == pytest.approx(true_scale, rel=0.05)
    # offsets are defined up to a common constant
    centred = torch.tensor(bias) - torch.tensor(bias).mean()
    torch.testing.assert_close(centred, true_bias - true_bias.mean(), atol=0.08, rtol=0)
    metrics = calibration_metrics(logits, labels, scale, bias)
    assert metrics["nll_calibrated"] < metrics["nll_raw"]
    assert metrics["fraction_error"] < 0.02  # the mean calibrated probability counts like the labels


def test_calibration_is_the_identity_without_two_classes_and_finite_when_separable():
    assert fit_calibration(torch.randn(5, 2), torch.zeros(5, dtype=torch.long)) == (1.0, [0.0, 0.0])
    assert fit_calibration(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)) == (1.0, [0.0, 0.0])
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]]).repeat(10, 1)  # perfectly separated
    scale, bias = fit_calibration(logits, torch.tensor([0, 1]).repeat(10))
    assert math.isfinite(scale) and scale > 1 and all(math.isfinite(b) for b in bias)


def two_gaussians(separation: float, n: int = 4000, dim: int = 8):
    """Two classes along the first axis, unit within-class spread, means `separation` apart."""
    generator = make_generator(1)
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=generator)
    x[:, 0] += y * separation
    return x, y, torch.arange(n)


@pytest.mark.parametrize("separation", [1.0, 4.0, 16.0])
def test_anchors_are_the_class_means_spread_by_the_square_root_of_the_separation(separation):
    x, y, rows = two_gaussians(separation)
    means = class_means(x, y, rows, 2)
    measured = class_separation(x, y, rows, means)
    assert measured == pytest.approx(separation, rel=0.05)
    anchors = class_anchors(x, y, rows, 2)
    centroid = means.mean(0)
    factor = math.sqrt(ANCHOR_SEPARATION / measured)
    torch.testing.assert_close(anchors, centroid + (means - centroid) * factor)
    if separation == ANCHOR_SEPARATION:
        torch.testing.assert_close(anchors, means, atol=0.1, rtol=0)


def test_calibration_and_anchors_round_trip_through_save_pretrained(tmp_path):
    clf = tiny_classifier()
    heads, classes = clf.weight.shape[:2]
    clf.set_calibration([0.5] * heads, [[0.0, 0.25]] * heads)
    clf.save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["calibration_scale"] == [0.5] * heads and config["anchor_source"] == "random"
    loaded = HClassifier.from_pretrained(tmp_path / "c")
    torch.testing.assert_close(loaded.anchors, clf.anchors)
    h = torch.randn(3, *H_SHAPE, generator=make_generator(2))
    torch.testing.assert_close(loaded.calibrated_logits(h, 999), clf(h, 999) * 0.5 + torch.tensor([0.0, 0.25]))


def test_a_classifier_saved_before_calibration_and_anchors_is_refused_with_how_to_retrain_it(tmp_path):
    clf = tiny_classifier(anchors=False)
    clf.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("calibration_scale", "calibration_bias", "anchor_source"):
        config.pop(key)  # the keys an earlier version did not write
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        HClassifier.from_pretrained(tmp_path / "old")
    message = str(error.value)
    assert "\n" not in message and "no calibration and no anchors" in message and "balancing-act train" in message


def test_save_pretrained_replaces_config_and_weights_as_one_unit(tmp_path, monkeypatch):
    """A save that fails half-way (config written, weights not) leaves the previous classifier whole; a save that
    succeeds keeps the folder's other files (model card, metrics)."""
    from diffusers.models.modeling_utils import ModelMixin

    folder = tmp_path / "skin"
    old = tiny_classifier(seed=1)
    old.save_pretrained(folder)
    (folder / "README.md").write_text("card")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash_after_the_config(self, directory, **kwargs):
        self.save_config(directory)
        raise OSError("disk full")

    monkeypatch.setattr(ModelMixin, "save_pretrained", crash_after_the_config)
    with pytest.raises(OSError, match="disk full"):
        tiny_classifier(seed=2, class_names=("a", "b")).save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skin"]  # no temporary folder left behind
    # a failure while the files take their place (here: the second rename or replace of the save) changes nothing
    moves = []
    real_rename, real_replace = os.rename, os.replace

    def failing_second_move(real):
        def move(source, destination):
            moves.append(destination)
            if len(moves) == 2:
                raise OSError("interrupted")
            return real(source, destination)

        return move

    monkeypatch.setattr(os, "rename", failing_second_move(real_rename))
    monkeypatch.setattr(os, "replace", failing_second_move(real_replace))
    with pytest.raises(OSError, match="interrupted"):
        tiny_classifier(seed=2, class_names=("a", "b")).save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    new = tiny_classifier(seed=2)
    new.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "card"
    torch.testing.assert_close(HClassifier.from_pretrained(folder).weight, new.weight)


def test_bad_calibration_is_refused():
    clf = tiny_classifier()
    heads = clf.weight.shape[0]
    with pytest.raises(ValueError, match="calibration"):
        clf.set_calibration([1.0] * (heads - 1), [[0.0, 0.0]] * heads)
    with pytest.raises(ValueError, match="calibration"):
        clf.set_calibration([-1.0] * heads, [[0.0, 0.0]] * heads)
