"""BalancingActUnconditionalPipeline: DDIMPipeline plus the guidance of BalancingActPipeline, on a tiny unconditional
UNet2DModel built in-process: parity without guidance, the exact update of h in each mode, the state across calls,
errors, the hook left dormant, no host sync in a guided step, and the loading routes (all offline)."""

import inspect
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from huggingface_hub import constants as hub_constants
from test_pipeline_runtime import syncs_per_guided_step  # noqa: F401  (a fixture)
from tiny_models import ROOT, HRecorder, guidance_is_off, make_generator, tiny_classifier
from unconditional_models import (
    GAP,
    SCALE,
    UNCONDITIONAL_H_SHAPE,
    known_classifier,
    margin_dark,
    modules_cache,  # noqa: F401  (a fixture)
    tiny_ddim_pipeline,
    tiny_scheduler,
    tiny_unconditional_pipeline,
    tiny_unet,
)

import pipeline_balancing_act as pba
from pipeline_balancing_act import BalanceState
from pipeline_balancing_act_unconditional import (
    DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH,
    BalancingActUnconditionalPipeline,
)


PIPELINE_FILE = ROOT / "pipeline_balancing_act_unconditional.py"
CORE_FILE = ROOT / "pipeline_balancing_act.py"
MARGIN = pba.GUIDANCE_MARGIN


@pytest.fixture(scope="module")
def ddim_pipe():
    return tiny_ddim_pipeline()


@pytest.fixture(scope="module")
def pipe():
    """Built from the same seed as `ddim_pipe`: identical weights, separate modules."""
    return tiny_unconditional_pipeline()


@pytest.fixture(autouse=True)
def leaves_guidance_off(request):
    yield
    if "pipe" in request.fixturenames:
        assert guidance_is_off(request.getfixturevalue("pipe").unet)


def run(pipe, **kwargs):
    args = {"batch_size": 2, "num_inference_steps": 3, "generator": make_generator(0), "output_type": "np", **kwargs}
    return pipe(**args).images


def pull(h: torch.Tensor, u: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """g_i[dark] of the class loss for each image asked to be `classes[i]` (1 = dark): the fraction of the class gap
    image i moves towards dark (negative: towards light). As in tests/test_pipeline_guidance.py."""
    m = margin_dark(h, u)
    towards_dark = 1 - torch.sigmoid(m - MARGIN)
    towards_light = -(1 - torch.sigmoid(-m - MARGIN))
    return torch.where(classes == 1, towards_dark, towards_light)


def expected_move(h: torch.Tensor, u: torch.Tensor, classes: torch.Tensor, strength: float) -> torch.Tensor:
    """The SD pipeline's update with guidance_scale 1: h + s * g_i[dark] * (dark anchor - light anchor)."""
    coefficient = strength * GAP * pull(h, u, classes)
    return h + coefficient[:, None, None, None] * u.view(1, *UNCONDITIONAL_H_SHAPE)


def along_u(rec: HRecorder, u: torch.Tensor, step: int) -> torch.Tensor:
    """Each image's move of h along u at `step` (positive: towards dark)."""
    return (rec.after[step] - rec.before[step]).flatten(1) @ u


# --- parity and the signature ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_type": "np"},
        {"output_type": "pt", "eta": 1.0, "use_clipped_model_output": True},
        {"output_type": "pil", "batch_size": 1},
        {"output_type": "np", "generator": [make_generator(1), make_generator(2)], "eta": 0.5},
    ],
    ids=["np", "pt-eta1", "pil", "generators"],
)
def test_bit_for_bit_ddim_pipeline_without_guidance(pipe, ddim_pipe, kwargs):
    args = {"batch_size": 2, "num_inference_steps": 4, "generator": make_generator(3), **kwargs}
    reference = ddim_pipe(**{**args, "generator": _same_generators(args["generator"])}).images
    ours = pipe(**{**args, "generator": _same_generators(args["generator"])}).images
    if args["output_type"] == "pil":
        reference, ours = [np.asarray(i) for i in reference], [np.asarray(i) for i in ours]
    assert np.array_equal(np.asarray(ours), np.asarray(reference))


def _same_generators(generator):
    """A fresh copy (same state) of a generator or a list of generators, for two calls that must draw the same."""
    copy = lambda g: torch.Generator().set_state(g.get_state())  # noqa: E731
    return [copy(g) for g in generator] if isinstance(generator, list) else copy(generator)


def test_tuple_output_is_ddim_pipelines(pipe, ddim_pipe):
    reference = ddim_pipe(num_inference_steps=2, generator=make_generator(0), output_type="np", return_dict=False)
    ours = pipe(num_inference_steps=2, generator=make_generator(0), output_type="np", return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == 1 and np.array_equal(ours[0], reference[0])


def test_the_own_loop_is_ddim_pipelines_loop(pipe, ddim_pipe):
    """The guided loop (also taken for an unguided call with a callback) is DDIMPipeline's: with a callback that
    changes nothing, and with guidance of strength 0, the images are bit-for-bit those of DDIMPipeline (eta = 1: the
    scheduler's noise is drawn from the same generator in the same order)."""
    args = {"batch_size": 3, "num_inference_steps": 4, "eta": 1.0, "output_type": "np"}
    reference = ddim_pipe(generator=make_generator(5), **args).images
    steps = []
    with_callback = pipe(
        generator=make_generator(5), callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}, **args
    ).images
    assert steps == [0, 1, 2, 3]
    assert np.array_equal(with_callback, reference)
    clf, _ = known_classifier()
    unmoved = pipe(
        generator=make_generator(5),
        h_classifier=clf,
        guidance_mode="distribution",
        target_distribution=[0.5, 0.5],
        guidance_strength=0.0,
        **args,
    ).images
    assert np.array_equal(unmoved, reference)


def test_call_signature_extends_ddim_pipeline():
    ours = list(inspect.signature(BalancingActUnconditionalPipeline.__call__).parameters.values())
    base = list(inspect.signature(DDIMPipeline.__call__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(base)]] == [(p.name, p.kind, p.default) for p in base]
    added = [p.name for p in ours[len(base) :]]
    assert added == [
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "h_classifier",
        "guidance_mode",
        "target_distribution",
        "target_classes",
        "guidance_strength",
        "guidance_steps",
        "distribution_solver",
        "classifier_temperature",
        "balance_state",
        "global_batch",
    ]
    # the Balancing Act arguments have the defaults of the Stable Diffusion pipeline, but the strength: its own,
    # chosen on the toy DDPM (docs/lab/results/unconditional/sweep_strength.md)
    sd = inspect.signature(pba.BalancingActPipeline.__call__).parameters
    for p in ours[len(base) + 2 :]:
        expected = DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH if p.name == "guidance_strength" else sd[p.name].default
        assert p.default == expected, p.name


def test_the_h_shape_is_read_from_the_unet(pipe):
    assert pipe.h_shape(16, 16) == UNCONDITIONAL_H_SHAPE
    with HRecorder(pipe.unet) as rec:
        run(pipe, batch_size=1, num_inference_steps=1)
    assert list(rec.before[0].shape) == [1, *UNCONDITIONAL_H_SHAPE]


# --- the exact update of h ---------------------------------------------------------------------------------------


def test_sample_mode_moves_h_as_the_stable_diffusion_pipeline_with_guidance_scale_1(pipe, ddim_pipe):
    clf, u = known_classifier()
    strength = 3.0
    with HRecorder(pipe.unet) as rec:
        guided = run(
            pipe,
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
    assert not np.allclose(guided, run(ddim_pipe))


def test_guidance_steps_select_the_guided_steps(pipe):
    clf, _ = known_classifier()
    with HRecorder(pipe.unet) as rec:
        run(
            pipe,
            num_inference_steps=6,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=1,
            guidance_steps=(0.5, 1.0),
        )
    moved = [i for i, (b, a) in enumerate(zip(rec.before, rec.after)) if not torch.equal(b, a)]
    assert moved == [3, 4, 5]


def test_distribution_mode_assigns_exact_counts_across_the_batch(pipe):
    """Target 1/4 light, 3/4 dark of 4 images: at the first step the image that reads least dark is assigned light,
    the others dark, each moved by the class update towards its class; every guided step keeps the counts 1 / 3."""
    clf, u = known_classifier()
    strength = 2.0
    with HRecorder(pipe.unet) as rec:
        run(
            pipe,
            batch_size=4,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=[0.25, 0.75],
            guidance_strength=strength,
        )
    before, after = rec.before[0], rec.after[0]
    classes = torch.ones(4, dtype=torch.long)
    classes[margin_dark(before, u).argmin()] = 0
    torch.testing.assert_close(after, expected_move(before, u, classes, strength), rtol=1e-4, atol=1e-5)
    for step in range(3):
        moves = along_u(rec, u, step)
        assert int((moves > 0).sum()) == 3 and int((moves < 0).sum()) == 1


def test_chi_square_solver_moves_by_the_papers_loss_gradient(pipe):
    """The authors' unconditional loss (chi-square on the batch mean of softmax(logits / T))."""
    clf, u = known_classifier()
    target, strength, temperature, n = [0.2, 0.8], 2.0, 4.0, 3
    with HRecorder(pipe.unet) as rec:
        run(
            pipe,
            batch_size=n,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=target,
            guidance_strength=strength,
            distribution_solver="chi2",
            classifier_temperature=temperature,
        )
    ref = torch.tensor(target)
    for before, after in zip(rec.before, rec.after):
        raw = torch.stack([torch.zeros(n), SCALE * (before.flatten(1) @ u)], 1).requires_grad_(True)
        p_hat = torch.softmax(raw / temperature, 1).mean(0)
        (grad,) = torch.autograd.grad(n * temperature * ((p_hat - ref) ** 2 / ref).sum(), raw)
        expected = before + (strength * GAP * -grad[:, 1])[:, None, None, None] * u.view(1, *UNCONDITIONAL_H_SHAPE)
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_balance_state_carries_the_counts_across_calls(pipe):
    """One image per call, target 1/2 - 1/2: each call is guided towards the class the images so far lack, and the
    state counts each image's class as the classifier reads it at the last step."""
    clf, u = known_classifier()
    state = BalanceState()
    expected_counts = torch.zeros(2, dtype=torch.long)
    for call in range(4):
        lacking = int(torch.argmin(expected_counts))  # ties: class 0, as the largest remainder
        with HRecorder(pipe.unet) as rec:
            run(
                pipe,
                batch_size=1,
                generator=make_generator(call),
                h_classifier=clf,
                guidance_mode="distribution",
                target_distribution=[0.5, 0.5],
                balance_state=state,
            )
        assert (along_u(rec, u, 0) > 0).item() == (lacking == 1)
        read = int(margin_dark(rec.before[-1], u)[0] > 0)  # the last step's reading, before its move
        expected_counts[read] += 1
        assert state.num_images == call + 1
        assert torch.equal(state.counts[0], expected_counts)


# --- errors ------------------------------------------------------------------------------------------------------


def test_a_classifier_for_another_h_shape_is_refused_naming_both_shapes(pipe):
    clf = tiny_classifier(h_shape=[512, 8, 8])  # google/ddpm-celebahq-256's h
    with pytest.raises(ValueError, match=r"h of shape \[512, 8, 8\] but this UNet gives h of shape \[64, 4, 4\]"):
        run(pipe, h_classifier=clf, guidance_mode="sample", target_classes=0)


def test_a_mode_without_classifier_is_an_error(pipe):
    with pytest.raises(ValueError, match="needs `h_classifier`"):
        run(pipe, guidance_mode="distribution", target_distribution=[0.5, 0.5])


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"h_classifier": "c"}, "`h_classifier`"),
        ({"target_distribution": [0.5, 0.5]}, "`target_distribution`"),
        ({"h_classifier": "c", "target_classes": 1}, "`h_classifier`, `target_classes`"),
        ({"balance_state": BalanceState()}, "`balance_state`"),
    ],
)
def test_guidance_arguments_without_a_mode_are_an_error(pipe, kwargs, names):
    with pytest.raises(ValueError, match=f"{names} given without `guidance_mode`.*for the plain DDIMPipeline"):
        run(pipe, **kwargs)


def test_batch_errors_name_batch_size(pipe):
    clf, _ = known_classifier()
    with pytest.raises(ValueError, match=r"needs at least 2 images \(batch_size\)"):
        run(pipe, batch_size=1, h_classifier=clf, guidance_mode="distribution", target_distribution=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(2 images = batch_size\); got a list of 3"):
        run(pipe, h_classifier=clf, guidance_mode="sample", target_classes=[0, 1, 1])


def test_an_unknown_callback_tensor_input_is_an_error(pipe):
    with pytest.raises(ValueError, match="has to be in \\['image'\\]"):
        run(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["latents"])


def test_a_callback_that_calls_the_unet_is_an_error(pipe):
    clf, _ = known_classifier()

    def calls_the_unet(p, step, timestep, callback_kwargs):
        p.unet(callback_kwargs["image"], timestep)
        return {}

    with pytest.raises(RuntimeError, match="UNet ran 2 times in denoising step 0"):
        run(pipe, h_classifier=clf, guidance_mode="sample", target_classes=1, callback_on_step_end=calls_the_unet)


def test_a_callback_can_replace_the_image_of_a_guided_call(pipe):
    clf, _ = known_classifier()
    seen = []

    def zero_after_last_step(p, step, timestep, callback_kwargs):
        seen.append((step, tuple(callback_kwargs)))
        return {"image": torch.zeros_like(callback_kwargs["image"])} if step == 2 else {}

    images = run(
        pipe, h_classifier=clf, guidance_mode="sample", target_classes=1, callback_on_step_end=zero_after_last_step
    )
    assert seen == [(0, ("image",)), (1, ("image",)), (2, ("image",))]
    assert np.all(images == 0.5)  # (0 / 2 + 0.5)


# --- the hook, host syncs ----------------------------------------------------------------------------------------


def test_guidance_is_off_after_a_call_and_after_a_failed_call(pipe):
    clf, _ = known_classifier()
    run(pipe, h_classifier=clf, guidance_mode="sample", target_classes=1)
    assert guidance_is_off(pipe.unet)

    def fails(*args):
        raise KeyError("callback failed")

    with pytest.raises(KeyError, match="callback failed"):
        run(pipe, h_classifier=clf, guidance_mode="sample", target_classes=1, callback_on_step_end=fails)
    assert guidance_is_off(pipe.unet)
    with HRecorder(pipe.unet) as rec:  # the next unguided call leaves h as it is
        run(pipe)
    assert all(torch.equal(b, a) for b, a in zip(rec.before, rec.after))


TWO_CLASSES = [
    {"guidance_mode": "sample", "target_classes": [0, 1, 1, 0]},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75]},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "balance_state": BalanceState()},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "distribution_solver": "kl"},
    {"guidance_mode": "distribution", "target_distribution": [0.25, 0.75], "distribution_solver": "chi2"},
]


@pytest.mark.parametrize("kwargs", TWO_CLASSES, ids=lambda k: "-".join(str(v) for v in k.values())[:40])
def test_a_guided_step_with_two_classes_makes_no_host_sync(pipe, syncs_per_guided_step, kwargs):  # noqa: F811
    h_classifier = tiny_classifier(h_shape=UNCONDITIONAL_H_SHAPE)
    run(pipe, batch_size=4, h_classifier=h_classifier, **kwargs)
    assert syncs_per_guided_step == [0, 0, 0]


# --- loading routes ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny UNet saved as a DDIMPipeline and as a DDPMPipeline (what `google/ddpm-celebahq-256` is)."""
    root = tmp_path_factory.mktemp("tiny-unconditional")
    tiny_ddim_pipeline().save_pretrained(root / "ddim")
    DDPMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler()).save_pretrained(root / "ddpm")
    return root


def check_loaded_pipeline(loaded, ddim_pipe) -> None:
    assert type(loaded).__name__ == "BalancingActUnconditionalPipeline"
    assert isinstance(loaded.scheduler, DDIMScheduler)
    loaded.set_progress_bar_config(disable=True)
    plain = run(loaded)
    assert np.array_equal(plain, run(ddim_pipe))
    # a classifier made by the installed module works with a pipeline whose core is diffusers' copy of the module
    clf, _ = known_classifier()
    guided = run(loaded, h_classifier=clf, guidance_mode="distribution", target_distribution=[0.5, 0.5])
    assert not np.allclose(plain, guided)
    # the guided call left nothing on the mid block, in the module the pipeline's core comes from
    core = sys.modules[next(c for c in type(loaded).__mro__ if c.__name__ == "BalancingActMixin").__module__]
    assert list(loaded.unet.mid_block._forward_hooks.values()) == []
    assert core._ACTIVE_H_FUNCTIONS.get() == ()


@pytest.mark.parametrize("saved_as", ["ddim", "ddpm"])
def test_custom_pipeline_local_file(model_dirs, modules_cache, ddim_pipe, saved_as):  # noqa: F811
    loaded = DiffusionPipeline.from_pretrained(
        model_dirs / saved_as, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True
    )
    assert type(loaded).__module__ == "diffusers_modules.local.pipeline_balancing_act_unconditional"
    # diffusers follows the relative import: its copy of the core file sits next to the pipeline's, and is used
    local = Path(modules_cache) / "diffusers_modules" / "local"
    assert (local / "pipeline_balancing_act.py").read_bytes() == CORE_FILE.read_bytes()
    mixin = next(c for c in type(loaded).__mro__ if c.__name__ == "BalancingActMixin")
    assert mixin.__module__ == "diffusers_modules.local.pipeline_balancing_act"
    check_loaded_pipeline(loaded, ddim_pipe)


def test_diffusers_fetches_the_core_and_asks_for_no_package(monkeypatch):
    """diffusers' scan of the file's imports: `pipeline_balancing_act` is a relative import (fetched from beside the
    file), and never a package it would tell the user to `pip install` (the top-level import is `import ... as`)."""
    asked = []
    monkeypatch.setattr(dynamic_modules_utils.importlib, "import_module", lambda name: asked.append(name))
    assert dynamic_modules_utils.check_imports(PIPELINE_FILE) == ["pipeline_balancing_act"]
    assert asked and "pipeline_balancing_act" not in asked


def test_custom_pipeline_local_file_needs_trust_remote_code(model_dirs, modules_cache):  # noqa: F811
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(model_dirs / "ddim", custom_pipeline=str(PIPELINE_FILE))


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_custom_pipeline_hub_repo_holding_both_files(model_dirs, modules_cache, ddim_pipe, tmp_path, monkeypatch):  # noqa: F811
    """A Hub repo holding this file as `pipeline.py` and `pipeline_balancing_act.py` beside it: diffusers downloads
    both (from a Hub cache made here; the Hub's commit answer is given by the test, as in test_loading_routes.py)."""
    hub_cache = tmp_path / "hf_home" / "hub"
    repo = hub_cache / "models--user--faces-debiased"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    shutil.copy(PIPELINE_FILE, snapshot / "pipeline.py")
    shutil.copy(CORE_FILE, snapshot / "pipeline_balancing_act.py")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    asked = []
    monkeypatch.setattr(
        dynamic_modules_utils,
        "model_info",
        lambda repo_id, revision=None, token=None: asked.append(repo_id) or SimpleNamespace(sha=COMMIT),
    )
    loaded = DiffusionPipeline.from_pretrained(
        model_dirs / "ddpm", custom_pipeline="user/faces-debiased", trust_remote_code=True
    )
    package = f"diffusers_modules.local.user--faces-debiased.{COMMIT}"
    assert type(loaded).__module__ == f"{package}.pipeline"
    assert f"{package}.pipeline_balancing_act" in sys.modules
    assert set(asked) == {"user/faces-debiased"}
    check_loaded_pipeline(loaded, ddim_pipe)


def test_the_installed_module_loads_a_ddpm_checkpoint(model_dirs, ddim_pipe):
    """`BalancingActUnconditionalPipeline.from_pretrained` of a DDPMPipeline folder (as google/ddpm-celebahq-256)."""
    loaded = BalancingActUnconditionalPipeline.from_pretrained(model_dirs / "ddpm")
    assert type(loaded) is BalancingActUnconditionalPipeline
    check_loaded_pipeline(loaded, ddim_pipe)


def test_from_pipe_of_a_ddim_pipeline(ddim_pipe):
    plain = tiny_ddim_pipeline()
    ours = BalancingActUnconditionalPipeline.from_pipe(plain)
    assert ours.unet is plain.unet
    check_loaded_pipeline(ours, ddim_pipe)
    back = DDIMPipeline.from_pipe(ours)
    assert type(back) is DDIMPipeline and back.unet is plain.unet


# --- the paper's model: google/ddpm-celebahq-256's shapes ----------------------------------------------------------


def test_the_papers_model_has_h_512x8x8_and_a_guided_step_runs_on_it():
    """google/ddpm-celebahq-256's UNet2DModel config (`CELEBAHQ_UNET_CONFIG` in lab/bench/config.py, where its
    source is given) and DDPM scheduler, with random weights (nothing is downloaded): h is [B, 512, 8, 8], and one
    guided DDIM step moves the h the decoder receives. One image, one step, one UNet call: the 256 px UNet costs
    about 0.5 TFLOP per image."""
    from diffusers import DDPMScheduler, UNet2DModel

    from lab.bench.config import CELEBAHQ_SCHEDULER_CONFIG, CELEBAHQ_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(**CELEBAHQ_UNET_CONFIG).eval()
    pipe = BalancingActUnconditionalPipeline(unet=unet, scheduler=DDPMScheduler(**CELEBAHQ_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)  # as DDIMPipeline converts the model's scheduler
    h_shape = [512, 8, 8]
    assert pipe.h_shape(256, 256) == h_shape
    # Logits of order 1 on h of order 1 (weights of scale 1 / sqrt(dim)); identity calibration, random anchors.
    classifier = tiny_classifier(("female", "male"), "gender", h_shape=h_shape, scale=math.prod(h_shape) ** -0.5)
    with HRecorder(unet) as rec:
        guided = run(
            pipe,
            batch_size=1,
            num_inference_steps=1,
            h_classifier=classifier,
            guidance_mode="sample",
            target_classes=1,
        )
    assert [list(h.shape) for h in rec.before + rec.after] == [[1, *h_shape]] * 2  # the real hook's h, moved
    move = (rec.after[0] - rec.before[0]).flatten()
    anchors = classifier.anchors[classifier.head_index(rec.timesteps[0])]
    # the move is along the class anchors, towards class 1
    assert move.norm() > 0 and float(move @ (anchors[1] - anchors[0])) > 0
    assert guided.shape == (1, 256, 256, 3) and np.isfinite(guided).all()
    assert guidance_is_off(unet)
