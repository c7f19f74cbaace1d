"""The image-space guidance baseline, the lab's peer of the unconditional table (`lab.image_guidance`): the x0
classifier's files, the guided DDIM loop against `DDIMPipeline`, what the gradient does to the images, the sampler the
table builds and the training script. The product's `evaluate` has no such configuration."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline
from diffusers.models.modeling_utils import ModelMixin
from tiny_models import tiny_classifier
from unconditional_models import IMAGE_SIZE, UNCONDITIONAL_H_SHAPE, tiny_ddim_pipeline, tiny_unet

import lab.image_guidance as image_guidance
from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.io_utils import atomic_directory
from h_classifiers.toy_world import ATTRIBUTES, TOY_DDPM_PATH, make_toy_dataset
from lab.image_guidance import (
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    TOY_X0_CLASSIFIERS_PATH,
    ImageSpaceGuidance,
    X0Classifier,
    comparison_sampler,
    default_x0_classifier,
)
from pipeline_balancing_act import BalanceState


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brightness_classifier(gain: float = 4.0) -> X0Classifier:
    """A known x0 classifier: the dark logit is `-gain * mean(silu(x))` over pixels and channels, the light one 0, so
    guidance towards dark must darken the image (silu is increasing on [-1, 1])."""
    classifier = X0Classifier(
        attribute="skin", class_names=["light", "dark"], sample_size=IMAGE_SIZE, block_out_channels=(3,)
    )
    with torch.no_grad():
        conv = classifier.features[0]
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(3):
            conv.weight[c, c, 1, 1] = 1.0  # identity
        classifier.head.weight.zero_()
        classifier.head.bias.zero_()
        classifier.head.weight[1] = -gain
    return classifier.eval()


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def p_dark(classifier: X0Classifier, images: torch.Tensor) -> torch.Tensor:
    """The classifier's probability of dark for images in [0, 1]."""
    with torch.no_grad():
        return classifier(images * 2 - 1).softmax(1)[:, 1]


@pytest.fixture(scope="module")
def pipe():
    return tiny_ddim_pipeline()


# ----------------------------------------------------------------------------------------------------------------
# The classifier's files
# ----------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_as_safetensors_and_config(tmp_path):
    previous = os.umask(0o022)
    try:
        torch.manual_seed(0)
        classifier = X0Classifier(attribute="hair", class_names=["none", "black", "red"], block_out_channels=(4, 8))
        classifier.save_pretrained(tmp_path / "x0")
    finally:
        os.umask(previous)
    files = sorted(p.name for p in (tmp_path / "x0").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "x0").iterdir()} == {0o644}
    config = json.loads((tmp_path / "x0" / "config.json").read_text())
    assert config["attribute"] == "hair" and config["class_names"] == ["none", "black", "red"]
    loaded = X0Classifier.from_pretrained(tmp_path / "x0")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(images), classifier(images), rtol=0, atol=0)
    assert loaded.class_index("red") == 2 and loaded(torch.zeros(1, 3, 16, 16)).shape == (1, 3)  # resized input
    with pytest.raises(ValueError, match=r"`images` must have shape \[B, 3, H, W\]"):
        loaded(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="not a class of the 'hair' classifier"):
        loaded.class_index("blond")
    with pytest.raises(ValueError, match="is a file; .* Pickled checkpoints are refused"):
        X0Classifier.from_pretrained(tmp_path / "x0" / "config.json")
    with pytest.raises(FileNotFoundError, match="does not exist; train one with"):
        X0Classifier.from_pretrained(tmp_path / "missing")


def test_a_failed_save_keeps_the_previous_classifier_whole(tmp_path, monkeypatch):
    brightness_classifier().save_pretrained(tmp_path / "x0")
    before = {p.name: p.read_bytes() for p in (tmp_path / "x0").iterdir()}

    def fails(self, directory, **kwargs):
        (directory / "config.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(ModelMixin, "save_pretrained", fails)
    with pytest.raises(OSError, match="disk full"):
        X0Classifier(attribute="skin", class_names=["light", "dark"]).save_pretrained(tmp_path / "x0")
    assert {p.name: p.read_bytes() for p in (tmp_path / "x0").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["x0"]  # no temporary folder left
    with atomic_directory(tmp_path / "x0") as new:  # a completed write replaces the folder as a whole
        (new / "only.txt").write_text("new")
    assert [p.name for p in (tmp_path / "x0").iterdir()] == ["only.txt"]


def test_the_labs_x0_classifiers_read_held_out_toy_faces():
    """Small files, the toy world's classes, and they read faces they never saw (another seed than training's)."""
    report = json.loads(open(os.path.join(ROOT, "docs", "lab", "x0_classifiers.json"), encoding="utf-8").read())
    faces = make_toy_dataset(96, seed=123_456)
    for attribute, class_names in ATTRIBUTES.items():
        folder = TOY_X0_CLASSIFIERS_PATH / attribute
        assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 400_000
        classifier = X0Classifier.from_pretrained(folder)
        assert classifier.config.attribute == attribute and list(classifier.config.class_names) == class_names
        with torch.no_grad():
            predicted = classifier(faces.images * 2 - 1).argmax(1)
        assert (predicted == faces.labels[attribute]).float().mean() >= 0.95, attribute
        entry = report[attribute]
        assert entry["output"] == f"lab/assets/toy-ddpm-x0/{attribute}"
        assert entry["held_out"]["clean"]["accuracy"] >= 0.99 and set(entry["comparison"]) == {
            "none",
            "noise",
            "x0hat",
        }
        assert default_x0_classifier(TOY_DDPM_PATH, attribute) == folder
    assert default_x0_classifier(ROOT, "skin") is None and default_x0_classifier(None, "skin") is None


# ----------------------------------------------------------------------------------------------------------------
# The guided loop
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_scale_zero_gives_ddim_pipelines_images_bit_for_bit(pipe, eta):
    expected = pipe(batch_size=3, generator=generators(3), eta=eta, num_inference_steps=4, output_type="np").images
    sampler = ImageSpaceGuidance(pipe, brightness_classifier(), scale=0.0)
    for target in ({"target_classes": "dark"}, {"target_distribution": [0.5, 0.5]}):
        images = sampler(
            batch_size=3, generator=generators(3), eta=eta, num_inference_steps=4, output_type="np", **target
        )
        np.testing.assert_array_equal(images.images, expected)
    pil = sampler(batch_size=1, generator=generators(1), num_inference_steps=2, target_classes=0).images
    assert pil[0].size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guidance_moves_the_images_towards_the_asked_class(pipe, eta):
    classifier = brightness_classifier()
    call = {"batch_size": 4, "eta": eta, "num_inference_steps": 4, "output_type": "pt"}
    plain = ImageSpaceGuidance(pipe, classifier, 0.0)(generator=generators(4), target_classes="dark", **call).images
    dark = ImageSpaceGuidance(pipe, classifier, 10.0)(generator=generators(4), target_classes="dark", **call).images
    # darker, and read as dark with a much higher probability, image by image
    assert (dark.mean((1, 2, 3)) < plain.mean((1, 2, 3)) - 0.05).all()
    assert (p_dark(classifier, dark) > p_dark(classifier, plain) + 0.1).all()
    # and the other way: brighter, less dark
    light = ImageSpaceGuidance(pipe, classifier, 10.0)(generator=generators(4), target_classes="light", **call).images
    assert (light.mean((1, 2, 3)) > plain.mean((1, 2, 3))).all()
    assert (p_dark(classifier, light) < p_dark(classifier, plain)).all()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_without_clipping_a_guided_step_is_the_ddim_step_of_the_guided_eps(eta):
    """The classifier-guidance form itself, written out: eps' = eps + s sqrt(1 - abar) dL/dx_t into `scheduler.step`."""
    from diffusers import DDIMScheduler

    from pipeline_balancing_act import guidance_loss

    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    classifier, scale, asked = brightness_classifier(), 3.0, torch.tensor([1, 0])
    ours = ImageSpaceGuidance(pipe, classifier, scale)
    images = ours(batch_size=2, generator=generators(2), eta=eta, num_inference_steps=3, output_type="pt",
                  target_classes=asked.tolist()).images  # fmt: skip

    scheduler, gens = DDIMScheduler.from_config(pipe.scheduler.config), generators(2)
    x = torch.cat([torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for g in gens])
    scheduler.set_timesteps(3)
    for t in scheduler.timesteps:
        abar = scheduler.alphas_cumprod[t]
        x_grad = x.detach().requires_grad_(True)
        eps = pipe.unet(x_grad, t).sample
        loss = guidance_loss(classifier((x_grad - (1 - abar).sqrt() * eps) / abar.sqrt()), asked)
        guided = eps + scale * (1 - abar).sqrt() * torch.autograd.grad(loss, x_grad)[0]
        x = scheduler.step(guided.detach(), t, x, eta=eta, generator=gens).prev_sample
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_distribution_mode_assigns_exact_counts_and_guides_each_image_to_its_class(pipe, monkeypatch):
    classifier = brightness_classifier()
    assignments = []
    real = image_guidance.assign_classes

    def recording(cost, counts):
        assignments.append((real(cost, counts), list(counts)))
        return assignments[-1][0]

    monkeypatch.setattr(image_guidance, "assign_classes", recording)
    call = {"batch_size": 4, "eta": 0.0, "num_inference_steps": 4, "output_type": "pt"}
    plain = ImageSpaceGuidance(pipe, classifier, 0.0)(generator=generators(4), target_distribution=[0.5, 0.5], **call)
    assert assignments == []  # no gradient, no assignment at scale 0
    guided = ImageSpaceGuidance(pipe, classifier, 3.0)(generator=generators(4), target_distribution=[0.5, 0.5], **call)
    assert len(assignments) == 4 and all(counts == [2, 2] for _, counts in assignments)
    assert all(int(classes.sum()) == 2 for classes, _ in assignments)
    final = assignments[-1][0].bool()
    change = p_dark(classifier, guided.images) - p_dark(classifier, plain.images)
    assert (change[final] > 0.3).all() and (change[~final].abs() < 0.05).all()
    assert p_dark(classifier, guided.images).gt(0.5).tolist() == final.tolist()  # read as the target counts: 2 and 2


def test_a_balance_state_carries_the_counts_across_calls_of_one_image(pipe):
    state = BalanceState()
    sampler = ImageSpaceGuidance(pipe, brightness_classifier(), 10.0)
    for seed in range(2):
        sampler(batch_size=1, generator=generators(1, seed), num_inference_steps=2, target_distribution=[0.5, 0.5],
                balance_state=state)  # fmt: skip
    assert state.num_images == 2 and state.groups == [{"attributes": ["skin"], "class_names": [["light", "dark"]]}]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "exactly one of them"),
        ({"target_classes": "dark", "target_distribution": [0.5, 0.5]}, ValueError, "exactly one of them"),
        ({"target_classes": ["dark", "light"]}, ValueError, r"one class or one per image \(3\), got 2"),
        ({"target_classes": "blond"}, ValueError, "not a class of the 'skin' classifier"),
        ({"target_distribution": [0.2, 0.2]}, ValueError, "`target_distribution` .* sums to 0.4, not 1"),
        ({"target_distribution": "red"}, ValueError, "`target_distribution` 'red' is not valid"),
        ({"target_classes": 1, "balance_state": BalanceState()}, ValueError, "sample mode takes none"),
        ({"target_classes": 1, "generator": generators(2)}, ValueError, "list of generators of length 2"),
    ],
)
def test_the_call_refuses_what_it_cannot_do(pipe, kwargs, error, match):
    sampler = ImageSpaceGuidance(pipe, brightness_classifier(), 1.0)
    with pytest.raises(error, match=match):
        sampler(batch_size=3, num_inference_steps=2, **kwargs)
    with pytest.raises(ValueError, match="`batch_size=1` has no distribution to balance"):
        sampler(batch_size=1, num_inference_steps=2, target_distribution=[0.5, 0.5])


def test_the_sampler_refuses_a_text_to_image_pipeline_and_a_bad_scale(sd_pipe, pipe):
    with pytest.raises(ValueError, match="samples an unconditional pixel model"):
        ImageSpaceGuidance(sd_pipe, brightness_classifier())
    for scale in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="`scale` must be a finite number >= 0"):
            ImageSpaceGuidance(pipe, brightness_classifier(), scale)
    assert ImageSpaceGuidance(pipe, brightness_classifier()).scale == DEFAULT_IMAGE_GUIDANCE_SCALE


# ----------------------------------------------------------------------------------------------------------------
# The reproduction table's sampler; the product has no image_guidance configuration
# ----------------------------------------------------------------------------------------------------------------


def test_the_tables_sampler_needs_an_x0_classifier_of_the_h_classifiers_attribute_and_classes(pipe, tmp_path):
    brightness_classifier().save_pretrained(tmp_path / "x0-skin")
    X0Classifier(attribute="glasses", class_names=["without", "with"]).save_pretrained(tmp_path / "x0-glasses")
    h_classifier = tiny_classifier(h_shape=UNCONDITIONAL_H_SHAPE)
    sampler = comparison_sampler(pipe, h_classifier, tmp_path / "x0-skin")
    assert sampler.scale == DEFAULT_IMAGE_GUIDANCE_SCALE and sampler.classifier.config.attribute == "skin"
    with pytest.raises(ValueError, match="needs an x0 classifier"):
        comparison_sampler(pipe, h_classifier, None)  # the tiny pipeline is not the toy DDPM: no default
    with pytest.raises(ValueError, match="reads 'glasses' \\['without', 'with'\\], but the h-classifier"):
        comparison_sampler(pipe, h_classifier, tmp_path / "x0-glasses")


def test_evaluate_has_no_image_guidance_configuration(capsys):
    assert "image_guidance" not in evaluate_command.CONFIGURATIONS
    with pytest.raises(ValueError, match="comma-separated subset"):
        evaluate_command.parse_configurations("vanilla,image_guidance", unconditional=True)
    with pytest.raises(SystemExit):
        evaluate_command.build_parser().parse_args(["--x0-classifier", "x0"])
    assert "--x0-classifier" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The training script
# ----------------------------------------------------------------------------------------------------------------


def test_the_training_script_writes_a_loadable_classifier_and_its_report(tmp_path):
    from lab.train_x0_classifier import main

    tiny = ["--num-train", "24", "--num-test", "12", "--eval-images", "6", "--steps", "2", "--batch-size", "8"]
    tiny += ["--widths", "4", "8", "--work-dir", str(tmp_path / "work"), "--report", str(tmp_path / "report.json")]
    entry = main(tiny + ["--attribute", "hair", "--compare", "--output", str(tmp_path / "hair")])
    classifier = X0Classifier.from_pretrained(tmp_path / "hair")
    assert classifier.config.class_names == ATTRIBUTES["hair"] and classifier.config.block_out_channels == [4, 8]
    assert set(entry["comparison"]) == {"none", "noise", "x0hat"} and entry["recipe"]["augmentation"] == "x0hat"
    assert set(entry["held_out"]["x0_hat"]) == {"t=100", "t=300", "t=500", "t=700", "t=900"}
    assert 0 <= entry["held_out"]["clean"]["balanced_accuracy"] <= 1
    cached = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert len(cached) == 2 and all(name.startswith("x0hat-") for name in cached)

    main(tiny + ["--attribute", "skin", "--augmentation", "none", "--output", str(tmp_path / "skin")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report) == ["hair", "skin"]  # merged, one entry per attribute
    assert report["skin"]["command"].startswith("python lab/train_x0_classifier.py --num-train 24")
    assert "comparison" not in report["skin"] and X0Classifier.from_pretrained(tmp_path / "skin").num_classes == 2
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == cached  # the cached x0_hat were reused
