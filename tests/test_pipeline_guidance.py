"""BalancingActPipeline: parity with StableDiffusionPipeline and the exact h update of each guidance mode."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_models import H_SHAPE, IMAGE_SIZE, HRecorder, make_generator, tiny_classifier

from pipeline_balancing_act import BalancingActPipeline, HClassifier, guidance_loss


PROMPT = "a photo of a face"
TEMPERATURE = 8.0
SCALE = 8.0  # logit of class 1 = SCALE * (u . h)


def known_classifier() -> tuple[HClassifier, torch.Tensor]:
    """K = 2, every head: logits = [0, SCALE * u.h] with a fixed unit vector u, so the gradient is known."""
    u = torch.randn(int(np.prod(H_SHAPE)), generator=make_generator(7))
    u = u / u.norm()
    clf = HClassifier(attribute="skin", class_names=["light", "dark"], h_shape=H_SHAPE, timesteps=[999, 500, 1])
    with torch.no_grad():
        clf.weight.zero_()
        clf.weight[:, 1, :] = SCALE * u
        clf.bias.zero_()
    return clf.eval(), u


def p_dark(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(SCALE * (h.flatten(1) @ u) / TEMPERATURE)


def run(pipe, **kwargs):
    args = {"num_inference_steps": 3, "generator": make_generator(0), "output_type": "np", **kwargs}
    return pipe(PROMPT, **args).images


# --- parity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_bit_for_bit_parity_without_guidance(sd_pipe, ba_pipe, classifier, output_type):
    kwargs = {"num_inference_steps": 4, "num_images_per_prompt": 2, "output_type": output_type}
    reference = sd_pipe(PROMPT, generator=make_generator(3), **kwargs).images
    plain = ba_pipe(PROMPT, generator=make_generator(3), **kwargs).images
    no_mode = ba_pipe(PROMPT, generator=make_generator(3), h_classifier=classifier, **kwargs).images
    assert np.array_equal(np.asarray(plain), np.asarray(reference))
    assert np.array_equal(np.asarray(no_mode), np.asarray(reference))


def test_parity_when_a_mode_is_given_without_classifier(sd_pipe, ba_pipe):
    reference = run(sd_pipe, num_images_per_prompt=2)
    images = run(ba_pipe, num_images_per_prompt=2, guidance_mode="distribution", target_distribution=[0.5, 0.5])
    assert np.array_equal(images, reference)


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
        "guidance_loss",
        "classifier_temperature",
        "guided_branches",
    ]
    assert BalancingActPipeline._callback_tensor_inputs == StableDiffusionPipeline._callback_tensor_inputs


def test_unknown_keyword_is_a_type_error(ba_pipe):
    with pytest.raises(TypeError, match="guidance_strenght"):
        run(ba_pipe, guidance_strenght=3.0)


# --- the exact update of h ---------------------------------------------------------------------------------------


def test_sample_mode_moves_h_by_the_known_gradient(ba_pipe, sd_pipe):
    clf, u = known_classifier()
    strength = 40.0
    with HRecorder(ba_pipe.unet) as rec:
        guided = run(
            ba_pipe,
            guidance_scale=1.0,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes="dark",
            guidance_strength=strength,
        )
    assert len(rec.before) == len(rec.after) == 3
    for before, after in zip(rec.before, rec.after):
        p = p_dark(before, u)
        # loss = -sum_i p_i(dark): h_i' = h_i + strength * p_i (1 - p_i) * SCALE / T * u
        expected = before + (strength * p * (1 - p) * SCALE / TEMPERATURE)[:, None, None, None] * u.view(1, *H_SHAPE)
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
        assert (p_dark(after, u) > p).all()
        assert (after - before).flatten(1).norm(dim=1).min() > 0.1
    assert not np.allclose(guided, run(sd_pipe, guidance_scale=1.0, num_images_per_prompt=2))


def distribution_step(before: torch.Tensor, u: torch.Tensor, target: list[float], strength: float) -> torch.Tensor:
    """The documented update for K = 2, KL: h_i' = h_i - strength * grad_{h_i}(N * KL(p_hat || p_ref))."""
    p = p_dark(before, u)
    p_hat = torch.stack([1 - p.mean(), p.mean()])
    ref = torch.tensor(target)
    # d(N * KL)/dp_i(dark) = log(p_hat_1 / r_1) - log(p_hat_0 / r_0) (the +1 terms cancel)
    coefficient = (p_hat[1] / ref[1]).log() - (p_hat[0] / ref[0]).log()
    grad = (coefficient * p * (1 - p) * SCALE / TEMPERATURE)[:, None, None, None] * u.view(1, *H_SHAPE)
    return before - strength * grad


@pytest.mark.parametrize("num_images", [2, 4])
def test_distribution_mode_moves_h_by_the_normalised_gradient(ba_pipe, num_images):
    clf, u = known_classifier()
    target, strength = [0.2, 0.8], 30.0
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            guidance_scale=1.0,
            num_images_per_prompt=num_images,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=target,
            guidance_strength=strength,
        )
    for before, after in zip(rec.before, rec.after):
        torch.testing.assert_close(after, distribution_step(before, u, target, strength), rtol=1e-4, atol=1e-4)
        # the batch fraction moves toward the target
        assert abs(p_dark(after, u).mean() - 0.8) < abs(p_dark(before, u).mean() - 0.8)


def test_distribution_step_per_image_does_not_depend_on_batch_size(ba_pipe):
    """Identical images: the per-image step must be the same for a batch of 2 and of 6."""
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
                target_distribution=[0.3, 0.7],
                guidance_strength=25.0,
            )
        steps[n] = (rec.after[0] - rec.before[0])[0]
    assert steps[2].norm() > 0.1
    torch.testing.assert_close(steps[2], steps[6], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("branches", ["cond", "both"])
def test_guided_branches_with_classifier_free_guidance(ba_pipe, branches):
    clf, u = known_classifier()
    target, strength, n = [0.2, 0.8], 30.0, 3
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            guidance_scale=7.5,
            num_images_per_prompt=n,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=target,
            guidance_strength=strength,
            guided_branches=branches,
        )
    for before, after in zip(rec.before, rec.after):
        assert before.shape[0] == 2 * n  # [uncond; cond]
        if branches == "cond":
            assert torch.equal(after[:n], before[:n])
            torch.testing.assert_close(
                after[n:], distribution_step(before[n:], u, target, strength), atol=1e-4, rtol=1e-4
            )
        else:
            torch.testing.assert_close(after, distribution_step(before, u, target, strength), atol=1e-4, rtol=1e-4)


def test_sample_mode_per_image_targets_and_both_branches(ba_pipe):
    clf, u = known_classifier()
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=["light", 1],
            guidance_strength=40.0,
            guided_branches="both",
        )
    for before, after in zip(rec.before, rec.after):
        change = ((after - before).flatten(1) @ u).tolist()
        # rows: [uncond image 0, uncond image 1, cond image 0, cond image 1]; image 0 -> light, image 1 -> dark
        assert change[0] < 0 and change[2] < 0 and change[1] > 0 and change[3] > 0


def test_temperature_argument_is_used(ba_pipe):
    clf, u = known_classifier()
    changes = []
    for temperature in (None, 2.0):
        with HRecorder(ba_pipe.unet) as rec:
            run(
                ba_pipe,
                num_inference_steps=1,
                guidance_scale=1.0,
                num_images_per_prompt=2,
                h_classifier=clf,
                guidance_mode="sample",
                target_classes=1,
                guidance_strength=10.0,
                classifier_temperature=temperature,
            )
        changes.append(rec.after[0] - rec.before[0])
    p = torch.sigmoid(SCALE * (rec.before[0].flatten(1) @ u) / 2.0)
    expected = (10.0 * p * (1 - p) * SCALE / 2.0)[:, None, None, None] * u.view(1, *H_SHAPE)
    torch.testing.assert_close(changes[1], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(changes[0], changes[1])


# --- steps, multi-attribute, classifier probabilities ------------------------------------------------------------


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


def test_multi_attribute_sums_the_weighted_losses(ba_pipe):
    skin = tiny_classifier(seed=1)
    hair = tiny_classifier(class_names=("none", "black", "red"), attribute="hair", seed=2)
    strengths = [20.0, 5.0]
    targets = [[0.5, 0.5], "red"]
    n = 3
    with HRecorder(ba_pipe.unet) as rec:
        run(
            ba_pipe,
            guidance_scale=1.0,
            num_images_per_prompt=n,
            h_classifier=[skin, hair],
            guidance_mode="distribution",
            target_distribution=targets,
            guidance_strength=strengths,
        )
    references = [torch.tensor([0.5, 0.5]), torch.tensor([0.0, 0.0, 1.0])]
    for before, after, t in zip(rec.before, rec.after, rec.timesteps):
        h = before.clone().requires_grad_()
        total = sum(
            s * n * guidance_loss(c(h, t), "distribution", r) for c, s, r in zip([skin, hair], strengths, references)
        )
        (grad,) = torch.autograd.grad(total, h)
        torch.testing.assert_close(after, before - grad, rtol=1e-4, atol=1e-4)


def test_sample_and_distribution_modes_move_probabilities_toward_the_target(ba_pipe):
    """A random classifier on the tiny model: each guided step brings the classifier's output closer to the target."""
    clf = tiny_classifier(class_names=("none", "black", "red"), attribute="hair", seed=4, scale=0.05)
    for mode, target in (
        ("sample", {"target_classes": "red"}),
        ("distribution", {"target_distribution": [0.1, 0.2, 0.7]}),
    ):
        with HRecorder(ba_pipe.unet) as rec:
            run(
                ba_pipe,
                num_inference_steps=5,
                num_images_per_prompt=4,
                output_type="latent",
                h_classifier=clf,
                guidance_mode=mode,
                guidance_strength=100.0,
                **target,
            )
        for before, after, t in zip(rec.before, rec.after, rec.timesteps):
            p_before = torch.softmax(clf(before[4:], t) / TEMPERATURE, dim=1)
            p_after = torch.softmax(clf(after[4:], t) / TEMPERATURE, dim=1)
            if mode == "sample":
                assert (p_after[:, 2] > p_before[:, 2]).all()
            else:
                ref = torch.tensor([0.1, 0.2, 0.7])
                assert (p_after.mean(0) - ref).abs().sum() < (p_before.mean(0) - ref).abs().sum()


def test_classifier_from_a_directory_is_loaded_once(fresh_ba_pipe, tmp_path, monkeypatch):
    tiny_classifier().save_pretrained(tmp_path / "skin")
    calls = []
    original = HClassifier.from_pretrained.__func__

    def counting(cls, path, **kwargs):
        calls.append(path)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(HClassifier, "from_pretrained", classmethod(counting))
    for _ in range(2):
        run(
            fresh_ba_pipe,
            num_inference_steps=1,
            num_images_per_prompt=2,
            h_classifier=str(tmp_path / "skin"),
            guidance_mode="distribution",
            target_distribution="dark",
        )
    assert len(calls) == 1


def test_head_lookup_reads_the_schedule_not_the_device_timestep(fresh_ba_pipe):
    """Off the host, the hook takes the step's timestep from the schedule read once per call (no per-step sync)."""
    ba_pipe = fresh_ba_pipe  # its scheduler is set here: not the shared pipeline's
    clf, _ = known_classifier()
    ba_pipe.scheduler.set_timesteps(3)
    ba_pipe._num_timesteps = 3
    plan = ba_pipe.check_guidance_inputs(
        clf, "sample", None, 0, 1.0, (0.0, 1.0), "kl", None, "cond", 2, 3, IMAGE_SIZE, IMAGE_SIZE
    )
    hook = ba_pipe._capture_timestep(plan)
    schedule = ba_pipe.scheduler.timesteps.tolist()
    for step in range(3):
        # A meta tensor stands for a timestep on an accelerator: its value cannot be read on the host.
        hook(ba_pipe.unet, (None, torch.empty((), device="meta")), {})
        assert plan.step_index == step
        assert plan.timestep == schedule[step]
    # On the host the captured value is checked against the schedule, and wins where they differ.
    plan.step_index = -1
    hook(ba_pipe.unet, (None, torch.tensor(123.0)), {})
    assert plan.timestep == torch.tensor(123.0)
