"""Bad input to BalancingActPipeline: each error names the argument, and no denoising step runs before it."""

import math

import numpy as np
import pytest
import torch
from tiny_models import make_generator, tiny_classifier

import pipeline_balancing_act as pba
from pipeline_balancing_act import HClassifier


def call(pipe, **kwargs):
    args = {
        "num_inference_steps": 2,
        "num_images_per_prompt": 2,
        "output_type": "latent",
        "generator": make_generator(0),
        "guidance_mode": "distribution",
        "target_distribution": [0.5, 0.5],
        **kwargs,
    }
    return pipe("a photo of a face", **args)


@pytest.fixture
def unet_calls(ba_pipe):
    """Counts UNet calls, to check that errors come before the first denoising step."""
    calls = []
    handle = ba_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()
    assert list(ba_pipe.unet.mid_block._forward_hooks.values()) == []  # the call's hook left with it
    assert pba._ACTIVE_H_FUNCTIONS.get() == ()
    assert len(ba_pipe.unet._forward_pre_hooks) == 0


CLASSIFIER = tiny_classifier()
HAIR = tiny_classifier(class_names=("none", "black", "red"), attribute="hair")
NAN = math.nan


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"guidance_mode": "balanced"}, "guidance_mode"),
        ({"guidance_mode": "distribution", "num_images_per_prompt": 1}, "guidance_mode='distribution'"),
        ({"target_distribution": [0.2, 0.3, 0.5]}, "target_distribution"),
        ({"target_distribution": [1.5, -0.5]}, "target_distribution"),
        ({"target_distribution": [0.6, 0.6]}, "target_distribution"),
        ({"target_distribution": [NAN, 1.0]}, "target_distribution"),
        ({"target_distribution": torch.tensor([0.7, 0.2])}, "target_distribution"),
        ({"target_distribution": "purple"}, "target_distribution.*purple"),
        ({"target_distribution": None}, "target_distribution"),
        ({"target_distribution": {"a": 1}}, "target_distribution"),
        ({"guidance_mode": "sample", "target_classes": "purple"}, "target_classes.*purple"),
        ({"guidance_mode": "sample", "target_classes": 2}, "target_classes.*index"),
        ({"guidance_mode": "sample", "target_classes": ["light", "blue"]}, "target_classes.*blue"),
        ({"guidance_mode": "sample", "target_classes": np.array([0, 1, 0])}, "target_classes"),
        ({"guidance_mode": "sample", "target_classes": [0, 1, 1]}, "target_classes"),
        ({"guidance_mode": "sample", "target_classes": None}, "target_classes"),
        ({"guidance_strength": -1.0}, "guidance_strength"),
        ({"guidance_strength": NAN}, "guidance_strength"),
        ({"guidance_strength": "high"}, "guidance_strength"),
        ({"guidance_steps": (0.5, 1.5)}, "guidance_steps"),
        ({"guidance_steps": (-0.1, 0.5)}, "guidance_steps"),
        ({"guidance_steps": (0.6, 0.6)}, "guidance_steps"),
        ({"guidance_steps": []}, "guidance_steps"),
        ({"guidance_steps": [0, -1]}, "guidance_steps"),
        ({"guidance_steps": [0, 1.5]}, "guidance_steps"),
        ({"guidance_steps": 0.5}, "guidance_steps"),
        ({"guidance_steps": [5]}, "guidance_steps"),  # 2 denoising steps: index 5 does not exist
        ({"guidance_steps": (0.1, 0.4)}, "guidance_steps"),  # 2 steps: i / 2 in {0, 0.5}, none in the window
        ({"guidance_loss": "l1"}, "guidance_loss"),
        ({"classifier_temperature": 0.0}, "classifier_temperature"),
        ({"guided_branches": "uncond"}, "guided_branches"),
        ({"h_classifier": [CLASSIFIER, HAIR], "guidance_strength": [1.0]}, "guidance_strength"),
        ({"h_classifier": [CLASSIFIER, HAIR], "guidance_strength": [1.0, 2.0, 3.0]}, "guidance_strength"),
        ({"h_classifier": [CLASSIFIER, HAIR], "target_distribution": [0.5, 0.5]}, "target_distribution"),
        ({"h_classifier": [CLASSIFIER, HAIR], "target_distribution": [[0.5, 0.5], [0.5, 0.5]]}, "target_distribution"),
        ({"h_classifier": []}, "h_classifier"),
        ({"h_classifier": 42}, "h_classifier"),
    ],
)
def test_bad_argument_is_refused_before_the_first_step(ba_pipe, unet_calls, kwargs, argument):
    kwargs = {"h_classifier": CLASSIFIER, **kwargs}
    with pytest.raises((ValueError, TypeError), match=argument.replace("(", r"\(").replace(")", r"\)")):
        call(ba_pipe, **kwargs)
    assert unet_calls == []


def test_h_shape_mismatch_names_both_shapes(ba_pipe, unet_calls):
    other = tiny_classifier(h_shape=[64, 8, 8])
    with pytest.raises(ValueError, match=r"\[64, 8, 8\].*\[64, 4, 4\]"):
        call(ba_pipe, h_classifier=other)
    # the same classifier fits at twice the resolution: the check follows height / width
    with pytest.raises(ValueError, match=r"\[64, 4, 4\].*\[64, 8, 8\] at 32x32"):
        call(ba_pipe, h_classifier=CLASSIFIER, height=32, width=32)
    assert unet_calls == []


def test_missing_classifier_path(ba_pipe, unet_calls, tmp_path):
    with pytest.raises(FileNotFoundError, match="h_classifier"):
        call(ba_pipe, h_classifier=str(tmp_path / "nowhere"))
    assert unet_calls == []


def test_pickle_checkpoint_offered_as_classifier_is_refused(ba_pipe, unet_calls, tmp_path, monkeypatch):
    path = tmp_path / "skin.pt"
    torch.save(CLASSIFIER.state_dict(), path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(ValueError, match="h_classifier.*Pickled"):
        call(ba_pipe, h_classifier=str(path))
    assert unet_calls == []


def test_accepted_edge_values(ba_pipe):
    """Values at the edge of what is accepted: a target within the sum tolerance, strength 0, an index window."""
    call(ba_pipe, h_classifier=CLASSIFIER, target_distribution=[0.5, 0.5004], guidance_strength=0.0)
    call(ba_pipe, h_classifier=CLASSIFIER, target_distribution=torch.tensor([1.0, 0.0]), guidance_steps=range(2))
    call(ba_pipe, h_classifier=[CLASSIFIER, HAIR], target_distribution=["dark", [0.2, 0.3, 0.5]])
    call(ba_pipe, h_classifier=CLASSIFIER, guidance_mode="sample", target_classes=np.array([1, 0]))
    call(ba_pipe, h_classifier=[CLASSIFIER, HAIR], guidance_mode="sample", target_classes=[["dark", 0], "red"])
    assert isinstance(HClassifier, type)
