"""HClassifier, MidBlockHook and guidance_loss: the shared pieces."""

import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from tiny_models import CLASSIFIER_TIMESTEPS, H_SHAPE, guidance_is_off, tiny_classifier

from pipeline_balancing_act import GUIDANCE_MARGIN, HClassifier, MidBlockHook, guidance_loss, logit_directions


def test_config_and_parameter_shapes():
    clf = HClassifier(attribute="hair", class_names=["none", "black", "red"], h_shape=[64, 4, 4], timesteps=[999, 500])
    assert clf.weight.shape == (2, 3, 64 * 4 * 4)
    assert clf.bias.shape == (2, 3)
    assert clf.config.temperature == 8.0
    assert clf.config.base_model is None
    assert clf.num_classes == 3


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"class_names": ["only"]}, "class_names"),
        ({"class_names": ["a", "a"]}, "class_names"),
        ({"h_shape": [64, 4]}, "h_shape"),
        ({"timesteps": []}, "timesteps"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_config_is_refused(kwargs, word):
    base = {"class_names": ["a", "b"], "h_shape": [4, 2, 2], "timesteps": [1, 2]}
    with pytest.raises(ValueError, match=word):
        HClassifier(**{**base, **kwargs})


def test_head_index_nearest_for_int_float_tensor_numpy():
    clf = HClassifier(class_names=["a", "b"], h_shape=[1, 1, 1], timesteps=[981, 961, 941.5, 1])
    assert clf.head_index(981) == 0
    assert clf.head_index(970) == 1  # |970 - 961| = 9 < |970 - 981| = 11
    assert clf.head_index(972) == 0
    assert clf.head_index(950.0) == 2  # |950-941.5| = 8.5 < 11
    assert clf.head_index(torch.tensor(942.0)) == 2
    assert clf.head_index(torch.tensor([5, 5])) == 3
    assert clf.head_index(np.int64(961)) == 1
    assert clf.head_index(np.float32(0.2)) == 3
    assert clf.head_index(5000) == 0
    with pytest.raises(ValueError, match="timestep"):
        clf.head_index(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="timestep"):
        clf.head_index("981")


def test_head_index_tie_takes_first():
    clf = HClassifier(class_names=["a", "b"], h_shape=[1, 1, 1], timesteps=[10, 20])
    assert clf.head_index(15) == 0


@pytest.mark.parametrize(
    "scheduler_cls",
    [
        DDIMScheduler,
        PNDMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        UniPCMultistepScheduler,
    ],
)
@pytest.mark.parametrize("steps", [7, 25, 50, 100])
def test_every_scheduler_timestep_maps_to_the_nearest_head(scheduler_cls, steps):
    clf = tiny_classifier()
    scheduler = scheduler_cls(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    heads = torch.tensor(CLASSIFIER_TIMESTEPS, dtype=torch.float64)
    for t in scheduler.timesteps:
        index = clf.head_index(t)
        assert abs(heads[index] - float(t)) == (heads - float(t)).abs().min()


def test_class_index():
    clf = tiny_classifier(class_names=("none", "black", "red"))
    assert clf.class_index("red") == 2
    assert clf.class_index(1) == 1
    assert clf.class_index(np.int64(0)) == 0
    assert clf.class_index(torch.tensor(2)) == 2
    for bad in ["blue", 3, -1, 1.0, True]:
        with pytest.raises(ValueError, match="none"):  # the message lists the accepted names
            clf.class_index(bad)


def test_forward_is_the_linear_head_of_the_nearest_timestep():
    clf = tiny_classifier(seed=3)
    with torch.no_grad():
        clf.bias.normal_()
    h = torch.randn(5, *H_SHAPE)
    t = 333.3
    index = clf.head_index(t)
    expected = h.flatten(1) @ clf.weight[index].T + clf.bias[index]
    torch.testing.assert_close(clf(h, t), expected)
    assert clf(h.half(), t).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B, 64, 4, 4\]"):
        clf(torch.randn(2, 64, 8, 8), t)


def test_forward_gradient_reaches_h_and_parameters():
    clf = tiny_classifier().train()
    h = torch.randn(3, *H_SHAPE, requires_grad=True)
    clf(h, 999).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert clf.weight.grad[clf.head_index(999)].abs().sum() > 0


def test_save_and_load_roundtrip_safetensors(tmp_path):
    clf = tiny_classifier(class_names=("none", "black", "red"), attribute="hair", seed=1)
    clf.register_to_config(base_model="tests/tiny")
    clf.save_pretrained(tmp_path / "hair")
    files = sorted(os.listdir(tmp_path / "hair"))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]  # no temporary left behind
    config = json.loads((tmp_path / "hair" / "config.json").read_text())
    assert config["attribute"] == "hair" and config["class_names"] == ["none", "black", "red"]
    assert config["h_shape"] == H_SHAPE and config["timesteps"] == CLASSIFIER_TIMESTEPS
    assert config["base_model"] == "tests/tiny"
    loaded = HClassifier.from_pretrained(tmp_path / "hair")
    assert torch.equal(loaded.weight, clf.weight) and torch.equal(loaded.bias, clf.bias)
    assert loaded.head_index(512.0) == clf.head_index(512.0)


def test_save_overwrites_an_existing_directory(tmp_path):
    tiny_classifier(seed=1).save_pretrained(tmp_path)
    second = tiny_classifier(seed=2)
    second.save_pretrained(tmp_path)
    assert torch.equal(HClassifier.from_pretrained(tmp_path).weight, second.weight)


def test_pickle_file_is_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "classifier.pt"
    torch.save(tiny_classifier().state_dict(), path)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ValueError, match="Pickled checkpoints"):
        HClassifier.from_pretrained(path)


def test_directory_with_only_pickled_weights_is_refused(tmp_path, monkeypatch):
    clf = tiny_classifier()
    clf.save_pretrained(tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(clf.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be called"))
    with pytest.raises(OSError, match="safetensors"):
        HClassifier.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_safetensors"):
        HClassifier.from_pretrained(tmp_path, use_safetensors=False)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HClassifier.from_pretrained(tmp_path / "missing")


# --- guidance_loss ---------------------------------------------------------------------------------------------


def test_class_loss_is_the_cross_entropy_with_the_asked_class_handicapped_by_the_margin():
    logits = torch.randn(4, 3)
    targets = torch.tensor([0, 2, 1, 2])
    shifted = logits - GUIDANCE_MARGIN * torch.nn.functional.one_hot(targets, 3)
    expected = -torch.log_softmax(shifted, dim=1)[torch.arange(4), targets].sum()
    torch.testing.assert_close(guidance_loss(logits, targets, "classes"), expected)


def test_soft_losses_match_their_formulas():
    logits = torch.randn(6, 3)
    p_ref = torch.tensor([0.2, 0.3, 0.5])
    p_hat = torch.softmax(logits / 2.0, dim=1).mean(0)
    kl = (p_hat * (p_hat / p_ref).log()).sum()
    chi2 = ((p_hat - p_ref) ** 2 / p_ref).sum()
    torch.testing.assert_close(guidance_loss(logits, p_ref, "kl", temperature=2.0), 6 * 2.0 * kl)
    torch.testing.assert_close(guidance_loss(logits, p_ref, "chi2", temperature=2.0), 6 * 2.0 * chi2)
    # a one-hot target stays finite
    assert math.isfinite(guidance_loss(logits, torch.tensor([1.0, 0.0, 0.0]), "kl").item())


def test_soft_loss_gradient_per_row_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    row = torch.randn(1, 2)
    target = torch.tensor([0.7, 0.3])
    grads = [logit_directions(row.repeat(n, 1), target, "kl", 8.0)[0] for n in (2, 8)]
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1])


def test_logit_directions_rows_sum_to_zero():
    logits = torch.randn(5, 3)
    for targets, loss in ((torch.tensor([0, 1, 2, 0, 1]), "classes"), (torch.tensor([0.2, 0.3, 0.5]), "kl")):
        g = logit_directions(logits, targets, loss, 8.0)
        torch.testing.assert_close(g.sum(1), torch.zeros(5), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"loss": "l2"}, "loss"), ({"temperature": -1.0}, "temperature"), ({"targets": torch.tensor([0, 1])}, "row")],
)
def test_guidance_loss_bad_arguments(kwargs, word):
    args = {"targets": torch.tensor([0.5, 0.5]), "loss": "kl", **kwargs}
    if word == "row":
        args["loss"] = "classes"
    with pytest.raises(ValueError, match=word):
        guidance_loss(torch.randn(3, 2), **args)


# --- MidBlockHook ------------------------------------------------------------------------------------------------


def test_mid_block_hook_captures_replaces_and_is_removed(sd_pipe):
    unet = sd_pipe.unet
    sample = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        reference = unet(sample, 10, encoder_hidden_states=text).sample
        seen = []
        with MidBlockHook(unet, lambda h: seen.append(h.clone())):
            same = unet(sample, 10, encoder_hidden_states=text).sample
        assert len(seen) == 1 and seen[0].shape == (1, *H_SHAPE)
        torch.testing.assert_close(same, reference, rtol=0, atol=0)
        with MidBlockHook(unet, lambda h: h + 1.0):
            moved = unet(sample, 10, encoder_hidden_states=text).sample
        assert not torch.allclose(moved, reference)
        with pytest.raises(RuntimeError, match="boom"):
            with MidBlockHook(unet, lambda h: None):
                raise RuntimeError("boom")
    assert guidance_is_off(unet)


def test_mid_block_hook_rejects_a_wrong_replacement(sd_pipe):
    with torch.no_grad(), MidBlockHook(sd_pipe.unet, lambda h: h[:, :3]):
        with pytest.raises(ValueError, match="shape"):
            sd_pipe.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    assert guidance_is_off(sd_pipe.unet)


def test_save_with_push_to_hub_saves_then_uploads(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(HClassifier, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, kw)))
    tiny_classifier().save_pretrained(tmp_path / "skin", push_to_hub=True, repo_id="user/skin", private=True)
    assert pushed == [("user/skin", {"private": True})]
    assert (tmp_path / "skin" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ValueError, match="safe_serialization"):
        tiny_classifier().save_pretrained(tmp_path / "x", safe_serialization=False)
