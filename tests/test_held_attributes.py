"""Held attributes: a classifier whose target is "hold" is read, not guided, and every guided move of h loses the
components that classifier reads, so its reading of the moved h is the reading of the h before the move."""

import numpy as np
import pytest
import torch
from tiny_models import HRecorder, make_generator, tiny_classifier

from pipeline_balancing_act import HOLD, BalanceState


PROMPT = "a photo of a face"
HAIR = ("none", "black", "red")
STEPS = 3


def run(pipe, recorder_unet=None, **kwargs):
    args = {"num_inference_steps": STEPS, "num_images_per_prompt": 4, "output_type": "np"}
    kwargs = {"generator": make_generator(0), "guidance_scale": 1.0, **args, **kwargs}
    if recorder_unet is None:
        return pipe(PROMPT, **kwargs).images, None
    with HRecorder(recorder_unet) as recorder:
        images = pipe(PROMPT, **kwargs).images
    return images, recorder


def reading_change(classifier, recorder) -> torch.Tensor:
    """Per UNet call, how the move changed the classifier's calibrated logit differences (class k minus class 0)."""
    changes = []
    for before, after, t in zip(recorder.before, recorder.after, recorder.timesteps):
        z_before, z_after = classifier.calibrated_logits(before, t), classifier.calibrated_logits(after, t)
        change = z_after - z_before
        changes.append(change - change[:, :1])
    return torch.stack(changes)


def pushed_by(guided, seed: int = 7, attribute: str = "glasses", class_names=("without", "with")):
    """A classifier that reads exactly the directions the guided classifier moves h along (its class weights are the
    guided classifier's anchors): guiding the one drags the other, in closed form."""
    held = tiny_classifier(class_names=class_names, attribute=attribute, seed=seed)
    with torch.no_grad():
        held.weight.copy_(guided.anchors[:, : len(class_names)] * 10.0)
    return held


def test_the_move_has_no_component_along_a_held_classifiers_directions(ba_pipe):
    skin = tiny_classifier(scale=0.3)
    glasses = tiny_classifier(class_names=("without", "with"), attribute="glasses", seed=5, scale=0.3)
    hair = tiny_classifier(class_names=HAIR, attribute="hair", seed=6, scale=0.3)
    guided = {"h_classifier": [skin, glasses, hair], "guidance_mode": "distribution"}
    _, free = run(ba_pipe, ba_pipe.unet, **guided, target_distribution=[[0.25, 0.75], [0.5, 0.5], [1 / 3] * 3])
    _, held = run(ba_pipe, ba_pipe.unet, **guided, target_distribution=[[0.25, 0.75], HOLD, HOLD])
    for classifier in (glasses, hair):
        assert reading_change(classifier, free).abs().max() > 1e-2  # guided, it moves
        # zero up to float32 rounding of the logits (the guided change above is a thousand times larger)
        torch.testing.assert_close(
            reading_change(classifier, held), torch.zeros_like(reading_change(classifier, held)), atol=1e-4, rtol=0
        )
    moves = torch.stack([(a - b).norm() for a, b in zip(held.after, held.before)])
    assert (moves > 1e-2).all()  # skin is still guided at every step


def test_a_held_class_is_kept_where_the_guided_move_would_flip_it(ba_pipe):
    skin = tiny_classifier(scale=0.3)
    glasses = pushed_by(skin)
    kwargs = {"h_classifier": [skin, glasses], "guidance_mode": "sample", "guidance_strength": 20.0}
    _, free = run(ba_pipe, ba_pipe.unet, **kwargs, target_classes=["dark", "with"])
    _, held = run(ba_pipe, ba_pipe.unet, **kwargs, target_classes=["dark", HOLD])
    skin_only, _ = run(ba_pipe, **{**kwargs, "h_classifier": skin, "target_classes": "dark"})

    def classes(recorder, which):
        return [
            glasses.calibrated_logits(h, t).argmax(1) for h, t in zip(getattr(recorder, which), recorder.timesteps)
        ]

    flipped = sum(int((a != b).sum()) for a, b in zip(classes(free, "before"), classes(free, "after")))
    assert flipped > 0  # the setting is one where guidance drags the other attribute along
    for before, after in zip(classes(held, "before"), classes(held, "after")):
        assert torch.equal(before, after)
    # holding changed the guided move (the held directions are those it moved along)
    held_images, _ = run(ba_pipe, **kwargs, target_classes=["dark", HOLD])
    assert np.abs(held_images - skin_only).max() > 1e-4


def test_holding_a_classifier_the_move_does_not_reach_changes_nothing(ba_pipe):
    skin = tiny_classifier(scale=0.3)
    glasses = tiny_classifier(class_names=("without", "with"), attribute="glasses", seed=5, scale=0.3)
    with torch.no_grad():  # the glasses directions orthogonal to the skin anchors of the same head
        for head in range(skin.anchors.shape[0]):
            basis, _ = torch.linalg.qr(skin.anchors[head].T)
            w = glasses.weight[head]
            glasses.weight[head] = w - (w @ basis) @ basis.T
    alone, _ = run(ba_pipe, h_classifier=skin, guidance_mode="distribution", target_distribution=[0.25, 0.75])
    with_hold, _ = run(
        ba_pipe, h_classifier=[skin, glasses], guidance_mode="distribution", target_distribution=[[0.25, 0.75], HOLD]
    )
    np.testing.assert_allclose(with_hold, alone, atol=1e-5)


def test_held_classifiers_are_not_counted_by_a_balance_state(ba_pipe):
    skin = tiny_classifier(scale=0.3)
    hair = tiny_classifier(class_names=HAIR, attribute="hair", seed=6, scale=0.3)
    state = BalanceState()
    run(
        ba_pipe,
        h_classifier=[hair, skin],
        guidance_mode="distribution",
        target_distribution=[HOLD, [0.5, 0.5]],
        balance_state=state,
    )
    assert state.num_images == 4
    assert [g["attributes"] for g in state.to_dict()["groups"]] == [["skin"]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"h_classifier": "skin", "target_distribution": HOLD}, "holds every classifier"),
        ({"h_classifier": ["skin", "skin"], "target_distribution": [HOLD, HOLD]}, "holds every classifier"),
        (
            {"h_classifier": ["skin", "skin"], "guidance_mode": "sample", "target_classes": [HOLD, HOLD]},
            "`target_classes` holds every classifier",
        ),
    ],
)
def test_holding_every_classifier_is_refused(ba_pipe, kwargs, match):
    skin = tiny_classifier()
    kwargs = {"guidance_mode": "distribution", **kwargs}
    kwargs["h_classifier"] = [skin] * len(kwargs["h_classifier"]) if isinstance(kwargs["h_classifier"], list) else skin
    with pytest.raises(ValueError, match=match):
        run(ba_pipe, **kwargs)
