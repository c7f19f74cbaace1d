"""Where diffusers really runs: a compiled UNet, components shared with other callers and threads, and a guided step
that never makes the host wait for the device."""

import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_models import guidance_is_off, make_generator, tiny_classifier, tiny_components

import pipeline_balancing_act as pba
from h_classifiers.host_syncs import HostSyncCounter
from pipeline_balancing_act import BalanceState, BalancingActPipeline, guidance_loss, logit_directions


PROMPT = "a photo of a face"
HAIR = ("none", "black", "red")


def make_pipe(cls=BalancingActPipeline, **components):
    pipe = cls(**(components or tiny_components()), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    args = {"num_inference_steps": 3, "num_images_per_prompt": 4, "output_type": "np", "generator": make_generator(0)}
    return pipe(PROMPT, **{**args, **kwargs}).images


GUIDED = {
    "h_classifier": tiny_classifier(scale=0.3),
    "guidance_mode": "distribution",
    "target_distribution": [0.25, 0.75],
}


# --- the closed form --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, targets",
    [
        ("classes", torch.tensor([0, 2, 1, 2, 0])),
        ("kl", torch.tensor([0.2, 0.3, 0.5])),
        ("kl", torch.tensor([0.0, 0.5, 0.5])),  # a zero target (floored) and p_hat far from it
        ("chi2", torch.tensor([0.6, 0.3, 0.1])),
        ("chi2", torch.tensor([1.0, 0.0, 0.0])),
    ],
)
def test_the_closed_form_directions_are_minus_the_gradient_of_guidance_loss(loss, targets):
    logits = torch.randn(5, 3, generator=make_generator(4)) * 4
    z = logits.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(guidance_loss(z, targets, loss, 8.0), z)
    torch.testing.assert_close(logit_directions(logits, targets, loss, 8.0), -gradient, rtol=1e-5, atol=1e-6)


# --- no host-device synchronisation inside a guided step ----------------------------------------------------------


@pytest.fixture
def syncs_per_guided_step(monkeypatch):
    """Counts, per UNet call of a guided call, the operations in Balancing Act's h function and step end that would
    make the host wait for a CUDA device (`HostSyncCounter`)."""
    counts: list[int] = []
    init = pba.MidBlockHook.__init__

    def counting(fn):
        def wrapped(*args):
            with HostSyncCounter() as syncs:
                result = fn(*args)
            counts[-1] += syncs.count
            return result

        return wrapped

    def init_counting(self, unet, fn, *site):
        def h_function(h):
            counts.append(0)
            return counting(fn)(h)

        init(self, unet, h_function, *site)

    monkeypatch.setattr(pba.MidBlockHook, "__init__", init_counting)
    end_step = pba._GuidanceRun.end_step
    monkeypatch.setattr(pba._GuidanceRun, "end_step", lambda run, step: counting(end_step)(run, step))
    return counts


TWO_CLASSES = [
    {"guidance_mode": "sample", "target_classes": [0, 1, 1, 0]},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75]},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "balance_state": BalanceState()},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "guided_branches": "both"},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "distribution_solver": "kl"},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "distribution_solver": "chi2"},
    {"guidance_mode": "distribution", "target_distribution": "dark", "distribution_solver": "kl"},
]


@pytest.mark.parametrize("kwargs", TWO_CLASSES, ids=lambda k: "-".join(str(v) for v in k.values())[:40])
def test_a_guided_step_with_two_classes_makes_no_host_sync(ba_pipe, syncs_per_guided_step, kwargs):
    generate(ba_pipe, h_classifier=tiny_classifier(), **kwargs)
    assert len(syncs_per_guided_step) == 3 and syncs_per_guided_step == [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"h_classifier": tiny_classifier(class_names=HAIR, attribute="hair"), "target_distribution": [0.2, 0.4, 0.4]},
        {
            "h_classifier": [tiny_classifier(), tiny_classifier(class_names=HAIR, attribute="hair", seed=3)],
            "target_distribution": [[0.2, 0.1, 0.2], [0.1, 0.2, 0.2]],  # joint 2 x 3
        },
    ],
    ids=["three-classes", "joint-2x3"],
)
def test_a_guided_step_with_more_classes_makes_at_most_one_host_sync(ba_pipe, syncs_per_guided_step, kwargs):
    generate(ba_pipe, guidance_mode="distribution", **kwargs)
    assert len(syncs_per_guided_step) == 3 and max(syncs_per_guided_step) <= 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"guidance_mode": "distribution", "target_distribution": [[0.25, 0.75], "hold"]},
        {"guidance_mode": "sample", "target_classes": [[0, 1, 1, 0], "hold"]},
    ],
    ids=["distribution-hold", "sample-hold"],
)
def test_a_guided_step_holding_a_classifier_makes_no_host_sync(ba_pipe, syncs_per_guided_step, kwargs):
    held = tiny_classifier(class_names=HAIR, attribute="hair", seed=3)
    generate(ba_pipe, h_classifier=[tiny_classifier(), held], **kwargs)
    assert len(syncs_per_guided_step) == 3 and syncs_per_guided_step == [0, 0, 0]


def test_the_sync_counter_sees_what_would_wait_for_the_device():
    x = torch.randn(4, 3)
    with HostSyncCounter() as syncs:
        x.softmax(1).argmax(1)
        assert syncs.count == 0
        x.sum().item(), x.tolist(), bool(x.sum() > 0), x.cpu(), x[x > 0], int(x[0, 0]), x.nonzero()
    assert syncs.events == ["item", "tolist", "__bool__", "cpu", "boolean index", "__int__", "nonzero"]


# --- compiled UNets -----------------------------------------------------------------------------------------------


@pytest.fixture
def compiles():
    """A torch.compile backend fast enough for CI (runs the traced graph eagerly) that counts graph compilations."""
    torch._dynamo.reset()
    graphs: list[int] = []

    def backend(graph_module, example_inputs):
        graphs.append(1)
        return graph_module.forward

    yield backend, graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("vanilla_first", [False, True], ids=["fresh", "after-an-unguided-call"])
def test_guidance_works_with_a_compiled_unet_that_opted_in(compiles, vanilla_first):
    backend, graphs = compiles
    eager = make_pipe()
    expected_guided, expected_vanilla = generate(eager, **GUIDED), generate(eager)
    pipe = make_pipe()
    pba.install_h_hook(pipe.unet.mid_block)  # the documented opt-in, before compiling
    pipe.unet = torch.compile(pipe.unet, backend=backend)
    if vanilla_first:
        np.testing.assert_allclose(generate(pipe), expected_vanilla, atol=1e-5)
    np.testing.assert_allclose(generate(pipe, **GUIDED), expected_guided, atol=1e-5)
    assert not np.allclose(expected_guided, expected_vanilla, atol=1e-3)
    compiled = len(graphs)
    np.testing.assert_allclose(generate(pipe, **GUIDED), expected_guided, atol=1e-5)  # no recompilation ...
    np.testing.assert_allclose(generate(pipe), expected_vanilla, atol=1e-5)  # ... in any order of calls
    assert len(graphs) == compiled
    assert list(pipe.unet.mid_block._forward_hooks.values()) == [pba._h_dispatch_hook]  # kept, as asked
    pba.remove_h_hook(pipe.unet.mid_block)
    assert list(pipe.unet.mid_block._forward_hooks.values()) == []


def test_a_guided_call_on_a_compiled_unet_without_the_opt_in_stops_before_the_first_step(compiles):
    backend, _ = compiles
    pipe = make_pipe()
    pipe.unet = torch.compile(pipe.unet, backend=backend)
    calls = []
    handle = pipe.unet._orig_mod.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"install_h_hook\(pipe.unet.mid_block\)") as error:
        generate(pipe, **GUIDED)
    handle.remove()
    assert calls == [] and "\n" not in str(error.value)
    assert guidance_is_off(pipe.unet._orig_mod)


def test_a_unet_traced_before_the_opt_in_raises_at_the_first_step_instead_of_running_vanilla(compiles):
    backend, _ = compiles
    plain = make_pipe(StableDiffusionPipeline)
    plain.unet = torch.compile(plain.unet, backend=backend)
    generate(plain)  # traced without any hook on the mid block
    pba.install_h_hook(plain.unet.mid_block)  # too late: the graph is already traced
    pipe = BalancingActPipeline.from_pipe(plain)
    steps = []
    try:
        with pytest.raises(RuntimeError, match="did not run at denoising step 0.*compiled"):
            generate(pipe, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}, **GUIDED)
    finally:
        pba.remove_h_hook(plain.unet.mid_block)
    assert steps == [0] and guidance_is_off(pipe.unet)


def test_fullgraph_compilation_is_refused_before_the_first_step(compiles):
    backend, _ = compiles
    pipe = make_pipe()
    pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=True)
    calls = []
    handle = pipe.unet._orig_mod.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="fullgraph=True"):
        generate(pipe, **GUIDED)
    handle.remove()
    assert calls == []


def test_unguided_calls_on_a_compiled_unet_are_stock_stable_diffusion(compiles):
    """Without the opt-in, a Balancing Act pipeline (also one made with `from_pipe`) puts nothing on the UNet: an
    unguided call compiles the graphs stock SD compiles, and `fullgraph=True` works."""
    backend, graphs = compiles
    stock = make_pipe(StableDiffusionPipeline)
    stock.unet = torch.compile(stock.unet, backend=backend, fullgraph=True)
    expected = generate(stock)
    stock_graphs = len(graphs)
    torch._dynamo.reset()
    graphs.clear()
    pipe = make_pipe()
    BalancingActPipeline.from_pipe(pipe)
    pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=True)
    np.testing.assert_allclose(generate(pipe), expected, atol=1e-5)
    assert len(graphs) == stock_graphs == 1


# --- shared components, threads -----------------------------------------------------------------------------------


def test_a_concurrent_vanilla_call_on_shared_components_is_unaffected():
    """A guided call in one thread, paused inside its loop, while another thread generates with a StableDiffusion
    pipeline sharing its UNet, VAE and text encoder: each gets exactly the images it gets alone."""
    guided_pipe = make_pipe()
    vanilla_pipe = StableDiffusionPipeline.from_pipe(
        guided_pipe, scheduler=DDIMScheduler.from_config(guided_pipe.scheduler.config)
    )  # its own scheduler: a diffusers scheduler holds per-call state
    vanilla_pipe.set_progress_bar_config(disable=True)
    alone_guided, alone_vanilla = generate(guided_pipe, **GUIDED), generate(vanilla_pipe)

    inside, vanilla_done, results = threading.Event(), threading.Event(), {}

    def pause_inside_the_loop(pipe, step, timestep, callback_kwargs):
        if step == 0:
            inside.set()
            assert vanilla_done.wait(60)
        return callback_kwargs

    def guided():
        results["guided"] = generate(guided_pipe, callback_on_step_end=pause_inside_the_loop, **GUIDED)

    thread = threading.Thread(target=guided)
    thread.start()
    assert inside.wait(60)
    results["vanilla"] = generate(vanilla_pipe)
    vanilla_done.set()
    thread.join(60)
    assert np.array_equal(results["vanilla"], alone_vanilla)
    assert np.array_equal(results["guided"], alone_guided)
    assert guidance_is_off(guided_pipe.unet)
