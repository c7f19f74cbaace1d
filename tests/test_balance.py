"""Exact counts: largest remainder, the optimal assignment of images to classes, and BalanceState across calls."""

import itertools
import json

import pytest
import torch
from tiny_models import HRecorder, make_generator, tiny_classifier

from pipeline_balancing_act import BalanceState, assign_classes, largest_remainder


# --- largest remainder -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probabilities, total, expected",
    [
        ([0.5, 0.5], 3, [2, 1]),  # tie: the lower class index gets the extra one
        ([0.2, 0.4, 0.4], 5, [1, 2, 2]),
        ([0.3, 0.7], 8, [2, 6]),  # 2.4 / 5.6: the larger remainder (0.6) wins
        ([0.0, 1.0], 4, [0, 4]),
        ([1 / 3] * 3, 64, [22, 21, 21]),
        ([0.25, 0.75], 0, [0, 0]),
    ],
)
def test_largest_remainder_examples(probabilities, total, expected):
    assert largest_remainder(probabilities, total).tolist() == expected


def test_largest_remainder_sums_and_stays_within_one_of_the_exact_share():
    generator = make_generator(1)
    for _ in range(200):
        k = int(torch.randint(2, 7, (1,), generator=generator))
        p = torch.rand(k, generator=generator)
        p = p / p.sum()
        total = int(torch.randint(1, 300, (1,), generator=generator))
        counts = largest_remainder(p, total)
        assert int(counts.sum()) == total
        assert ((counts.double() - p.double() * total).abs() < 1).all()


def test_largest_remainder_rejects_bad_input():
    with pytest.raises(ValueError):
        largest_remainder([-0.1, 1.1], 4)
    with pytest.raises(ValueError):
        largest_remainder([0.0, 0.0], 4)


# --- the assignment ----------------------------------------------------------------------------------------------


def brute_force(cost: torch.Tensor, counts: list[int]) -> float:
    """The least total cost over every assignment of the rows with exactly `counts` per class."""
    n, k = cost.shape
    best = float("inf")
    for classes in itertools.product(range(k), repeat=n):
        if [classes.count(c) for c in range(k)] == counts:
            best = min(best, float(cost[torch.arange(n), torch.tensor(classes)].sum()))
    return best


def test_assignment_is_optimal_against_brute_force():
    generator = make_generator(0)
    for trial in range(120):
        n = int(torch.randint(1, 8, (1,), generator=generator))
        k = int(torch.randint(2, 4, (1,), generator=generator))
        cost = torch.randn(n, k, generator=generator) * 3
        if trial % 4 == 0:
            cost = cost.round()  # ties
        p = torch.rand(k, generator=generator)
        counts = largest_remainder(p / p.sum(), n).tolist()
        classes = assign_classes(cost, counts)
        assert torch.bincount(classes, minlength=k).tolist() == counts
        total = float(cost[torch.arange(n), classes].sum())
        assert total == pytest.approx(brute_force(cost, counts), abs=1e-9), (trial, cost, counts)


def test_images_already_of_their_class_stay_and_the_cheapest_change():
    # log-probabilities of 'dark': four images clearly light, two clearly dark, two undecided
    p_dark = torch.tensor([0.01, 0.02, 0.03, 0.05, 0.99, 0.98, 0.45, 0.40])
    cost = -torch.stack([(1 - p_dark).log(), p_dark.log()], 1)
    classes = assign_classes(cost, [3, 5])
    assert classes.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # the dark ones stay; the two undecided and the least light go


def test_assignment_at_a_few_hundred_images_keeps_the_counts():
    cost = torch.randn(300, 6, generator=make_generator(3), dtype=torch.float64)
    counts = largest_remainder(torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1]), 300)
    classes = assign_classes(cost, counts)
    assert torch.equal(torch.bincount(classes, minlength=6), counts)
    # optimal means no single swap of two images between classes lowers the cost
    chosen = cost[torch.arange(300), classes]
    swap_gain = chosen[:, None] + chosen[None, :] - cost[:, classes].T - cost[:, classes]
    assert float(swap_gain.max()) <= 1e-9


@pytest.mark.parametrize("counts", [[1, 2], [-1, 3], [1, 1, 0]])
def test_assignment_rejects_counts_that_do_not_fit(counts):
    with pytest.raises(ValueError, match="counts"):
        assign_classes(torch.zeros(2, 2), counts)


# --- BalanceState --------------------------------------------------------------------------------------------------

GROUPS = [{"attributes": ["skin"], "class_names": [["light", "dark"]]}]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_state_brings_a_long_job_to_the_target_counts_at_every_point(batch_size):
    target = torch.tensor([0.3, 0.7])
    state = BalanceState()
    for _ in range(0, 512, batch_size):
        counts = state.batch_counts(GROUPS, [target], batch_size)[0]
        assert int(counts.sum()) == batch_size
        state.update(GROUPS, [torch.repeat_interleave(torch.arange(2), counts)])
        # the counts never drift: within one image of the exact share after every batch
        assert ((state.counts[0].double() - target.double() * state.num_images).abs() <= 1).all()
    assert state.counts[0].tolist() == largest_remainder(target, state.num_images).tolist()


def test_state_makes_up_for_images_that_came_out_as_another_class():
    target = torch.tensor([0.5, 0.5])
    state = BalanceState()
    state.update(GROUPS, [torch.tensor([0, 0, 0, 0])])  # a batch asked 2/2 came out all light
    assert state.batch_counts(GROUPS, [target], 4)[0].tolist() == [0, 4]
    assert state.batch_counts(GROUPS, [target], 2)[0].tolist() == [0, 2]


def test_state_saves_and_loads_json(tmp_path):
    state = BalanceState()
    state.update(GROUPS, [torch.tensor([0, 1, 1])])
    path = tmp_path / "state.json"
    state.save(path)
    assert json.loads(path.read_text())["counts"] == [[1, 2]]
    loaded = BalanceState.load(path)
    assert loaded.groups == GROUPS and loaded.counts[0].tolist() == [1, 2]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_state_refuses_other_classifiers_and_bad_files():
    state = BalanceState()
    state.update(GROUPS, [torch.tensor([0])])
    with pytest.raises(ValueError, match="balance_state"):
        state.batch_counts([{"attributes": ["hair"], "class_names": [["none", "red"]]}], [torch.tensor([0.5, 0.5])], 2)
    with pytest.raises(ValueError, match="BalanceState"):
        BalanceState.from_dict({"counts": [[1]]})


def test_the_pipeline_counts_each_images_final_reading_into_the_state(ba_pipe):
    clf = tiny_classifier(scale=0.3)
    state = BalanceState()
    final_readings = []
    for call in range(4):
        with HRecorder(ba_pipe.unet) as rec:
            ba_pipe(
                "a photo of a face",
                num_inference_steps=3,
                num_images_per_prompt=1,
                generator=make_generator(call),
                output_type="latent",
                h_classifier=clf,
                guidance_mode="distribution",
                target_distribution=[0.5, 0.5],
                balance_state=state,
            )
        last = rec.before[-1][1:]  # the conditional row at the last step, before its move
        final_readings.append(int(clf.calibrated_logits(last, rec.timesteps[-1]).argmax()))
    assert state.num_images == 4
    assert state.counts[0].tolist() == torch.bincount(torch.tensor(final_readings), minlength=2).tolist()


def test_balance_state_needs_the_assign_solver(ba_pipe):
    with pytest.raises(ValueError, match="balance_state"):
        ba_pipe(
            "a face",
            num_inference_steps=2,
            num_images_per_prompt=2,
            h_classifier=tiny_classifier(),
            guidance_mode="distribution",
            target_distribution=[0.5, 0.5],
            distribution_solver="kl",
            balance_state=BalanceState(),
        )
