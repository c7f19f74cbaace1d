"""The commands on an SDXL model (the tiny SDXL of tests/tiny_xl.py saved as a `StableDiffusionXLPipeline`): the kind
read from model_index.json, the pipeline it loads as, `generate` and `evaluate` with SDXL's defaults and
`--height/--width`, `extract` by both recipes (the inversion with SDXL's pooled embedding and size ids), `--pool-size`,
`train` on the store, and the argument errors before anything loads."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image
from tiny_models import CLASSIFIER_TIMESTEPS, H_SHAPE, tiny_classifier
from tiny_xl import tiny_ba_xl_pipeline, tiny_sdxl_pipeline

import h_classifiers.evaluation
from h_classifiers import HClassifier, cli, labellers, preflight
from h_classifiers.commands import _common
from h_classifiers.commands import evaluate as evaluate_command
from h_classifiers.commands import generate as generate_command
from h_classifiers.evaluation import load_pipeline, xl_model_class
from h_classifiers.feature_store import HFeatureStore
from h_classifiers.inversion import encode_inversion_prompt, invert_and_record
from h_classifiers.labellers import Labeller
from pipeline_balancing_act import MidBlockHook
from pipeline_balancing_act_xl import BalancingActXLPipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny SDXL saved by `save_pretrained` (16 px images, h [64, 4, 4]; at 32 px h is [64, 8, 8]), a flat skin
    classifier of its default h shape, and four labelled 16 px images in light/ and dark/."""
    root = tmp_path_factory.mktemp("xl-assets")
    tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    tiny_classifier(scale=0.05).save_pretrained(root / "skin")
    for k, name in enumerate(("light", "dark")):
        (root / "faces" / name).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(2 * k + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "faces" / name / f"{i}.png")
    return root


def base_argv(assets, classifier="skin"):
    return ["--model", str(assets / "sdxl"), "--classifier", str(assets / classifier), "--threads", "1"]


class ParityLabeller(Labeller):
    """Labels every image, even an untrained model's, in both classes: the parity of its pixel sum."""

    class_names = ["light", "dark"]
    attribute = "skin"
    source = "test.ParityLabeller"

    def label(self, images):
        return torch.tensor([int(np.asarray(image).sum()) % 2 for image in images])


@pytest.fixture
def parity_labeller(monkeypatch):
    """`--labeller test:parity` is a `ParityLabeller`."""
    real = labellers.labeller_from_spec

    def labeller_from_spec(spec, **kwargs):
        return ParityLabeller() if spec == "test:parity" else real(spec, **kwargs)

    monkeypatch.setattr(labellers, "labeller_from_spec", labeller_from_spec)
    monkeypatch.setattr(preflight, "LABELLER_KINDS", (*preflight.LABELLER_KINDS, "test"))  # the early check's


@pytest.fixture
def loaded(monkeypatch):
    """The pipelines the commands load, and the keyword arguments of every call made to them."""
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


class Loading(Exception):
    """Raised where a command would start loading models: the arguments passed the early checks."""


@pytest.fixture
def nothing_loads(monkeypatch):
    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(_common, "quiet_loading", loading)


def test_the_sdxl_kind_comes_from_model_index(assets, tmp_path, monkeypatch):
    assert xl_model_class(assets / "sdxl") == "StableDiffusionXLPipeline"
    assert preflight.unconditional_model_class(assets / "sdxl") is None
    for index, expected in [
        (
            {"_class_name": "MyPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
            "MyPipeline",
        ),
        ({"_class_name": "MyPipeline", "tokenizer_2": ["transformers", "CLIPTokenizer"]}, "MyPipeline"),
        ({"_class_name": "BalancingActXLPipeline"}, "BalancingActXLPipeline"),
        ({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}, None),
    ]:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
        assert xl_model_class(tmp_path) == expected, index
    assert xl_model_class(tmp_path / "missing") is None
    # A Hub id's index is read with huggingface_hub (here answered from the saved folder, offline).
    import huggingface_hub

    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(assets / "sdxl" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert xl_model_class("someone/sdxl") == "StableDiffusionXLPipeline"
    assert asked == [("someone/sdxl", "model_index.json")]


def test_an_sdxl_model_loads_as_the_xl_pipeline_with_the_scheduler_asked(assets):
    pipe = load_pipeline(assets / "sdxl", scheduler="ddim", safety_checker=False)
    assert type(pipe) is BalancingActXLPipeline and type(pipe.scheduler) is DDIMScheduler
    assert pipe.scheduler.config.timestep_spacing == "leading"  # SDXL's scheduler config, another class


def test_generate_on_sdxl_is_stock_sdxl_without_guidance_and_guides_at_another_size(
    assets, loaded, parity_labeller, tmp_path, capsys
):
    pipes, calls = loaded
    argv = base_argv(assets) + ["--num-images", "3", "--batch-size", "3", "--steps", "2", "--strength", "50"]
    argv += ["--labeller", "test:parity", "--save-images", str(tmp_path / "images")]
    report = generate_command.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert type(pipes[0]).__mro__[1] is BalancingActXLPipeline
    assert report["spec"]["guidance_scale"] == 5.0  # SDXL's default, not Stable Diffusion's 7.5
    assert all(call["guidance_scale"] == 5.0 and "height" not in call for call in calls)
    assert {call.get("guidance_mode") for call in calls} == {None, "distribution"}
    assert report["results"]["balanced"]["fractions"] is not None
    # The vanilla set is StableDiffusionXLPipeline's own images from the same folder, scheduler and seeds.
    stock = StableDiffusionXLPipeline.from_pretrained(assets / "sdxl")
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    expected = stock([report["spec"]["prompt"]] * 3, num_inference_steps=2, generator=generators, output_type="np")
    expected = (expected.images * 255).round().astype("uint8")
    for i in range(3):
        with Image.open(tmp_path / "images" / "vanilla" / f"{i:06d}_seed{i}.png") as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected[i])

    # At 32 px h is [64, 8, 8]: a pooled classifier reads it (the flat one is refused: see below).
    pooled = HClassifier(
        attribute="skin", class_names=["light", "dark"], h_shape=H_SHAPE, timesteps=CLASSIFIER_TIMESTEPS, pool_size=2
    )
    with torch.no_grad():
        pooled.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    heads = pooled.weight.shape[0]
    pooled.set_calibration([1.0] * heads, [[0.0, 0.0]] * heads)
    pooled.set_anchors(pooled.weight.detach(), "weights")
    pooled.save_pretrained(tmp_path / "pooled")
    calls.clear()
    argv = base_argv(assets) + ["--classifier", str(tmp_path / "pooled"), "--mode", "sample", "--target", "dark"]
    argv += ["--num-images", "2", "--steps", "2", "--height", "32", "--width", "32", "--labeller", "none"]
    generate_command.main(argv + ["--output-dir", str(tmp_path / "out32")])
    assert all(call["height"] == call["width"] == 32 for call in calls)
    assert "height 32, width 32" in capsys.readouterr().out
    with Image.open(tmp_path / "out32" / "generate_grid.png") as grid:
        assert grid.height >= 32


def test_evaluate_on_sdxl_runs_the_text_configurations_but_fair_diffusion(assets, loaded, parity_labeller, tmp_path):
    argv = base_argv(assets) + ["--num-images", "2", "--batch-size", "2", "--steps", "2", "--labeller", "test:parity"]
    argv += ["--class-prompts", "a light face|a dark face", "--output-dir", str(tmp_path), "--no-progress"]
    report = evaluate_command.main(argv)
    assert list(report["results"]) == ["vanilla", "sample", "distribution", "prompt"]
    assert report["spec"]["guidance_scale"] == 5.0
    _, calls = loaded
    assert {tuple(call["prompt"]) for call in calls if call.get("guidance_mode") is None} >= {
        ("a photo of a face",) * 2,
        ("a light face", "a dark face"),
    }
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "command, extra, fragment",
    [
        ("generate", ["--eta", "1"], "`--eta`: for unconditional models (DDIMPipeline / DDPMPipeline) only"),
        ("generate", ["--height", "32"], "gives h of shape [64, 8, 4] at the asked size (`--height` 32"),
        ("evaluate", ["--configurations", "vanilla,fair_diffusion"], "SEGA pipeline, which has no SDXL version"),
        ("extract", ["--eta", "1"], "is a text-to-image model (StableDiffusionXLPipeline)"),
        ("extract", ["--prompt", "a", "--pool-size", "5"], "`--pool-size` 5 is larger than h, whose shape is [64, 4"),
    ],
)
def test_argument_errors_on_sdxl_before_anything_loads(
    assets, nothing_loads, command, extra, fragment, tmp_path, capsys
):
    argv = (
        base_argv(assets) if command != "extract" else ["--model", str(assets / "sdxl"), "--output-dir", str(tmp_path)]
    )
    with pytest.raises(SystemExit) as info:
        cli.main([command] + argv + extra)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"balancing-act {command}: error: " in last and fragment in last, last


def test_extract_by_generation_with_pooling_then_train(assets, parity_labeller, tmp_path, capsys):
    features, classifier_dir = tmp_path / "features", tmp_path / "classifier"
    cli.main(
        ["extract", "--model", str(assets / "sdxl"), "--prompt", "a face", "--num-images", "6", "--steps", "2"]
        + ["--labeller", "test:parity", "--pool-size", "2", "--batch-size", "3", "--storage-dtype", "fp32"]
        + ["--output-dir", str(features), "--threads", "1", "--no-progress"]
    )
    assert "6 images x 2 steps, h [64, 2, 2] (h [64, 4, 4] average-pooled)" in capsys.readouterr().out
    store = HFeatureStore(features)
    assert store.manifest["guidance_scale"] == 5.0 and store.manifest["scheduler"]["class"] == "DDIMScheduler"
    # The store holds the pooled h of the conditional rows of the pipeline's own generation of images 0-2.
    pipe = load_pipeline(assets / "sdxl", scheduler="ddim")
    recorded = []
    with MidBlockHook(pipe.unet, lambda h: recorded.append(F.adaptive_avg_pool2d(h[3:], 2))):
        pipe(["a face"] * 3, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    for step in range(2):
        stored = store.load_timestep(step, drop_unlabelled=False).features[:3]
        torch.testing.assert_close(stored, recorded[step], atol=1e-5, rtol=1e-4)

    cli.main(["train", "--features-dir", str(features), "--output-dir", str(classifier_dir)]
             + ["--min-steps", "5", "--threads", "1", "--no-progress"])  # fmt: skip
    classifier = HClassifier.from_pretrained(classifier_dir)
    assert classifier.config.pool_size == 2 and classifier.config.timesteps == store.manifest["timesteps"]
    assert store.manifest["pipeline"] == "BalancingActXLPipeline"  # the card's usage names the pipeline that guides
    assert "from pipeline_balancing_act_xl import BalancingActXLPipeline" in (classifier_dir / "README.md").read_text()
    preflight.check_classifier_fits(classifier_dir, assets / "sdxl", height=32, width=32)  # any size of this model


def test_the_inversion_conditions_the_unet_as_sdxl_generation_does():
    """`encode_inversion_prompt` gives the UNet what `StableDiffusionXLPipeline.__call__` gives it at the same size,
    with and without classifier-free guidance: the prompt embeddings, the pooled embedding, the size ids."""
    pipe = tiny_ba_xl_pipeline()
    for guidance_scale in (1.0, 2.0):
        seen = []
        pipe.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs) if not seen else None, with_kwargs=True
        )
        pipe("a face", height=32, width=16, num_inference_steps=1, guidance_scale=guidance_scale, output_type="latent")
        pipe.unet._forward_pre_hooks.clear()
        embeds, added = encode_inversion_prompt(pipe, "a face", None, guidance_scale > 1, 32, 16).rows(
            1, guidance_scale > 1
        )
        torch.testing.assert_close(embeds, seen[0]["encoder_hidden_states"])
        assert set(added) == {"text_embeds", "time_ids"}
        for key in added:
            torch.testing.assert_close(added[key], seen[0]["added_cond_kwargs"][key])
    assert added["time_ids"].tolist() == [[32.0, 16.0, 0.0, 0.0, 32.0, 16.0]] * 2


def test_an_sdxl_vae_in_float16_encodes_in_float32_and_goes_back():
    pipe = tiny_ba_xl_pipeline()
    pipe.vae.to(torch.float16)
    dtypes = []

    class Stop(Exception):
        pass

    def encode(images):
        dtypes.append((images.dtype, pipe.vae.dtype))
        raise Stop

    pipe.vae.encode = encode
    with pytest.raises(Stop):
        invert_and_record(pipe, torch.zeros(1, 3, 16, 16), None, torch.zeros(1, 77, 96))
    assert dtypes == [(torch.float32, torch.float32)] and pipe.vae.dtype == torch.float16


def test_extract_by_inversion_on_sdxl(assets, tmp_path, capsys):
    cli.main(
        ["extract", "--model", str(assets / "sdxl"), "--image-dir", str(assets / "faces"), "--steps", "2"]
        + ["--class-names", "light,dark", "--attribute", "skin", "--batch-size", "4", "--guidance-scale", "2"]
        + ["--record-branch", "both", "--output-dir", str(tmp_path), "--threads", "1", "--no-progress"]
    )
    assert f"4 images x 2 steps, h {H_SHAPE}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"] == "inversion" and manifest["prompts"] == [""] and manifest["guidance_scale"] == 2.0
    assert (manifest["height"], manifest["width"]) == (16, 16) and manifest["branches"] == ["uncond", "cond"]
    assert manifest["class_counts"] == {"light": 2, "dark": 2} and manifest["pipeline"] == "BalancingActXLPipeline"
    store = HFeatureStore(tmp_path)
    uncond, cond = (store.load_timestep(1, branches=[branch]).features for branch in ("uncond", "cond"))
    assert cond.shape == uncond.shape == (4, *H_SHAPE) and torch.isfinite(cond).all()
    assert (cond - uncond).abs().max() > 1e-3  # the rows saw their own text condition
