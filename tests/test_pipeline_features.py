"""What diffusers users already do keeps working with guidance: schedulers, callbacks, interrupt, dtypes, LoRA."""

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
from tiny_models import HRecorder, guidance_is_off, make_generator, tiny_classifier, tiny_sd_pipeline

from pipeline_balancing_act import BalancingActPipeline, logit_directions


PROMPT = "a photo of a face"
GUIDED = {"guidance_mode": "distribution", "target_distribution": [0.2, 0.8], "guidance_strength": 5.0}


def hooks_are_removed(pipe) -> bool:
    return guidance_is_off(pipe.unet)


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
@pytest.mark.parametrize("steps", [4, 9])  # PNDM with PRK steps needs >= 4
def test_schedulers_run_guided(fresh_ba_pipe, scheduler_cls, steps):
    pipe = fresh_ba_pipe
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    clf = tiny_classifier()
    kwargs = {"num_inference_steps": steps, "num_images_per_prompt": 2, "output_type": "np"}
    plain = pipe(PROMPT, generator=make_generator(0), **kwargs).images
    with HRecorder(pipe.unet) as rec:
        guided = pipe(PROMPT, generator=make_generator(0), h_classifier=clf, **GUIDED, **kwargs).images
    assert len(rec.before) == len(pipe.scheduler.timesteps)  # one UNet call per loop step (PNDM: steps + 1)
    assert all(not torch.equal(b, a) for b, a in zip(rec.before, rec.after))  # every step was guided
    assert np.isfinite(guided).all()
    assert not np.allclose(guided, plain)
    assert hooks_are_removed(pipe)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_guides_in_float32(fresh_ba_pipe, dtype):
    pipe = fresh_ba_pipe.to(dtype)
    clf = tiny_classifier()
    strength, classes = 5.0, torch.tensor([1, 0])
    with HRecorder(pipe.unet) as rec:
        images = pipe(
            PROMPT,
            num_inference_steps=2,
            num_images_per_prompt=2,
            generator=make_generator(0),
            output_type="np",
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=classes.tolist(),
            guidance_strength=strength,
        ).images
    assert rec.before[0].dtype == dtype and rec.after[0].dtype == dtype
    for before, after, t in zip(rec.before, rec.after, rec.timesteps):
        # the conditional rows move by the float32 update, cast back once
        h = before[2:].float()
        g = logit_directions(clf.calibrated_logits(h, t), classes, "classes", 1.0)
        delta = strength / 7.5 * (g @ clf.move_directions(t))
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(after[2:], before[2:] + delta.reshape(h.shape).to(dtype), rtol=0, atol=0)
        assert torch.equal(after[:2], before[:2])
    assert np.isfinite(images).all()
    assert clf.weight.dtype == torch.float32  # the classifier itself is not cast


def test_callback_on_step_end_sees_every_step_and_can_edit_latents(ba_pipe):
    seen = []

    def callback(pipe, i, t, callback_kwargs):
        seen.append((i, float(t), callback_kwargs["latents"].shape, callback_kwargs["prompt_embeds"].shape))
        return {"latents": callback_kwargs["latents"] * 0.0} if i == 3 else {}

    out = ba_pipe(
        PROMPT,
        num_inference_steps=4,
        num_images_per_prompt=2,
        generator=make_generator(0),
        output_type="latent",
        h_classifier=tiny_classifier(),
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        **GUIDED,
    ).images
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == [float(t) for t in ba_pipe.scheduler.timesteps]
    assert seen[0][2] == (2, 4, 8, 8) and seen[0][3] == (4, 77, 32)
    assert torch.count_nonzero(out) == 0


def test_interrupt_stops_the_loop_and_removes_the_hooks(ba_pipe):
    def callback(pipe, i, t, callback_kwargs):
        if i == 1:
            pipe._interrupt = True
        return {}

    with HRecorder(ba_pipe.unet) as rec:
        ba_pipe(
            PROMPT,
            num_inference_steps=6,
            num_images_per_prompt=2,
            output_type="latent",
            h_classifier=tiny_classifier(),
            callback_on_step_end=callback,
            **GUIDED,
        )
    assert len(rec.before) == 2
    assert hooks_are_removed(ba_pipe)


def test_a_raising_callback_leaves_no_hook_and_the_next_call_is_vanilla(ba_pipe, sd_pipe):
    def callback(pipe, i, t, callback_kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ba_pipe(
            PROMPT,
            num_inference_steps=3,
            num_images_per_prompt=2,
            h_classifier=tiny_classifier(),
            callback_on_step_end=callback,
            **GUIDED,
        )
    assert hooks_are_removed(ba_pipe)
    kwargs = {"num_inference_steps": 3, "num_images_per_prompt": 2, "output_type": "np"}
    after = ba_pipe(PROMPT, generator=make_generator(1), **kwargs).images
    assert np.array_equal(after, sd_pipe(PROMPT, generator=make_generator(1), **kwargs).images)


def test_deprecated_callback_arguments_are_passed_through(ba_pipe):
    steps = []
    with pytest.warns(FutureWarning):
        ba_pipe(
            PROMPT,
            num_inference_steps=3,
            num_images_per_prompt=2,
            output_type="latent",
            callback=lambda i, t, latents: steps.append(i),
            callback_steps=1,
            h_classifier=tiny_classifier(),
            **GUIDED,
        )
    assert steps == [0, 1, 2]


def run_offloaded(pipe, device: str):
    """Guided sample-mode call under model CPU offload; returns (recorder, images, classifier)."""
    pipe.enable_model_cpu_offload(device=device)
    assert hasattr(pipe.unet, "_hf_hook")  # the UNet's forward is wrapped by accelerate's offload hook
    clf = tiny_classifier()
    with HRecorder(pipe.unet) as rec:
        images = pipe(
            PROMPT,
            num_inference_steps=3,
            num_images_per_prompt=2,
            output_type="np",
            generator=make_generator(0),
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=[1, 0],
            guidance_strength=5.0,
        ).images
    return rec, images, clf


def check_offloaded_guidance(pipe, rec, images, clf):
    assert len(rec.before) == 3
    for before, after, t in zip(rec.before, rec.after, rec.timesteps):
        # the heads were copied to h's device for the call; the classifier itself stayed on the CPU
        h = before[2:].float().cpu()
        g = logit_directions(clf.calibrated_logits(h, t), torch.tensor([1, 0]), "classes", 1.0)
        delta = 5.0 / 7.5 * (g @ clf.move_directions(t))
        torch.testing.assert_close(after[2:].cpu(), h + delta.reshape(h.shape), rtol=1e-4, atol=1e-5)
    assert clf.weight.device.type == "cpu"
    assert np.isfinite(images).all()
    assert hooks_are_removed(pipe)


def test_guidance_with_model_cpu_offload(fresh_ba_pipe):
    """The accelerate offload hooks wrap the UNet's forward; our hooks still see every call and move h exactly."""
    check_offloaded_guidance(fresh_ba_pipe, *run_offloaded(fresh_ba_pipe, "cpu"))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the UNet runs there, the classifier not"
)
def test_guidance_with_model_cpu_offload_to_a_gpu(fresh_ba_pipe):
    check_offloaded_guidance(fresh_ba_pipe, *run_offloaded(fresh_ba_pipe, "cuda"))


def test_lora_weights_load_and_guidance_runs(tmp_path):
    peft = pytest.importorskip("peft")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    source = tiny_sd_pipeline()
    source.unet.add_adapter(
        peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(source.unet))
    BalancingActPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora)

    pipe = BalancingActPipeline.from_pipe(tiny_sd_pipeline())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "num_images_per_prompt": 2, "output_type": "np"}
    before = pipe(PROMPT, generator=make_generator(0), **kwargs).images
    pipe.load_lora_weights(tmp_path)
    after = pipe(PROMPT, generator=make_generator(0), **kwargs).images
    guided = pipe(PROMPT, generator=make_generator(0), h_classifier=tiny_classifier(), **GUIDED, **kwargs).images
    assert not np.allclose(before, after)
    assert not np.allclose(after, guided)
    assert hooks_are_removed(pipe)
