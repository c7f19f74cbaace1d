"""A non-finite h (NaN or inf, what a float16 overflow gives) never hangs a call or spreads: the call finishes, the
images whose h is not finite are left unguided, the others keep exact counts among themselves, and one warning says
how many images were not finite at which steps. Every test runs its call under a timeout of its own."""

import contextvars
import logging
import threading

import numpy as np
import pytest
import torch
from tiny_models import HRecorder, make_generator, tiny_classifier

import pipeline_balancing_act as pba
from pipeline_balancing_act import BalanceState, MidBlockHook, apportion, assign_classes


PROMPT = "a photo of a face"
HAIR = ("none", "black", "red")
IMAGES, BROKEN, STEPS = 6, 1, 3
TIMEOUT_S = 60  # a call that has not returned by then is taken to hang


def within_timeout(fn, *args, **kwargs):
    """Run `fn` in a thread, in a copy of this context (the h functions active here stay active there); fail the test
    if it has not returned within `TIMEOUT_S` (a hang), re-raise its error."""
    result, context = {}, contextvars.copy_context()

    def target():
        try:
            result["value"] = context.run(fn, *args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"the call did not return within {TIMEOUT_S} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def poison(value: float):
    """An h function that sets image `BROKEN`'s rows of h (both classifier-free guidance branches) to `value`."""

    def fn(h):
        h = h.clone()
        h[BROKEN] = value
        h[IMAGES + BROKEN] = value
        return h

    return fn


@pytest.fixture
def assignments(monkeypatch):
    """Every assignment a guided call solves, in order."""
    seen = []
    solve = pba._assign_checked

    def recording(cost, counts, device_counts):
        seen.append((solve(cost, counts, device_counts), list(counts)))
        return seen[-1][0]

    monkeypatch.setattr(pba, "_assign_checked", recording)
    return seen


def guided_call(pipe, value, caplog, **kwargs):
    caplog.set_level(logging.WARNING, logger="pipeline_balancing_act")
    with MidBlockHook(pipe.unet, poison(value)), HRecorder(pipe.unet) as recorder:
        images = within_timeout(
            pipe,
            PROMPT,
            num_inference_steps=STEPS,
            num_images_per_prompt=IMAGES,
            output_type="np",
            generator=make_generator(0),
            guidance_scale=7.5,
            **kwargs,
        ).images
    warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    return images, recorder, warnings


def check_left_unguided(recorder, warnings):
    assert len(recorder.before) == len(recorder.after) == STEPS
    others = [i for i in range(IMAGES) if i != BROKEN]
    for before, after in zip(recorder.before, recorder.after):
        conditional = slice(IMAGES, 2 * IMAGES)
        assert torch.isfinite(after[conditional][others]).all()  # nothing spread to the other images
        assert not torch.isfinite(after[IMAGES + BROKEN]).all()  # the broken image stays as it was: unguided
    moves = [(a[IMAGES:][others] - b[IMAGES:][others]).norm() for a, b in zip(recorder.after, recorder.before)]
    assert all(m > 1e-3 for m in moves)  # the others are guided at every step
    assert len(warnings) == 1, warnings
    assert f"for up to 1 of {IMAGES} images at {STEPS} of {STEPS} steps (first: step 0, 1 images)" in warnings[0]


TWO = {"h_classifier": tiny_classifier(scale=0.3)}
THREE = {"h_classifier": tiny_classifier(class_names=HAIR, attribute="hair", scale=0.3)}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize(
    "classifier, target",
    [(TWO, [0.5, 0.5]), (THREE, [0.2, 0.4, 0.4])],
    ids=["K2", "K3"],
)
def test_the_default_solver_leaves_the_broken_image_out_and_keeps_exact_counts(
    ba_pipe, assignments, caplog, value, classifier, target
):
    _, recorder, warnings = guided_call(
        ba_pipe, value, caplog, **classifier, guidance_mode="distribution", target_distribution=target
    )
    check_left_unguided(recorder, warnings)
    assert len(assignments) == STEPS
    for assigned, counts in assignments:
        assert assigned[BROKEN] == -1
        others = torch.cat([assigned[:BROKEN], assigned[BROKEN + 1 :]])
        wanted = apportion(torch.tensor(counts), torch.tensor(IMAGES - 1))
        assert torch.bincount(others, minlength=len(counts)).tolist() == wanted.tolist()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_joint_target_leaves_the_broken_image_out_and_keeps_exact_counts(ba_pipe, assignments, caplog, value):
    classifiers = [tiny_classifier(scale=0.3), tiny_classifier(class_names=HAIR, attribute="hair", seed=3, scale=0.3)]
    table = [[0.2, 0.1, 0.2], [0.1, 0.2, 0.2]]
    _, recorder, warnings = guided_call(
        ba_pipe, value, caplog, h_classifier=classifiers, guidance_mode="distribution", target_distribution=table
    )
    check_left_unguided(recorder, warnings)
    for assigned, counts in assignments:
        others = torch.cat([assigned[:BROKEN], assigned[BROKEN + 1 :]])
        assert assigned[BROKEN] == -1 and (others >= 0).all()
        assert (
            torch.bincount(others, minlength=6).tolist() == apportion(torch.tensor(counts), torch.tensor(5)).tolist()
        )


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("solver", ["kl", "chi2"])
@pytest.mark.parametrize("classifier, target", [(TWO, [0.5, 0.5]), (THREE, [0.2, 0.4, 0.4])], ids=["K2", "K3"])
def test_the_soft_solvers_average_over_the_finite_images_only(ba_pipe, caplog, value, solver, classifier, target):
    _, recorder, warnings = guided_call(
        ba_pipe,
        value,
        caplog,
        **classifier,
        guidance_mode="distribution",
        target_distribution=target,
        distribution_solver=solver,
    )
    check_left_unguided(recorder, warnings)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("classifier, classes", [(TWO, "dark"), (THREE, [0, 1, 2, 0, 1, 2])], ids=["K2", "K3"])
def test_sample_mode_leaves_the_broken_image_unguided(ba_pipe, caplog, value, classifier, classes):
    _, recorder, warnings = guided_call(
        ba_pipe, value, caplog, **classifier, guidance_mode="sample", target_classes=classes
    )
    check_left_unguided(recorder, warnings)


def test_a_balance_state_does_not_count_an_image_whose_h_was_not_finite(ba_pipe, caplog):
    state = BalanceState()
    guided_call(ba_pipe, float("nan"), caplog, **TWO, guidance_mode="distribution", balance_state=state,
                target_distribution=[0.5, 0.5])  # fmt: skip
    assert state.num_images == IMAGES - 1


def test_a_finite_call_warns_nothing(ba_pipe, caplog):
    caplog.set_level(logging.WARNING, logger="pipeline_balancing_act")
    ba_pipe(PROMPT, num_inference_steps=2, num_images_per_prompt=4, output_type="np", **TWO,
            guidance_mode="distribution", target_distribution=[0.5, 0.5])  # fmt: skip
    assert not [r for r in caplog.records if "not finite" in r.getMessage()]


# --- the solver itself ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_assign_classes_leaves_non_finite_rows_out(value, num_classes):
    cost = torch.rand(6, num_classes, generator=torch.Generator().manual_seed(0))
    cost[2, 1] = value
    counts = [6 // num_classes] * num_classes
    assigned = within_timeout(assign_classes, cost, counts)
    assert assigned[2] == -1
    others = torch.cat([assigned[:2], assigned[3:]])
    wanted = apportion(torch.tensor(counts), torch.tensor(5))
    assert torch.bincount(others, minlength=num_classes).tolist() == wanted.tolist()
    assert sum(wanted.tolist()) == 5


def test_assign_classes_with_every_row_non_finite_assigns_none():
    assert within_timeout(assign_classes, torch.full((4, 3), float("nan")), [2, 1, 1]).tolist() == [-1] * 4
    assert within_timeout(assign_classes, torch.full((4, 2), float("nan")), [2, 2]).tolist() == [-1] * 4


def test_the_host_solver_stops_after_a_bounded_number_of_repairs():
    # counts that cannot be met (they sum to less than the rows): the repair loop must give up, not spin
    cost = np.random.default_rng(0).random((6, 3))
    with pytest.raises(RuntimeError, match="did not reach the class counts"):
        within_timeout(pba._transport_on_host, cost, np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="finite"):
        within_timeout(pba._transport_on_host, np.full((6, 3), np.nan), np.array([2, 2, 2]))


@pytest.mark.parametrize(
    "counts, total, expected",
    [([2, 2, 2], 5, [2, 2, 1]), ([1, 3], 4, [1, 3]), ([1, 3], 2, [1, 1]), ([3, 0, 3], 0, [0, 0, 0])],
)
def test_apportion_rescales_counts_exactly(counts, total, expected):
    assert apportion(torch.tensor(counts), torch.tensor(total)).tolist() == expected
