"""What a guided call relies on and promises: it reads the schedule its own call set (diffusers' call order), a
`BalanceState` counts finished calls only, and wrong arguments are named in one line."""

import inspect

import numpy as np
import pytest
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion
from tiny_models import H_SHAPE, make_generator, tiny_classifier
from unconditional_models import tiny_ddim_pipeline

from pipeline_balancing_act import BalanceState
from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline


PROMPT = "a photo of a face"
GUIDED = {
    "h_classifier": tiny_classifier(scale=0.3),
    "guidance_mode": "distribution",
    "target_distribution": [0.5, 0.5],
}


def generate(pipe, **kwargs):
    args = {"num_inference_steps": 3, "num_images_per_prompt": 4, "output_type": "np", "generator": make_generator(0)}
    return pipe(PROMPT, **{**args, **kwargs}).images


# --- diffusers' call order --------------------------------------------------------------------------------------------


def test_the_wrapped_call_sets_the_timesteps_then_prepares_the_latents_then_loops():
    """`start_guidance` runs in `prepare_latents` and reads the CFG scale and the scheduler's timesteps that
    `StableDiffusionPipeline.__call__` set before it: this fails when a diffusers release reorders them."""
    source = inspect.getsource(pipeline_stable_diffusion.StableDiffusionPipeline.__call__)
    order = [
        "self._guidance_scale = guidance_scale",
        "retrieve_timesteps(",
        "self.prepare_latents(",
        "for i, t in enumerate(timesteps):",
        "callback_on_step_end(self, i, t, callback_kwargs)",
    ]
    positions = [source.find(line) for line in order]
    assert -1 not in positions, dict(zip(order, positions))
    assert positions == sorted(positions), dict(zip(order, positions))
    assert source.count("self.prepare_latents(") == 1


def test_a_schedule_not_set_by_this_call_is_refused_naming_the_call_order(ba_pipe, monkeypatch):
    generate(ba_pipe)  # leaves its schedule on the scheduler

    def stale(scheduler, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs):
        return scheduler.timesteps, len(scheduler.timesteps)  # as if the timesteps were set after the latents

    monkeypatch.setattr(pipeline_stable_diffusion, "retrieve_timesteps", stale)
    with pytest.raises(RuntimeError, match=r"had not set them yet.*StableDiffusionPipeline.__call__.*before"):
        generate(ba_pipe, **GUIDED)


def test_a_loop_that_skips_or_repeats_steps_is_refused(ba_pipe):
    from pipeline_balancing_act import GuidanceArguments, _GuidanceRun

    run = _GuidanceRun(ba_pipe.prepare_guidance(GuidanceArguments(**GUIDED)), False)
    run.start(2, [901.0, 601.0, 301.0], False, 1.0, "cpu", None, H_SHAPE)
    run.calls_in_step = 1
    with pytest.raises(RuntimeError, match="reported step 1 where Balancing Act expected step 0"):
        run.end_step(1)
    run.calls_in_step = 1
    run.end_step(0)
    with pytest.raises(RuntimeError, match="ran 1 steps.*have 3"):
        run.finish()


# --- BalanceState counts finished calls only ------------------------------------------------------------------------


def stop_at_step_one(pipe, step, timestep, callback_kwargs):
    if step == 1:
        raise KeyboardInterrupt
    return callback_kwargs


def interrupt_at_step_one(pipe, step, timestep, callback_kwargs):
    if step == 1:
        pipe._interrupt = True
    return callback_kwargs


@pytest.mark.parametrize(
    "how, extra, error",
    [
        ("raised", {"callback_on_step_end": stop_at_step_one}, KeyboardInterrupt),
        ("interrupted", {"callback_on_step_end": interrupt_at_step_one}, None),
        ("bad-input-found-late", {"guidance_steps": [7]}, ValueError),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_call_that_does_not_finish_adds_nothing_to_the_state(ba_pipe, how, extra, error):
    state = BalanceState()
    generate(ba_pipe, **GUIDED, balance_state=state)
    before = [c.clone() for c in state.counts]
    if error is None:
        generate(ba_pipe, **GUIDED, balance_state=state, **extra)
    else:
        with pytest.raises(error):
            generate(ba_pipe, **GUIDED, balance_state=state, **extra)
    assert [c.tolist() for c in state.counts] == [c.tolist() for c in before] and state.num_images == 4
    generate(ba_pipe, **GUIDED, balance_state=state)  # a finished call counts
    assert state.num_images == 8


# --- arguments named in one line --------------------------------------------------------------------------------------


def test_a_typo_in_a_guidance_argument_is_a_type_error_naming_the_closest_argument(ba_pipe):
    with pytest.raises(TypeError, match=r"'target_distrbution' \(did you mean 'target_distribution'\?\)"):
        generate(ba_pipe, h_classifier=GUIDED["h_classifier"], guidance_mode="distribution", target_distrbution=[1, 0])
    with pytest.raises(TypeError, match=r"'not_an_argument'; it takes"):
        generate(ba_pipe, not_an_argument=1)


def test_one_image_in_distribution_mode_says_image_not_images(ba_pipe):
    with pytest.raises(ValueError, match="got 1 image\\.$"):
        generate(ba_pipe, **GUIDED, num_images_per_prompt=1)


@pytest.fixture(scope="module")
def ddim_pipe():
    return BalancingActUnconditionalPipeline.from_pipe(tiny_ddim_pipeline())


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (
            ("a photo of a face",),
            {},
            r"`batch_size` must be a positive integer \(an unconditional model takes no prompt\)",
        ),
        ((), {"eta": 5}, r"`eta` must be a number from 0 \(DDIM\) to 1 \(DDPM\); got 5"),
        ((), {"eta": -0.5}, "`eta`"),
        ((), {"batch_size": 0}, "`batch_size`"),
        ((), {"num_inference_steps": 0}, "`num_inference_steps`"),
    ],
    ids=["prompt-given", "eta-5", "eta-negative", "no-images", "no-steps"],
)
def test_the_unconditional_pipeline_names_a_wrong_argument(ddim_pipe, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddim_pipe(*args, **{"num_inference_steps": 2, "output_type": "np", **kwargs})


def test_the_unconditional_pipeline_still_takes_eta_in_range(ddim_pipe):
    images = ddim_pipe(batch_size=2, eta=1.0, num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()


def test_encode_prompt_shows_the_arguments_and_documentation_of_stable_diffusion(ba_pipe):
    """The override that takes the tokenizer lock keeps `StableDiffusionPipeline.encode_prompt`'s signature and
    docstring for introspection (diffusers' fast test `test_encode_prompt_works_in_isolation` reads its arguments)."""
    stock = pipeline_stable_diffusion.StableDiffusionPipeline.encode_prompt
    assert inspect.signature(type(ba_pipe).encode_prompt) == inspect.signature(stock)
    assert inspect.getdoc(type(ba_pipe).encode_prompt) == inspect.getdoc(stock)
