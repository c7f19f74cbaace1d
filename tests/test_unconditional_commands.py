"""`generate`, `evaluate` and `extract` on an unconditional model (a tiny `UNet2DModel` saved as a `DDIMPipeline` and as a
`DDPMPipeline`): the model's kind read from its model_index.json, the pipeline it loads as, calls with `batch_size=`
and no prompt, `--eta`, and one argument error for every option that needs a prompt."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline
from PIL import Image
from tiny_models import tiny_classifier
from unconditional_models import UNCONDITIONAL_H_SHAPE, tiny_scheduler, tiny_unconditional_pipeline, tiny_unet

import h_classifiers.evaluation
from h_classifiers import cli, labellers, preflight
from h_classifiers.commands import _common
from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.commands import generate as generate_command
from h_classifiers.evaluation import EvaluationSpec, load_pipeline, run_configuration, unconditional_model_class
from h_classifiers.extraction import extract_from_generation
from h_classifiers.feature_store import HFeatureStore
from h_classifiers.generation import generate_batches
from h_classifiers.labellers import Labeller
from pipeline_balancing_act import MidBlockHook
from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny unconditional model saved as a DDIMPipeline and as a DDPMPipeline, a skin classifier of its h shape,
    and a Stable Diffusion model index (never loaded: the checks that refuse `--eta` run before loading)."""
    root = tmp_path_factory.mktemp("unconditional-assets")
    DDIMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler()).save_pretrained(root / "ddim")
    DDPMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler()).save_pretrained(root / "ddpm")
    tiny_classifier(scale=0.05, h_shape=UNCONDITIONAL_H_SHAPE).save_pretrained(root / "skin")
    (root / "sd").mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (root / "sd" / "model_index.json").write_text(json.dumps(index))
    return root


def base_argv(assets, model="ddim"):
    return ["--model", str(assets / model), "--classifier", str(assets / "skin"), "--threads", "1"]


class BrightnessLabeller(Labeller):
    """Labels every image, even a tiny untrained model's: 'dark' when its mean pixel is below the middle grey."""

    class_names = ["light", "dark"]
    attribute = "skin"
    source = "test.BrightnessLabeller"

    def label(self, images):
        return torch.tensor([int(np.asarray(image.convert("L")).mean() < 127.5) for image in images])


@pytest.fixture
def brightness_labeller(monkeypatch):
    """`--labeller test:brightness` is a `BrightnessLabeller`."""
    real = labellers.labeller_from_spec

    def labeller_from_spec(spec, **kwargs):
        return BrightnessLabeller() if spec == "test:brightness" else real(spec, **kwargs)

    monkeypatch.setattr(labellers, "labeller_from_spec", labeller_from_spec)
    monkeypatch.setattr(preflight, "LABELLER_KINDS", (*preflight.LABELLER_KINDS, "test"))  # the early check's


class Loading(Exception):
    """Raised where a command would start loading models: the arguments passed the early checks."""


@pytest.fixture
def nothing_loads(monkeypatch):
    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(_common, "quiet_loading", loading)


@pytest.fixture
def loaded(monkeypatch):
    """The pipelines the commands load, and every call made to them (its keyword arguments)."""
    pipes, calls = [], []

    def recording_load(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        call = type(pipe).__call__

        class Recording(type(pipe)):
            def __call__(self, *a, **kw):
                calls.append(kw)
                return call(self, *a, **kw)

        pipe.__class__ = Recording
        pipes.append(pipe)
        return pipe

    monkeypatch.setattr(h_classifiers.evaluation, "load_pipeline", recording_load)  # the commands import it there
    return pipes, calls


def test_the_model_kind_comes_from_model_index(assets, tmp_path):
    assert unconditional_model_class(assets / "ddim") == "DDIMPipeline"
    assert unconditional_model_class(assets / "ddpm") == "DDPMPipeline"
    assert unconditional_model_class(assets / "sd") is None
    assert unconditional_model_class(tmp_path / "missing") is None
    assert unconditional_model_class(tmp_path) is None  # a folder without model_index.json
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MyPipeline", "unet": ["x", "UNet2DModel"]}))
    assert unconditional_model_class(tmp_path) == "MyPipeline"  # a UNet2DModel and no text encoder
    (tmp_path / "model_index.json").write_text("{not json")
    assert unconditional_model_class(tmp_path) is None


def test_an_unconditional_model_loads_as_the_unconditional_pipeline(assets):
    for model in ("ddim", "ddpm"):
        pipe = load_pipeline(assets / model, scheduler="ddim")
        assert isinstance(pipe, BalancingActUnconditionalPipeline)
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="samples with DDIM only"):
        load_pipeline(assets / "ddpm", scheduler="dpm++")


def test_generate_batches_gives_an_unconditional_pipeline_batch_sizes():
    calls = []

    def pipe(generator, **kwargs):
        calls.append({"seeds": [g.initial_seed() for g in generator], **kwargs})
        return "output"

    batches = list(generate_batches(pipe, None, 10, 2, {"target_classes": [0, 1, 1]}, num_images=3, eta=1.0))
    assert [list(b.indices) for b in batches] == [[0, 1], [2]]
    assert calls == [
        {"seeds": [10, 11], "batch_size": 2, "target_classes": [0, 1], "eta": 1.0},
        {"seeds": [12], "batch_size": 1, "target_classes": [1], "eta": 1.0},
    ]
    with pytest.raises(ValueError, match="not both"):
        list(generate_batches(pipe, ["a"], 0, 1, num_images=1))


def test_an_evaluation_spec_without_prompt_calls_the_pipeline_with_batch_sizes():
    calls = []

    def pipe(generator, output_type, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (4, 4))] * kwargs["batch_size"])

    spec = EvaluationSpec(prompt=None, target=[0.5, 0.5], num_images=3, batch_size=2, num_inference_steps=2, eta=1.0)
    assert len(run_configuration(pipe, None, spec, "vanilla").images) == 3
    assert calls == [
        {"batch_size": 2, "num_inference_steps": 2, "eta": 1.0},
        {"batch_size": 1, "num_inference_steps": 2, "eta": 1.0},
    ]
    for configuration in ("prompt", "fair_diffusion"):
        with pytest.raises(ValueError, match="writes the class into the prompt; an unconditional model has none"):
            run_configuration(pipe, None, replace(spec, class_prompts=["a", "b"]), configuration)


def test_generate_on_an_unconditional_model(assets, loaded, brightness_labeller, tmp_path, capsys):
    """Vanilla is DDIMPipeline itself (image i from seed + i, with --eta), the balanced set is guided; no prompt and
    no classifier-free guidance reach the pipeline."""
    pipes, calls = loaded
    argv = base_argv(assets) + ["--num-images", "4", "--batch-size", "4", "--steps", "3", "--eta", "1"]
    argv += ["--strength", "50", "--labeller", "test:brightness", "--save-images", str(tmp_path / "images")]
    report = generate_command.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert isinstance(pipes[0], BalancingActUnconditionalPipeline)
    assert calls and all(
        call["batch_size"] == len(call["generator"]) and call["eta"] == 1.0 and call["num_inference_steps"] in (1, 3)
        for call in calls
    )
    assert not any({"prompt", "guidance_scale", "guided_branches"} & set(call) for call in calls)
    assert {call.get("guidance_mode") for call in calls} == {None, "distribution"}
    assert report["spec"]["prompt"] is None and report["spec"]["guidance_scale"] is None
    assert report["spec"]["eta"] == 1.0
    for name in ("vanilla", "balanced"):
        assert report["results"][name]["num_images"] == 4 and report["results"][name]["fractions"] is not None
    assert "eta 1" in capsys.readouterr().out
    assert (tmp_path / "out" / "generate_grid.png").exists()

    ddim = DDIMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler())
    ddim.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    expected = ddim(batch_size=4, generator=generators, eta=1.0, num_inference_steps=3, output_type="np").images
    expected = (expected * 255).round().astype("uint8")
    for i in range(4):
        with Image.open(tmp_path / "images" / "vanilla" / f"{i:06d}_seed{i}.png") as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected[i])
    manifest = [json.loads(line) for line in (tmp_path / "images" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 8 and all(line["prompt"] is None for line in manifest)
    assert manifest[0]["settings"]["eta"] == 1.0


def test_generate_sample_mode_on_a_ddpm_checkpoint(assets, loaded, brightness_labeller, tmp_path):
    pipes, calls = loaded
    argv = base_argv(assets, "ddpm") + ["--mode", "sample", "--target", "dark", "--num-images", "3", "--steps", "2"]
    report = generate_command.main(argv + ["--labeller", "test:brightness", "--output-dir", str(tmp_path)])
    assert isinstance(pipes[0], BalancingActUnconditionalPipeline)
    assert report["spec"]["eta"] == 0.0  # DDIMPipeline's default
    assert "hit_rate" in report["results"]["balanced"]
    assert [call["target_classes"] for call in calls if call.get("guidance_mode") == "sample"][-1] == [1, 1, 1]


def test_evaluate_on_an_unconditional_model_runs_the_configurations_that_need_no_prompt(
    assets, loaded, brightness_labeller, tmp_path, capsys
):
    argv = base_argv(assets) + [
        "--num-images",
        "4",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--labeller",
        "test:brightness",
    ]
    argv += ["--solver", "chi2", "--target", "0.25,0.75", "--output-dir", str(tmp_path), "--no-progress"]
    report = evaluate_command.main(argv)
    assert list(report["results"]) == ["vanilla", "sample", "distribution"]
    assert all(summary["num_images"] == 4 for summary in report["results"].values())
    assert report["spec"]["prompt"] is None and report["spec"]["guidance"] == {"distribution_solver": "chi2"}
    _, calls = loaded
    assert {call.get("distribution_solver") for call in calls if call.get("guidance_mode") == "distribution"} == {
        "chi2"
    }
    assert (tmp_path / "results.json").exists() and (tmp_path / "fractions.png").exists()
    assert "target met" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command, extra, fragment",
    [
        ("generate", ["--prompt", "a face"], "`--prompt`: for text-to-image models only"),
        ("generate", ["--guidance-scale", "3"], "`--guidance-scale`: for text-to-image models only"),
        ("generate", ["--guided-branches", "both"], "`--guided-branches`: for text-to-image models only"),
        ("evaluate", ["--prompt", "a", "--class-prompts", "a|b"], "`--prompt`, `--class-prompts`: for text-to-image"),
        ("evaluate", ["--configurations", "vanilla,prompt"], "`--configurations` ['prompt']: the prompt and Fair"),
        ("evaluate", ["--configurations", "fair_diffusion"], "an unconditional model takes no prompt; choose from"),
        ("generate", ["--scheduler", "dpm++"], "`--scheduler dpm++`: an unconditional model samples with DDIM only"),
    ],
)
def test_prompt_options_are_refused_for_an_unconditional_model(
    assets, nothing_loads, command, extra, fragment, capsys
):
    with pytest.raises(SystemExit) as info:
        cli.main([command] + base_argv(assets, "ddpm") + extra)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"balancing-act {command}: error: " in last and fragment in last, last
    if "for text-to-image" in fragment:
        assert "is an unconditional model (DDPMPipeline), which generates from noise alone and takes no prompt" in last


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_an_unconditional_model_passes_the_early_checks_without_prompt_options(assets, nothing_loads, command):
    with pytest.raises(Loading):
        cli.main([command] + base_argv(assets) + ["--eta", "0.5", "--scheduler", "ddim"])


def test_eta_is_refused_for_a_text_to_image_model(assets, nothing_loads, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", str(assets / "sd"), "--classifier", str(assets / "skin"), "--eta", "1"])
    assert info.value.code == 2
    assert "`--eta`: for unconditional models (DDIMPipeline / DDPMPipeline) only" in capsys.readouterr().err


def test_a_text_to_image_model_keeps_its_prompt_defaults(assets, monkeypatch):
    seen = {}

    def stop(parser, args, distribution):
        seen.update(vars(args))
        raise Loading

    monkeypatch.setattr(_common, "start_run", stop)
    with pytest.raises(Loading):
        generate_command.main(["--model", str(assets / "sd")])
    assert seen["prompt"] == _common.toy_defaults()["prompt"] and seen["guidance_scale"] == 7.5
    assert seen["eta"] is None and seen["unconditional"] is False
    assert list(h_classifiers.evaluation.DEFAULT_CONFIGURATIONS) == evaluate_command.parse_configurations(None, False)


# ----------------------------------------------------------------------------------------------------------------
# extract: the generation recipe of an unconditional model (no prompt)
# ----------------------------------------------------------------------------------------------------------------


def test_extract_records_h_of_an_unconditional_pipelines_own_generations(tmp_path):
    pipe = tiny_unconditional_pipeline()
    manifest = extract_from_generation(
        pipe, None, 3, tmp_path / "h", BrightnessLabeller(), num_inference_steps=2, seed=5, batch_size=2,
        chunk_size=2, dtype="fp32", progress=False, eta=1.0,
    )  # fmt: skip
    assert manifest["h_shape"] == UNCONDITIONAL_H_SHAPE and manifest["branches"] == ["cond"]
    assert manifest["prompts"] is None and manifest["guidance_scale"] is None
    assert manifest["plan"] == {"num_images": 3, "eta": 1.0} and (manifest["height"], manifest["width"]) == (16, 16)
    assert [r["seed"] for r in manifest["images"]] == [5, 6, 7]
    assert all("prompt" not in r for r in manifest["images"])
    # Reference: the first batch generated directly, h captured with MidBlockHook.
    recorded = []
    with MidBlockHook(pipe.unet, lambda h: recorded.append(h.detach().clone())):
        images = pipe(
            batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], eta=1.0, num_inference_steps=2
        ).images
    assert manifest["labels"][:2] == BrightnessLabeller()(images).tolist()
    store = HFeatureStore(tmp_path / "h")
    for step in range(2):
        features = store.load_timestep(step, drop_unlabelled=False).features
        torch.testing.assert_close(features[:2], recorded[step], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"negative_prompt": "x"}, "takes no prompt"),
        ({"height": 32}, "takes no prompt and makes images of its UNet's size"),
        ({"record_branch": "both"}, "no classifier-free guidance"),
    ],
)
def test_extract_refuses_prompt_settings_for_an_unconditional_pipeline(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_from_generation(tiny_unconditional_pipeline(), None, 2, tmp_path, BrightnessLabeller(), **kwargs)


def test_extract_command_on_an_unconditional_model(assets, brightness_labeller, tmp_path, capsys):
    argv = ["extract", "--model", str(assets / "ddpm"), "--output-dir", str(tmp_path / "h"), "--num-images", "3"]
    argv += ["--labeller", "test:brightness", "--steps", "2", "--eta", "1", "--threads", "1", "--no-progress"]
    cli.main(argv)
    assert f"3 images x 2 steps, h {UNCONDITIONAL_H_SHAPE}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["prompts"] is None and manifest["plan"]["eta"] == 1.0
    assert manifest["scheduler"]["class"] == "DDIMScheduler"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--prompt", "a face"], "`--prompt`: for text-to-image models only"),
        (["--inversion-prompt", "a face"], "`--inversion-prompt`: for text-to-image models only"),
        (["--guidance-scale", "3", "--negative-prompt", "x"], "`--guidance-scale`, `--negative-prompt`: for text"),
        ([], "The generation recipe of an unconditional model needs `--num-images` and `--labeller`."),
    ],
)
def test_extract_refuses_prompt_options_for_an_unconditional_model(assets, extra, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["extract", "--model", str(assets / "ddpm"), "--output-dir", str(tmp_path / "h")] + extra)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "balancing-act extract: error: " in last and fragment in last, last


def test_the_model_card_says_the_features_came_from_an_unconditional_model():
    from h_classifiers.model_card import model_card

    manifest = {"recipe": "generation", "prompts": None, "num_images": 3, "plan": {"num_images": 3, "eta": 1.0}}
    card = str(model_card(tiny_classifier(h_shape=UNCONDITIONAL_H_SHAPE), [], {}, manifest | {"label_source": "x"}))
    assert (
        "h recorded while generating 3 images with the unconditional model (DDIM eta 1), pseudo-labelled by `x`"
        in card
    )
