"""BalancingActPipeline: parity with StableDiffusionPipeline and the exact h update of each guidance mode and solver."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import H_SHAPE, HRecorder, make_generator, tiny_classifier

import pipeline_balancing_act as pba
from pipeline_balancing_act import BalanceState, BalancingActPipeline, HClassifier


PROMPT = "a photo of a face"
SCALE = 8.0  # raw logit of class 1 = SCALE * (u . h)
CAL_SCALE, CAL_BIAS = 0.5, 0.3  # calibrated logits = raw * 0.5 + [0, 0.3]
GAP = 2.0  # anchors: light at 0, dark at GAP * u
MARGIN = pba.GUIDANCE_MARGIN
DIM = int(np.prod(H_SHAPE))


def known_classifier(anchors: bool = True, seed: int = 7, attribute: str = "skin") -> tuple[HClassifier, torch.Tensor]:
    """K = 2, every head: raw logits [0, SCALE * u.h] for a fixed unit vector u, calibrated by a known scale and
    offset, with anchors 0 (class 0) and GAP * u (class 1): every quantity of the update is known in closed form."""
    u = torch.randn(DIM, generator=make_generator(seed))
    u = u / u.norm()
    timesteps = [999, 500, 1]
    names = ["light", "dark"] if attribute == "skin" else ["without", "with"]
    clf = HClassifier(attribute=attribute, class_names=names, h_shape=H_SHAPE, timesteps=timesteps)
    with torch.no_grad():
        clf.weight.zero_()
        clf.weight[:, 1, :] = SCALE * u
        clf.bias.zero_()
    clf.set_calibration([CAL_SCALE] * 3, [[0.0, CAL_BIAS]] * 3)
    if anchors:
        clf.set_anchors(torch.stack([torch.zeros(3, DIM), GAP * u.repeat(3, 1)], dim=1), "test")
    return clf.eval(), u


def margin_dark(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Calibrated logit of dark minus light."""
    return CAL_SCALE * SCALE * (h.flatten(1).float() @ u) + CAL_BIAS


def pull(h: torch.Tensor, u: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """g_i[dark] of the class loss, for each image asked to be `classes[i]` (1 = dark): the fraction of the class gap
    image i moves towards dark (negative: towards light)."""
    m = margin_dark(h, u)
    towards_dark = 1 - torch.sigmoid(m - MARGIN)  # e_dark - softmax(z - margin e_dark), dark entry
    towards_light = -(1 - torch.sigmoid(-m - MARGIN))  # e_light - softmax(z - margin e_light), dark entry
    return torch.where(classes == 1, towards_dark, towards_light)


def expected_move(h: torch.Tensor, u: torch.Tensor, classes: torch.Tensor, strength: float, w: float = 1.0):
    coefficient = strength / w * GAP * pull(h, u, classes)
    return h + coefficient[:, None, None, None] * u.view(1, *H_SHAPE)


def run(pipe, **kwargs):
    args = {"num_inference_steps": 3, "generator": make_generator(0), "output_type": "np", **kwargs}
    return pipe(PROMPT, **args).images


# --- parity and the signature ------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_bit_for_bit_parity_without_guidance(sd_pipe, ba_pipe, output_type):
    kwargs = {"num_inference_steps": 4, "num_images_per_prompt": 2, "output_type": output_type}
    reference = sd_pipe(PROMPT, generator=make_generator(3), **kwargs).images
    plain = ba_pipe(PROMPT, generator=make_generator(3), **kwargs).images
    assert np.array_equal(np.asarray(plain), np.asarray(reference))


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"h_classifier": "c"}, "`h_classifier`"),
        ({"target_distribution": [0.5, 0.5]}, "`target_distribution`"),
        ({"h_classifier": "c", "target_classes": 1}, "`h_classifier`, `target_classes`"),
        ({"balance_state": BalanceState()}, "`balance_state`"),
    ],
)
def test_guidance_arguments_without_a_mode_are_an_error(ba_pipe, kwargs, names):
    with pytest.raises(ValueError, match=f"{names} given without `guidance_mode`"):
        run(ba_pipe, num_images_per_prompt=2, **kwargs)


def test_a_mode_without_classifier_is_an_error(ba_pipe):
    with pytest.raises(ValueError, match="needs `h_classifier`"):
        run(ba_pipe, num_images_per_prompt=2, guidance_mode="distribution", target_distribution=[0.5, 0.5])


def test_call_signature_extends_stable_diffusion(ba_pipe):
    ours = list(inspect.signature(BalancingActPipeline.__call__).parameters.values())
    base = list(inspect.signature(StableDiffusionPipeline.__call__).parameters.values())
    assert [(p.name, p.kind) for p in ours[: len(base) - 1]] == [(p.name, p.kind) for p in base[:-1]]
    for p, q in zip(ours, base[:-1]):
        assert p.default == q.default, p.name
    assert ours[-1].kind == inspect.Parameter.VAR_KEYWORD and base[-1].kind == inspect.Parameter.VAR_KEYWORD
    added = [p.name for p in ours[len(base) - 1 : -1]]
    assert added == [
        "h_classifier",
        "guidance_mode",
        "target_distribution",
        "target_classes",
        "guidance_strength",
        "guidance_steps",
        "distribution_solver",
        "classifier_temperature",
        "guided_branches",
        "balance_state",
        "global_batch",
    ]
    assert BalancingActPipeline._callback_tensor_inputs == StableDiffusionPipeline._callback_tensor_inputs


def test_unknown_keyword_is_a_type_error(ba_pipe):
    with pytest.raises(TypeError, match="guidance_strenght"):
        run(ba_pipe, guidance_strenght=3.0)


# --- the exact update of h ---------------------------------------------------------------------------------------


def test_sample_mode_moves_h_by_the_class_gap_times_the_non_saturating_pull(ba_pipe, sd_pipe):
    clf, u = known_classifier()
    strength = 3.0
    with HRecorder(ba_pipe.unet) as rec:
        guided = run(
            ba_pipe,
            guidance_scale=1.0,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=["dark", "light"],
            guidance_strength=strength,
        )
    assert len(rec.before) == len(rec.after) == 3
    classes = torch.tensor([1, 0])
    for before, after in zip(rec.before, rec.after):
        torch.testing.assert_close(after, expected_move(before, u, classes, strength), rtol=1e-4, atol=1e-5)
        assert margin_dark(after, u)[0] > margin_dark(before, u)[0]
        assert margin_dark(after, u)[1] < margin_dark(before, u)[1]
    assert not np.allclose(guided, run(sd_pipe, guidance_scale=1.0, num_images_per_prompt=2))


def test_the_pull_does_not_saturate_for_an_image_surely_of_the_other_class():
    logits = torch.tensor([[30.0, 0.0]])  # surely light
    g = pba.logit_directions(logits, torch.tensor([1]), "classes", 1.0)
    torch.testing.assert_close(g, torch.tensor([[-1.0, 1.0]]))  # the whole gap; the paper's -p[c] gives ~e^-30
    # and it fades once the asked class leads by more than the margin
    done = pba.logit_directions(torch.tensor([[0.0, MARGIN + 12.0]]), torch.tensor([1]), "classes", 1.0)
    assert done.abs().max() < 1e-4


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0, 7.5, 12.0])
def test_the_step_unit_does_not_change_with_the_guidance_scale(ba_pipe, guidance_scale):
    """A conditional-only move is divided by w: w * (h' - h) is the same function of h at every CFG scale."""
    clf, u = known_classifier()
    n = 2
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            guidance_scale=guidance_scale,
            num_images_per_prompt=n,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes="dark",
        )
    cfg = guidance_scale > 1
    for before, after in zip(rec.before, rec.after):
        assert before.shape[0] == (2 * n if cfg else n)
        cond_before, cond_after = (before[n:], after[n:]) if cfg else (before, after)
        if cfg:
            assert torch.equal(after[:n], before[:n])  # the unconditional branch stays as it is
        output_move = guidance_scale * (cond_after - cond_before) if cfg else cond_after - cond_before
        reference = expected_move(cond_before, u, torch.ones(n, dtype=torch.long), pba.DEFAULT_GUIDANCE_STRENGTH)
        torch.testing.assert_close(output_move, reference - cond_before, rtol=1e-4, atol=1e-5)


def test_both_branches_move_by_the_same_undivided_step(ba_pipe):
    clf, u = known_classifier()
    n, strength = 2, 1.5
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            guidance_scale=7.5,
            num_images_per_prompt=n,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=["light", 1],
            guidance_strength=strength,
            guided_branches="both",
        )
    for before, after in zip(rec.before, rec.after):
        move = expected_move(before[n:], u, torch.tensor([0, 1]), strength) - before[n:]  # read on the cond rows
        torch.testing.assert_close(after, before + torch.cat([move, move]), rtol=1e-4, atol=1e-5)


def test_distribution_mode_assigns_exact_counts_to_the_cheapest_images(ba_pipe):
    """Target 1/4 light, 3/4 dark of 4 images: the image that reads least dark is assigned light, the others dark,
    and each moves by the class update towards its assigned class."""
    clf, u = known_classifier()
    strength = 2.0
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            num_inference_steps=1,
            guidance_scale=1.0,
            num_images_per_prompt=4,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=[0.25, 0.75],
            guidance_strength=strength,
        )
    before, after = rec.before[0], rec.after[0]
    classes = torch.ones(4, dtype=torch.long)
    classes[margin_dark(before, u).argmin()] = 0
    torch.testing.assert_close(after, expected_move(before, u, classes, strength), rtol=1e-4, atol=1e-5)


def test_distribution_step_per_image_does_not_depend_on_batch_size(ba_pipe):
    """Identical images asked 1/2 dark: the step of a dark-assigned image is the same in a batch of 2 and of 6."""
    clf, _ = known_classifier()
    latent = torch.randn(1, 4, 8, 8, generator=make_generator(5))
    steps = {}
    for n in (2, 6):
        with HRecorder(ba_pipe.unet) as rec:
            ba_pipe(
                PROMPT,
                num_inference_steps=1,
                guidance_scale=1.0,
                num_images_per_prompt=n,
                latents=latent.repeat(n, 1, 1, 1),
                output_type="latent",
                h_classifier=clf,
                guidance_mode="distribution",
                target_distribution=[0.5, 0.5],
            )
        moves = (rec.after[0] - rec.before[0]).flatten(1)
        steps[n] = moves[moves.sum(1).argmax()]
    assert steps[2].norm() > 0.01
    torch.testing.assert_close(steps[2], steps[6], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("solver", ["kl", "chi2"])
def test_soft_solvers_move_by_the_papers_loss_gradient(ba_pipe, solver):
    clf, u = known_classifier()
    target, strength, temperature, n = [0.2, 0.8], 2.0, 4.0, 3
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            guidance_scale=1.0,
            num_images_per_prompt=n,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=target,
            guidance_strength=strength,
            distribution_solver=solver,
            classifier_temperature=temperature,
        )
    ref = torch.tensor(target)
    for before, after in zip(rec.before, rec.after):
        raw = torch.stack([torch.zeros(n), SCALE * (before.flatten(1) @ u)], 1).requires_grad_(True)
        p_hat = torch.softmax(raw / temperature, 1).mean(0)
        divergence = (p_hat * (p_hat / ref).log()).sum() if solver == "kl" else ((p_hat - ref) ** 2 / ref).sum()
        (grad,) = torch.autograd.grad(n * temperature * divergence, raw)
        g_dark = -grad[:, 1]  # the light anchor is at 0: only the dark entry of g moves h
        expected = before + (strength * GAP * g_dark)[:, None, None, None] * u.view(1, *H_SHAPE)
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_a_class_name_target_behaves_like_sample_mode_with_every_solver(ba_pipe):
    clf, _ = known_classifier()
    moves = {}
    for label, kwargs in (
        ("sample", {"guidance_mode": "sample", "target_classes": "dark"}),
        ("assign", {"guidance_mode": "distribution", "target_distribution": "dark"}),
        ("kl", {"guidance_mode": "distribution", "target_distribution": "dark", "distribution_solver": "kl"}),
        ("one-hot", {"guidance_mode": "distribution", "target_distribution": [0, 1], "distribution_solver": "chi2"}),
    ):
        with HRecorder(ba_pipe.unet) as rec:
            run(ba_pipe, guidance_scale=1.0, num_images_per_prompt=2, h_classifier=clf, **kwargs)
        moves[label] = torch.stack(rec.after) - torch.stack(rec.before)
    for label in ("assign", "kl", "one-hot"):
        torch.testing.assert_close(moves[label], moves["sample"], rtol=1e-4, atol=1e-6)


def test_joint_target_assigns_cells_and_moves_each_classifier_to_its_part_of_the_cell(ba_pipe):
    """skin x glasses with only the diagonal cells asked: each image is pushed the same way on both axes, and exactly
    half of the images towards (dark, with)."""
    skin, u = known_classifier()
    glasses, v = known_classifier(seed=8, attribute="glasses")
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            num_inference_steps=2,
            guidance_scale=1.0,
            num_images_per_prompt=4,
            h_classifier=[skin, glasses],
            guidance_mode="distribution",
            target_distribution=[[0.5, 0.0], [0.0, 0.5]],
        )
    basis = torch.linalg.pinv(torch.stack([u, v]))  # move = a u + b v (anchors lie along u and v)
    for before, after in zip(rec.before, rec.after):
        a, b = ((after - before).flatten(1) @ basis).T
        assert torch.equal(torch.sign(a), torch.sign(b)) and (a != 0).all()
        assert int((a > 0).sum()) == 2


def test_marginal_targets_for_several_classifiers_each_get_exact_counts(ba_pipe):
    """The counts of a marginal multi-classifier target: one count vector per classifier, from the largest remainder."""
    skin = tiny_classifier(seed=1)
    hair = tiny_classifier(class_names=("none", "black", "red"), attribute="hair", seed=2)
    settings = ba_pipe.prepare_guidance(
        pba.GuidanceArguments(
            h_classifier=[skin, hair],
            guidance_mode="distribution",
            target_distribution=[[0.5, 0.5], [0.2, 0.4, 0.4]],
            guidance_strength=1.0,
        )
    )
    run = pba._GuidanceRun(settings, unet_compiled=False)
    run.start(5, [999.0, 500.0, 1.0], False, 1.0, torch.device("cpu"), None, H_SHAPE)
    assert not settings.joint
    assert run.counts == [[3, 2], [1, 2, 2]]


def test_joint_table_is_told_apart_from_marginal_targets():
    skin = tiny_classifier(seed=1)
    glasses = tiny_classifier(attribute="glasses", class_names=("without", "with"), seed=2)
    assert BalancingActPipeline._joint_target([[0.5, 0.5], [0.5, 0.5]], [skin, glasses]) is None  # marginals
    table = BalancingActPipeline._joint_target([[0.1, 0.2], [0.3, 0.4]], [skin, glasses])
    assert table is not None and table.shape == (2, 2)


# --- steps, classifier handling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance_steps, guided",
    [
        ((0.0, 0.5), [0, 1, 2, 3, 4]),
        ((0.5, 1.0), [5, 6, 7, 8, 9]),
        ([1, 3, 9], [1, 3, 9]),
        ((0.0, 1.0), list(range(10))),
    ],
)
def test_guidance_steps_select_the_guided_steps(ba_pipe, guidance_steps, guided):
    clf, _ = known_classifier()
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            num_inference_steps=10,
            output_type="latent",
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=1,
            guidance_steps=guidance_steps,
        )
    moved = [i for i, (b, a) in enumerate(zip(rec.before, rec.after)) if not torch.equal(b, a)]
    assert moved == guided


@pytest.mark.parametrize("missing", ["anchors", "calibration"])
def test_a_classifier_without_calibration_or_anchors_is_refused_with_how_to_retrain_it(ba_pipe, tmp_path, missing):
    clf, _ = known_classifier(anchors=missing != "anchors")
    if missing == "calibration":
        clf.register_to_config(calibration_scale=None, calibration_bias=None)
    kwargs = {"num_images_per_prompt": 2, "guidance_mode": "sample", "target_classes": 1}
    with pytest.raises(ValueError, match=f"has no {missing} .*retrain it with `balancing-act train"):
        run(ba_pipe, h_classifier=clf, **kwargs)
    clf.save_pretrained(tmp_path / "old")
    with pytest.raises(ValueError, match=f"has no {missing} .*retrain it with `balancing-act train"):
        HClassifier.from_pretrained(tmp_path / "old")


def test_the_classifier_passed_in_is_not_moved_or_cast(ba_pipe, monkeypatch):
    clf, _ = known_classifier()
    calls = []
    monkeypatch.setattr(HClassifier, "to", lambda self, *a, **k: calls.append((a, k)) or self)
    run(ba_pipe, num_images_per_prompt=2, h_classifier=clf, guidance_mode="sample", target_classes=1)
    assert calls == []
    assert clf.weight.dtype == torch.float32


def test_heads_read_in_float32_under_an_outer_autocast(ba_pipe, monkeypatch):
    """Under a bfloat16 autocast the heads still compute in float32 (autocast would run the linear layer in bf16)."""
    clf, _ = known_classifier()
    dtypes = []
    directions = pba._GuidanceRun._directions

    def recording_directions(run, calibrated, raw, valid):
        dtypes.extend(t.dtype for t in calibrated + raw)
        return directions(run, calibrated, raw, valid)

    monkeypatch.setattr(pba._GuidanceRun, "_directions", recording_directions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(
            ba_pipe,
            num_inference_steps=2,
            guidance_scale=1.0,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes="dark",
        )
    assert dtypes and all(d == torch.float32 for d in dtypes)


def test_classifier_from_a_directory_is_loaded_once_and_again_when_it_changes(fresh_ba_pipe, tmp_path, monkeypatch):
    import os

    tiny_classifier().save_pretrained(tmp_path / "skin")
    calls = []
    original = HClassifier.from_pretrained.__func__

    def counting(cls, path, **kwargs):
        calls.append(path)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(HClassifier, "from_pretrained", classmethod(counting))
    kwargs = {"num_inference_steps": 1, "num_images_per_prompt": 2, "guidance_mode": "distribution"}
    for _ in range(2):
        run(fresh_ba_pipe, h_classifier=str(tmp_path / "skin"), target_distribution="dark", **kwargs)
    assert len(calls) == 1
    tiny_classifier(seed=9).save_pretrained(tmp_path / "skin")  # retrained in place
    weights = tmp_path / "skin" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 10))
    run(fresh_ba_pipe, h_classifier=str(tmp_path / "skin"), target_distribution="dark", **kwargs)
    assert len(calls) == 2


def test_a_callback_that_calls_the_unet_is_an_error(ba_pipe):
    clf, _ = known_classifier()

    def calls_the_unet(pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        embeds = torch.zeros(latents.shape[0], 4, pipe.unet.config.cross_attention_dim)
        pipe.unet(latents, timestep, encoder_hidden_states=embeds)
        return callback_kwargs

    with pytest.raises(RuntimeError, match="UNet ran 2 times in denoising step 0"):
        run(
            ba_pipe,
            guidance_scale=1.0,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=1,
            callback_on_step_end=calls_the_unet,
        )


def test_a_scheduler_on_another_timestep_scale_is_refused(fresh_ba_pipe):
    clf = tiny_classifier(timesteps=[1.0, 0.5, 0.0])  # heads keyed by a continuous time in [0, 1]
    with pytest.raises(ValueError, match="another timestep scale"):
        run(fresh_ba_pipe, num_images_per_prompt=2, h_classifier=clf, guidance_mode="sample", target_classes=0)
