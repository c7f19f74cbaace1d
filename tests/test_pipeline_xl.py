"""BalancingActXLPipeline on a tiny SDXL built in-process (tests/tiny_xl.py): parity with StableDiffusionXLPipeline
without guidance, the exact update of h in each mode with SDXL's [uncond; cond] rows, the errors, the hook left
dormant, the refiner hand-off with `denoising_end`, micro-conditioning, from_pipe, LoRA, offload, half precision, a
compiled UNet, and the loading routes (all offline)."""

import inspect
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import dynamic_modules_utils
from huggingface_hub import constants as hub_constants
from test_pipeline_guidance import expected_move, known_classifier, margin_dark
from test_pipeline_runtime import compiles  # noqa: F401  (a fixture)
from tiny_models import ROOT, HRecorder, guidance_is_off, make_generator, tiny_classifier
from tiny_xl import tiny_ba_xl_pipeline, tiny_refiner, tiny_sdxl_pipeline
from unconditional_models import modules_cache  # noqa: F401  (a fixture)

import pipeline_balancing_act as pba
from pipeline_balancing_act import logit_directions, tokenizer_lock
from pipeline_balancing_act_xl import BalancingActXLPipeline


PIPELINE_FILE = ROOT / "pipeline_balancing_act_xl.py"
CORE_FILE = ROOT / "pipeline_balancing_act.py"
PROMPT = "a photo of a face"
W = 5.0  # StableDiffusionXLPipeline's default guidance_scale: a conditional-only move is divided by it
GUIDED = {"guidance_mode": "distribution", "target_distribution": [0.5, 0.5], "guidance_strength": 20.0}


@pytest.fixture(scope="module")
def sdxl():
    """A stock tiny StableDiffusionXLPipeline (shared by the tests of this file: do not modify it)."""
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def pipe():
    """A BalancingActXLPipeline built from the same seed as `sdxl`: identical weights, separate modules."""
    return tiny_ba_xl_pipeline()


@pytest.fixture(autouse=True)
def leaves_guidance_off(request):
    yield
    if "pipe" in request.fixturenames:
        assert guidance_is_off(request.getfixturevalue("pipe").unet)


def run(pipe, prompt=PROMPT, **kwargs):
    args = {"num_inference_steps": 3, "num_images_per_prompt": 2, "generator": make_generator(0), "output_type": "np"}
    return pipe(prompt, **(args | kwargs)).images


# --- parity, the signature, micro-conditioning ----------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_bit_for_bit_parity_without_guidance(sdxl, pipe, output_type):
    kwargs = {"num_inference_steps": 4, "num_images_per_prompt": 2, "output_type": output_type}
    reference = run(sdxl, **kwargs)
    assert np.array_equal(np.asarray(run(pipe, **kwargs)), np.asarray(reference))
    args = {"num_inference_steps": 2, "num_images_per_prompt": 2, "output_type": "np", "return_dict": False}
    assert np.array_equal(pipe(PROMPT, generator=make_generator(0), **args)[0], run(sdxl, num_inference_steps=2))


def test_micro_conditioning_passes_through(sdxl, pipe):
    conditioning = {
        "original_size": (64, 32),
        "crops_coords_top_left": (4, 8),
        "target_size": (32, 16),
        "negative_original_size": (8, 8),
        "negative_crops_coords_top_left": (0, 4),
        "negative_target_size": (16, 16),
        "prompt_2": "a portrait",
        "negative_prompt_2": "blurry",
    }
    conditioned = run(pipe, **conditioning)
    assert np.array_equal(conditioned, run(sdxl, **conditioning))
    assert not np.allclose(conditioned, run(pipe))  # the ids reached the UNet
    guided = run(pipe, h_classifier=tiny_classifier(), **GUIDED, **conditioning)
    assert np.isfinite(guided).all() and not np.allclose(guided, conditioned)


def test_call_signature_extends_stable_diffusion_xl():
    ours = list(inspect.signature(BalancingActXLPipeline.__call__).parameters.values())
    base = list(inspect.signature(StableDiffusionXLPipeline.__call__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(base) - 1]] == [
        (p.name, p.kind, p.default) for p in base[:-1]
    ]
    assert ours[-1].kind == inspect.Parameter.VAR_KEYWORD and base[-1].kind == inspect.Parameter.VAR_KEYWORD
    assert [p.name for p in ours[len(base) - 1 : -1]] == pba.GuidanceArguments.names()
    assert BalancingActXLPipeline._callback_tensor_inputs == StableDiffusionXLPipeline._callback_tensor_inputs
    doc = BalancingActXLPipeline.__call__.__doc__
    assert "vanilla Stable Diffusion XL, bit-for-bit" in doc and "guided_branches (" in doc


def test_encode_prompt_shows_the_arguments_and_documentation_of_stable_diffusion_xl(sdxl, pipe):
    """The override that takes the tokenizer locks was `encode_prompt(self, *args, **kwargs)` to `inspect.signature`:
    diffusers' fast test `test_encode_prompt_works_in_isolation` reads the arguments from it and stopped on `args`
    (docs/lab/diffusers_fast_tests.md)."""
    assert inspect.signature(pipe.encode_prompt) == inspect.signature(sdxl.encode_prompt)
    assert inspect.getdoc(pipe.encode_prompt) == inspect.getdoc(sdxl.encode_prompt)
    arguments = {"prompt": PROMPT, "device": "cpu", "num_images_per_prompt": 2, "do_classifier_free_guidance": True}
    for ours, theirs in zip(pipe.encode_prompt(**arguments), sdxl.encode_prompt(**arguments), strict=True):
        assert torch.equal(ours, theirs)


def test_both_tokenizers_are_held_while_the_prompt_is_encoded(pipe):
    held = []

    def record(module, args):
        held.append((tokenizer_lock(pipe.tokenizer).locked(), tokenizer_lock(pipe.tokenizer_2).locked()))

    handles = [encoder.register_forward_pre_hook(record) for encoder in (pipe.text_encoder, pipe.text_encoder_2)]
    try:
        run(pipe, num_inference_steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert held and set(held) == {(True, True)}
    assert not tokenizer_lock(pipe.tokenizer).locked() and not tokenizer_lock(pipe.tokenizer_2).locked()


# --- the exact update of h with SDXL's [uncond; cond] rows -----------------------------------------------------------


def test_sample_mode_moves_the_conditional_rows_by_the_class_gap_over_w(sdxl, pipe):
    clf, u = known_classifier()
    strength = 3.0
    with HRecorder(pipe.unet) as rec:
        guided = run(
            pipe,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes=["dark", "light"],
            guidance_strength=strength,
        )
    assert len(rec.before) == len(rec.after) == 3 and rec.before[0].shape[0] == 4  # [uncond; cond] of 2 images
    classes = torch.tensor([1, 0])
    for before, after in zip(rec.before, rec.after):
        assert torch.equal(after[:2], before[:2])  # the unconditional rows stay
        torch.testing.assert_close(
            after[2:], expected_move(before[2:], u, classes, strength, w=W), rtol=1e-4, atol=1e-5
        )
        assert margin_dark(after[2:], u)[0] > margin_dark(before[2:], u)[0]
        assert margin_dark(after[2:], u)[1] < margin_dark(before[2:], u)[1]
    assert not np.allclose(guided, run(sdxl, num_images_per_prompt=2))


def test_both_branches_move_by_the_same_undivided_step(pipe):
    clf, u = known_classifier()
    with HRecorder(pipe.unet) as rec:
        run(
            pipe,
            num_inference_steps=1,
            num_images_per_prompt=2,
            h_classifier=clf,
            guidance_mode="sample",
            target_classes="dark",
            guided_branches="both",
            guidance_strength=2.0,
        )
    before, after = rec.before[0], rec.after[0]
    moved = expected_move(before[2:], u, torch.tensor([1, 1]), 2.0) - before[2:]
    torch.testing.assert_close(after, before + torch.cat([moved, moved]), rtol=1e-4, atol=1e-5)


def test_distribution_mode_assigns_exact_counts_and_moves_the_logits_towards_them(pipe):
    """Target 1/4 light, 3/4 dark of 4 images: the image that reads least dark is assigned light, the others dark."""
    clf, u = known_classifier()
    strength = 2.0
    with HRecorder(pipe.unet) as rec:
        run(
            pipe,
            num_inference_steps=1,
            num_images_per_prompt=4,
            h_classifier=clf,
            guidance_mode="distribution",
            target_distribution=[0.25, 0.75],
            guidance_strength=strength,
        )
    before, after = rec.before[0][4:], rec.after[0][4:]
    classes = torch.ones(4, dtype=torch.long)
    classes[margin_dark(before, u).argmin()] = 0
    torch.testing.assert_close(after, expected_move(before, u, classes, strength, w=W), rtol=1e-4, atol=1e-5)
    assert ((margin_dark(after, u) > margin_dark(before, u)) == (classes == 1)).all()


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"guidance_strenght": 3.0}, TypeError, r"guidance_strenght' \(did you mean 'guidance_strength'\?\)"),
        ({"target_distribution": [0.5, 0.5]}, ValueError, "`target_distribution` given without `guidance_mode`"),
        ({"guidance_mode": "distribution", "target_distribution": [0.9, 0.3]}, ValueError, "`target_distribution`"),
        ({"guidance_mode": "sample", "target_classes": "purple"}, ValueError, "`target_classes`: Class 'purple'"),
        ({"guidance_mode": "sample", "target_classes": [0, 1, 0]}, ValueError, "batch size x num_images_per_prompt"),
    ],
)
def test_errors_name_the_argument(pipe, kwargs, error, match):
    if "guidance_mode" in kwargs:
        kwargs = {"h_classifier": tiny_classifier(), **kwargs}
    with pytest.raises(error, match=match):
        run(pipe, num_images_per_prompt=2, **kwargs)


def test_the_typo_error_names_stable_diffusion_xl(pipe):
    with pytest.raises(TypeError, match="takes the arguments of StableDiffusionXLPipeline and h_classifier"):
        run(pipe, target_distrbution=[0.5, 0.5])


def test_a_classifier_for_another_h_shape_is_refused_naming_both_shapes(pipe):
    clf = tiny_classifier(h_shape=[64, 8, 8])
    with pytest.raises(ValueError, match=r"h of shape \[64, 8, 8\] but this UNet gives h of shape \[64, 4, 4\]"):
        run(pipe, num_images_per_prompt=2, h_classifier=clf, **GUIDED)
    assert pipe.h_shape(32, 32) == [64, 8, 8]  # at 32 px (latents 16x16) it would fit


def test_a_failed_call_leaves_no_hook_and_the_next_call_is_vanilla(sdxl, pipe):
    def boom(p, step, t, kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(pipe, h_classifier=tiny_classifier(), callback_on_step_end=boom, **GUIDED)
    assert guidance_is_off(pipe.unet) and pba._CURRENT_RUN.get() is None
    assert np.array_equal(run(pipe), run(sdxl))


def test_a_callback_sees_sdxls_tensors_in_a_guided_call(pipe):
    seen = []

    def callback(p, step, t, kwargs):
        seen.append((step, sorted(kwargs)))
        return {}

    inputs = ["latents", "add_time_ids", "add_text_embeds", "prompt_embeds"]
    guided = {"h_classifier": tiny_classifier(), "callback_on_step_end": callback, **GUIDED}
    run(pipe, **guided)  # the default tensor inputs
    run(pipe, callback_on_step_end_tensor_inputs=inputs, **guided)
    assert seen == [(i, ["latents"]) for i in range(3)] + [(i, sorted(inputs)) for i in range(3)]


# --- the refiner hand-off: guidance in the base part only ----------------------------------------------------------


def test_denoising_end_guides_the_base_steps_and_hands_off_to_the_refiner(sdxl, pipe):
    """5 Euler steps ("leading": timesteps 801, 601, 401, 201, 1) with denoising_end 0.6: diffusers keeps the
    timesteps >= 1000 - 600, so the base runs 3 steps. The guided call is those 3 steps (its `guidance_steps`
    fractions count them), and the refiner, a pipeline of its own, runs the rest unguided."""
    hand_off = {"num_inference_steps": 5, "denoising_end": 0.6, "output_type": "latent", "num_images_per_prompt": 2}
    with HRecorder(sdxl.unet) as stock_rec:
        stock_latents = run(sdxl, **hand_off)
    assert len(stock_rec.before) == 3
    clf, u = known_classifier()
    guided = {"h_classifier": clf, "guidance_mode": "sample", "target_classes": "dark", "guidance_strength": 3.0}
    with HRecorder(pipe.unet) as rec:
        latents = run(pipe, **hand_off, **guided)
    assert rec.timesteps == stock_rec.timesteps == [801.0, 601.0, 401.0]
    for before, after in zip(rec.before, rec.after):
        torch.testing.assert_close(after[2:], expected_move(before[2:], u, torch.tensor([1, 1]), 3.0, w=W))
    # the second half of the base steps: step 2 of 3 (not steps 3 and 4 of the 5 the base never runs)
    with HRecorder(pipe.unet) as rec:
        run(pipe, **hand_off, **guided | {"guidance_steps": (0.5, 1.0)})
    assert [not torch.equal(b, a) for b, a in zip(rec.before, rec.after)] == [False, False, True]
    with pytest.raises(ValueError, match="step index 3 but this call has 3 denoising steps"):
        run(pipe, **hand_off, **guided | {"guidance_steps": [3]})
    assert len(pipe.scheduler.timesteps) == 5  # the scheduler's own schedule is left whole

    refiner = tiny_refiner(sdxl)
    refine = {"num_inference_steps": 5, "denoising_start": 0.6, "output_type": "np", "num_images_per_prompt": 2}
    with HRecorder(refiner.unet) as refiner_rec:
        images = refiner(PROMPT, image=latents, generator=make_generator(1), **refine).images
    assert refiner_rec.timesteps == [201.0, 1.0] and all(
        torch.equal(b, a) for b, a in zip(refiner_rec.before, refiner_rec.after)
    )
    vanilla = refiner(PROMPT, image=stock_latents, generator=make_generator(1), **refine).images
    assert images.shape == vanilla.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert not np.allclose(images, vanilla)
    assert np.array_equal(run(pipe, **hand_off), stock_latents.numpy())  # unguided: stock SDXL's hand-off


# --- from_pipe, LoRA, offload, half precision, a compiled UNet -----------------------------------------------------


def test_from_pipe_of_a_stock_sdxl_pipeline_and_back():
    stock = tiny_sdxl_pipeline()
    ours = BalancingActXLPipeline.from_pipe(stock)
    assert (
        ours.unet is stock.unet
        and ours.text_encoder_2 is stock.text_encoder_2
        and ours.tokenizer_2 is stock.tokenizer_2
    )
    ours.set_progress_bar_config(disable=True)
    plain = run(ours)
    assert np.array_equal(plain, run(stock))
    assert not np.allclose(plain, run(ours, h_classifier=tiny_classifier(), **GUIDED))
    back = StableDiffusionXLPipeline.from_pipe(ours)
    assert type(back) is StableDiffusionXLPipeline and back.unet is stock.unet
    assert guidance_is_off(stock.unet)


def test_lora_weights_load_and_guidance_runs(tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA loading needs peft (the `test` extra)")
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    source = tiny_sdxl_pipeline()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    source.unet.add_adapter(config)
    lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(source.unet))
    BalancingActXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora)

    ours = tiny_ba_xl_pipeline()
    before = run(ours)
    ours.load_lora_weights(tmp_path)
    after = run(ours)
    guided = run(ours, h_classifier=tiny_classifier(), **GUIDED)
    assert not np.allclose(before, after) and not np.allclose(after, guided)
    assert guidance_is_off(ours.unet)


def check_exact_cond_move(rec, clf, classes, strength, dtype=torch.float32):
    """Each step's conditional rows moved by the float32 update (computed on the CPU), cast to h's dtype once."""
    rows = len(classes)
    for before, after, t in zip(rec.before, rec.after, rec.timesteps):
        h = before[rows:].float().cpu()
        g = logit_directions(clf.calibrated_logits(h, t), classes, "classes", 1.0)
        delta = (strength / W * (g @ clf.move_directions(t))).reshape(h.shape)
        assert delta.abs().max() > 1e-3
        expected = (before[rows:].cpu() + delta.to(dtype)) if dtype != torch.float32 else h + delta
        tolerance = {"rtol": 0, "atol": 0} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(after[rows:].cpu(), expected, **tolerance)
        assert torch.equal(after[:rows], before[:rows])


def test_guidance_with_model_cpu_offload():
    pytest.importorskip("accelerate", reason="model CPU offload needs accelerate")
    ours = tiny_ba_xl_pipeline()
    ours.enable_model_cpu_offload(device="cpu")  # a CPU-only machine: the hooks move nothing, but they wrap forward
    assert hasattr(ours.unet, "_hf_hook")
    clf, classes = tiny_classifier(), torch.tensor([1, 0])
    with HRecorder(ours.unet) as rec:
        images = run(ours, num_images_per_prompt=2, h_classifier=clf, guidance_mode="sample", target_classes=[1, 0])
    assert len(rec.before) == 3 and np.isfinite(images).all()
    check_exact_cond_move(rec, clf, classes, pba.DEFAULT_GUIDANCE_STRENGTH)
    assert clf.weight.device.type == "cpu" and guidance_is_off(ours.unet)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_guides_in_float32(dtype):
    ours = tiny_ba_xl_pipeline().to(dtype)
    clf, classes = tiny_classifier(), torch.tensor([1, 0])
    try:
        with HRecorder(ours.unet) as rec:
            images = run(ours, h_classifier=clf, guidance_mode="sample", target_classes=[1, 0])
    except RuntimeError as error:  # an older CPU build without a half-precision kernel
        if "not implemented for" in str(error):
            pytest.skip(f"this CPU build has no {dtype} kernel for the tiny SDXL: {error}")
        raise
    assert rec.before[0].dtype == dtype and rec.after[0].dtype == dtype
    check_exact_cond_move(rec, clf, classes, pba.DEFAULT_GUIDANCE_STRENGTH, dtype)
    assert np.isfinite(images).all() and clf.weight.dtype == torch.float32


COMPILED_CALL = {"num_inference_steps": 2, "h_classifier": tiny_classifier(), **GUIDED}


def test_a_compiled_unet_guides_after_the_opt_in_without_recompiling(compiles):  # noqa: F811
    backend, graphs = compiles
    eager = tiny_ba_xl_pipeline()
    expected_guided, expected_vanilla = run(eager, **COMPILED_CALL), run(eager, num_inference_steps=2)
    ours = tiny_ba_xl_pipeline()
    pba.install_h_hook(ours.unet.mid_block)  # the documented opt-in, before compiling
    try:
        ours.unet = torch.compile(ours.unet, backend=backend)
        np.testing.assert_allclose(run(ours, **COMPILED_CALL), expected_guided, atol=1e-5)
        compiled = len(graphs)
        np.testing.assert_allclose(run(ours, num_inference_steps=2), expected_vanilla, atol=1e-5)
        assert len(graphs) == compiled  # no recompilation between guided and unguided calls
    finally:
        pba.remove_h_hook(ours.unet.mid_block)
    assert list(ours.unet.mid_block._forward_hooks.values()) == []


def test_an_unguided_call_runs_on_a_fullgraph_unet_and_a_guided_one_is_refused(sdxl, compiles):  # noqa: F811
    backend, graphs = compiles
    ours = tiny_ba_xl_pipeline()
    ours.unet = torch.compile(ours.unet, backend=backend, fullgraph=True)  # no opt-in: nothing on the UNet
    np.testing.assert_allclose(run(ours, num_inference_steps=2), run(sdxl, num_inference_steps=2), atol=1e-5)
    assert len(graphs) == 1
    with pytest.raises(ValueError, match="fullgraph=True"):
        run(ours, **COMPILED_CALL)


# --- loading routes -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(path)
    return path


def check_loaded_pipeline(loaded, sdxl) -> None:
    assert type(loaded).__name__ == "BalancingActXLPipeline"
    loaded.set_progress_bar_config(disable=True)
    plain = run(loaded, num_images_per_prompt=2)
    assert np.array_equal(plain, run(sdxl, num_images_per_prompt=2))
    # a classifier made by the installed module works with a pipeline whose core is diffusers' copy of the module
    guided = run(loaded, num_images_per_prompt=2, h_classifier=tiny_classifier(), **GUIDED)
    assert not np.allclose(plain, guided)
    core = sys.modules[next(c for c in type(loaded).__mro__ if c.__name__ == "BalancingActMixin").__module__]
    assert list(loaded.unet.mid_block._forward_hooks.values()) == [] and core._ACTIVE_H_FUNCTIONS.get() == ()


def test_custom_pipeline_local_file_with_the_core_beside_it(model_dir, modules_cache, sdxl):  # noqa: F811
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(PIPELINE_FILE))
    loaded = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    assert type(loaded).__module__ == "diffusers_modules.local.pipeline_balancing_act_xl"
    local = Path(modules_cache) / "diffusers_modules" / "local"
    assert (local / "pipeline_balancing_act.py").read_bytes() == CORE_FILE.read_bytes()  # the relative import
    mixin = next(c for c in type(loaded).__mro__ if c.__name__ == "BalancingActMixin")
    assert mixin.__module__ == "diffusers_modules.local.pipeline_balancing_act"
    check_loaded_pipeline(loaded, sdxl)


@pytest.mark.usefixtures("modules_cache")
def test_custom_pipeline_folder_holding_pipeline_py_and_the_core(model_dir, sdxl, tmp_path):
    """The layout `balancing-act push --pipeline user/repo --xl` uploads, as a local folder."""
    folder = tmp_path / "sdxl-balanced"
    folder.mkdir()
    shutil.copy(PIPELINE_FILE, folder / "pipeline.py")
    shutil.copy(CORE_FILE, folder / "pipeline_balancing_act.py")
    loaded = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(loaded).__module__ == "diffusers_modules.local.pipeline"
    check_loaded_pipeline(loaded, sdxl)


def test_diffusers_fetches_the_core_and_asks_for_no_package(monkeypatch):
    asked = []
    monkeypatch.setattr(dynamic_modules_utils.importlib, "import_module", lambda name: asked.append(name))
    assert dynamic_modules_utils.check_imports(PIPELINE_FILE) == ["pipeline_balancing_act"]
    assert asked and "pipeline_balancing_act" not in asked


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.usefixtures("modules_cache")
def test_custom_pipeline_hub_repo_holding_both_files(model_dir, sdxl, tmp_path, monkeypatch):
    """A Hub repo holding this file as `pipeline.py` and the core beside it, from a Hub cache made here (the Hub's
    commit answer is given by the test, as in tests/test_loading_routes.py)."""
    hub_cache = tmp_path / "hf_home" / "hub"
    repo = hub_cache / "models--user--sdxl-balanced"
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
    monkeypatch.setattr(
        dynamic_modules_utils, "model_info", lambda repo_id, revision=None, token=None: SimpleNamespace(sha=COMMIT)
    )
    loaded = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="user/sdxl-balanced", trust_remote_code=True)
    package = f"diffusers_modules.local.user--sdxl-balanced.{COMMIT}"
    assert type(loaded).__module__ == f"{package}.pipeline" and f"{package}.pipeline_balancing_act" in sys.modules
    check_loaded_pipeline(loaded, sdxl)


def test_the_installed_module_loads_a_saved_sdxl_pipeline(model_dir, sdxl):
    loaded = BalancingActXLPipeline.from_pretrained(model_dir)
    assert type(loaded) is BalancingActXLPipeline
    check_loaded_pipeline(loaded, sdxl)
