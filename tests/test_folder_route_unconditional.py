"""The folder recipe (labelled image folders + DDIM inversion, `extract_from_folders`) on an unconditional pixel-space
model, the paper's setting: the toy world's class folders, inversion through the committed toy DDPM, a classifier
trained on the store that guides `BalancingActUnconditionalPipeline`; the inversion against a DDIM generation from
the inverted noise; the settings an unconditional model refuses, in the library and on the command line."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image
from unconditional_models import UNCONDITIONAL_H_SHAPE, tiny_scheduler, tiny_unconditional_pipeline, tiny_unet

from h_classifiers import cli, toy_world
from h_classifiers.extraction import extract_from_folders
from h_classifiers.feature_store import HFeatureStore
from h_classifiers.inversion import ddim_schedule, invert_and_record, load_image
from h_classifiers.toy_world import ATTRIBUTES, TOY_DDPM_PATH, ToyOracle, write_class_folders
from pipeline_balancing_act import HClassifier, MidBlockHook
from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline


TOY_H_SHAPE = [128, 4, 4]  # the toy DDPM's mid-block output


@pytest.fixture(scope="module")
def toy_ddpm() -> BalancingActUnconditionalPipeline:
    pipe = BalancingActUnconditionalPipeline.from_pretrained(str(TOY_DDPM_PATH))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_folder(paths) -> dict:
    return ToyOracle().read([Image.open(path) for path in paths])


# ----------------------------------------------------------------------------------------------------------------
# The toy world's class folders
# ----------------------------------------------------------------------------------------------------------------


def test_class_folders_hold_the_classes_they_name(tmp_path, capsys):
    written = write_class_folders("hair", tmp_path / "hair", 10, seed=3)
    assert list(written) == ATTRIBUTES["hair"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "hair").rglob("*")) == sorted(
        [f"hair/{name}" for name in written] + [f"hair/{name}/{i}.png" for name in written for i in range(10)]
    )
    for k, (name, paths) in enumerate(written.items()):
        read = read_folder(paths)
        assert read["valid"].all() and read["hair"].tolist() == [k] * 10, name
    # The other attributes are drawn, not fixed: both skins appear among the 30 faces.
    assert set(read_folder([p for paths in written.values() for p in paths])["skin"].tolist()) == {0, 1}
    # The same seed gives the same bytes (here through the command line); another seed other faces.
    toy_world.main(["--write-folders", str(tmp_path / "again"), "--attribute", "hair", "--num-per-class", "10", "--seed", "3"])  # fmt: skip
    assert "hair class folders in" in capsys.readouterr().out
    again = tmp_path / "again" / "red" / "2.png"
    assert again.read_bytes() == written["red"][2].read_bytes()
    other = write_class_folders("hair", tmp_path / "other", 10, seed=4)
    assert other["red"][2].read_bytes() != written["red"][2].read_bytes()


def test_class_folders_refuse_a_used_directory_and_bad_arguments(tmp_path, capsys):
    write_class_folders("glasses", tmp_path / "g", 1)
    with pytest.raises(FileExistsError, match="must be a new or empty directory"):
        write_class_folders("glasses", tmp_path / "g", 1)
    with pytest.raises(ValueError, match=r"`attribute` must be one of \['skin', 'glasses', 'hair'\], got 'age'"):
        write_class_folders("age", tmp_path / "a", 1)
    with pytest.raises(ValueError, match="`num_per_class` must be a positive integer, got 0"):
        write_class_folders("skin", tmp_path / "s", 0)
    with pytest.raises(SystemExit):
        toy_world.main(["--write-folders", str(tmp_path / "g"), "--attribute", "glasses"])
    assert "must be a new or empty directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Folders -> inversion -> train -> guidance, on the toy DDPM
# ----------------------------------------------------------------------------------------------------------------


def test_folders_train_a_classifier_that_guides_the_unconditional_pipeline(toy_ddpm, tmp_path, capsys):
    faces = tmp_path / "skin"
    write_class_folders("skin", faces, 6, seed=0)
    features, classifier_dir = tmp_path / "features", tmp_path / "classifier"
    cli.main(
        ["extract", "--model", str(TOY_DDPM_PATH), "--image-dir", str(faces), "--output-dir", str(features)]
        + ["--class-names", "light,dark", "--attribute", "skin", "--steps", "5", "--batch-size", "4"]
        + ["--chunk-size", "8", "--threads", "1", "--no-progress"]
    )
    assert f"12 images x 5 steps, h {TOY_H_SHAPE}" in capsys.readouterr().out
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["recipe"] == "inversion" and manifest["label_source"] == "folders"
    assert manifest["prompts"] is None and manifest["guidance_scale"] is None and manifest["branches"] == ["cond"]
    assert (manifest["height"], manifest["width"]) == (32, 32) and manifest["class_counts"] == {"light": 6, "dark": 6}
    # The heads' timesteps are those a 5-step generation of the pipeline runs.
    toy_ddpm.scheduler.set_timesteps(5)
    assert manifest["timesteps"] == toy_ddpm.scheduler.timesteps.tolist()

    cli.main(["train", "--features-dir", str(features), "--output-dir", str(classifier_dir)]
             + ["--min-steps", "50", "--threads", "1", "--no-progress"])  # fmt: skip
    classifier = HClassifier.from_pretrained(classifier_dir)
    assert classifier.config.h_shape == TOY_H_SHAPE and classifier.config.timesteps == manifest["timesteps"]
    assert classifier.config.class_names == ["light", "dark"] and classifier.config.attribute == "skin"
    card = (classifier_dir / "README.md").read_text()
    assert "DDIM inversion (eta = 0) of 12 labelled images (one folder per class) with the unconditional model" in card
    # The heads read the inverted faces' skin: at the last (cleanest) step every training image is classified right.
    last = HFeatureStore(features).load_timestep(4)
    with torch.no_grad():
        predicted = classifier(last.features.float(), manifest["timesteps"][4]).argmax(-1)
    assert predicted.tolist() == last.labels.tolist()

    def generate(**guidance):
        generator = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return toy_ddpm(batch_size=2, generator=generator, num_inference_steps=5, output_type="np", **guidance).images

    vanilla = generate()
    guided = generate(h_classifier=classifier, guidance_mode="sample", target_classes="dark")
    assert guided.shape == vanilla.shape == (2, 32, 32, 3) and torch.isfinite(torch.from_numpy(guided)).all()
    assert abs(guided - vanilla).max() > 0.05


# ----------------------------------------------------------------------------------------------------------------
# The inversion on a pixel model: DDIM generation from the inverted noise gives the image and its h back
# ----------------------------------------------------------------------------------------------------------------


def test_ddim_generation_from_the_inverted_noise_retraces_the_inversion(toy_ddpm, tmp_path):
    """The toy DDPM's scheduler clips the predicted image (`clip_sample`, as DDPM checkpoints do); clipping at the
    noisy steps moves a generation off any inverted path, so this check runs the same model without it."""
    pipe = BalancingActUnconditionalPipeline(
        unet=toy_ddpm.unet, scheduler=DDIMScheduler.from_config(toy_ddpm.scheduler.config, clip_sample=False)
    )
    written = write_class_folders("glasses", tmp_path / "glasses", 1, seed=5)
    images = torch.stack([load_image(paths[0], 32, 32) for paths in written.values()])  # no image processor
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.5 and images.max() > 0.5
    steps = 50
    recorded, inverted = invert_and_record(pipe, images, ddim_schedule(pipe, steps), storage_dtype=torch.float32)
    assert len(recorded) == steps and list(recorded[0].shape) == [2, *TOY_H_SHAPE]

    seen = []
    pipe.scheduler.set_timesteps(steps)
    sample = inverted
    with torch.no_grad(), MidBlockHook(pipe.unet, lambda h: seen.append(h.detach().clone())):
        for t in pipe.scheduler.timesteps:  # DDIMPipeline's loop with eta = 0, from the inverted noise
            sample = pipe.scheduler.step(pipe.unet(sample, t).sample, t, sample, eta=0.0).prev_sample
    error = (sample - images).abs()
    apart = (images[0] - images[1]).abs().mean()  # how far apart two faces are
    assert (inverted - images).abs().mean() > 0.5  # the inversion did move the images to noise
    assert error.mean() < 0.05 < 0.2 * apart, (error.mean(), apart)
    # nearly every pixel retraces closely (a few on the faces' edges less: DDIM inversion is first order)
    assert error.flatten().quantile(0.99) < 0.15 and error.max() < 0.6
    torch.testing.assert_close(seen[0], recorded[0])  # the same noise at the same timestep
    relative = [float((a - b).norm() / b.norm()) for a, b in zip(recorded, seen)]
    assert max(relative) < 0.1, relative


def test_a_pixel_model_inverts_the_folders_at_its_unet_size(tmp_path):
    """A tiny UNet2DModel of 16 x 16 images: the 32 x 32 faces are resized, and the store holds exactly the h that
    `invert_and_record` records for each image."""
    pipe = tiny_unconditional_pipeline()
    write_class_folders("skin", tmp_path / "faces", 2, seed=1)
    manifest = extract_from_folders(
        pipe, tmp_path / "faces", tmp_path / "h", num_inference_steps=3, batch_size=4, chunk_size=4, dtype="fp32",
        progress=False,
    )  # fmt: skip
    assert manifest["h_shape"] == UNCONDITIONAL_H_SHAPE and (manifest["height"], manifest["width"]) == (16, 16)
    assert manifest["prompts"] is None and manifest["negative_prompt"] is None
    assert manifest["class_names"] == ["dark", "light"] and manifest["labels"] == [0, 0, 1, 1]
    images = torch.stack([load_image(tmp_path / "faces" / r["path"], 16, 16) for r in manifest["images"]])
    expected, _ = invert_and_record(pipe, images, ddim_schedule(pipe, 3), storage_dtype=torch.float32)
    store = HFeatureStore(tmp_path / "h")
    for step in range(3):
        torch.testing.assert_close(store.load_timestep(step).features, expected[step], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# What an unconditional model refuses
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"inversion_prompt": "a face"}, r"\['inversion_prompt'\]: an unconditional pipeline takes no prompt"),
        ({"guidance_scale": 3.0}, r"\['guidance_scale'\]: an unconditional pipeline takes no prompt"),
        ({"negative_prompt": "x"}, r"\['negative_prompt'\]: an unconditional pipeline takes no prompt"),
        ({"height": 32, "width": 32}, r"\['height', 'width'\]: .* makes images of its UNet's size"),
        ({"record_branch": "both"}, "`record_branch='both'`: an unconditional pipeline has no classifier-free"),
    ],
)
def test_the_folder_recipe_refuses_prompt_settings_for_an_unconditional_pipeline(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_from_folders(tiny_unconditional_pipeline(), tmp_path, tmp_path / "h", **kwargs)
    assert not (tmp_path / "h").exists()


def test_the_folder_recipe_refuses_a_latent_model_without_text_encoder(tmp_path):
    pipe = SimpleNamespace(text_encoder=None, vae=object(), unet=tiny_unet())
    with pytest.raises(ValueError, match="`pipe` has a VAE but no text encoder"):
        extract_from_folders(pipe, tmp_path, tmp_path / "h")


def test_the_inversion_refuses_a_condition_for_an_unconditional_unet():
    pipe, images = tiny_unconditional_pipeline(), torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="`prompt_embeds` must be None and `guidance_scale` 1, got embeddings"):
        invert_and_record(pipe, images, ddim_schedule(pipe, 2), torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="`guidance_scale` 1, got None and 2.0"):
        invert_and_record(pipe, images, ddim_schedule(pipe, 2), guidance_scale=2.0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ddim")
    DDIMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler()).save_pretrained(path)
    return path


def test_the_extract_command_inverts_folders_with_an_unconditional_model(tiny_model_dir, tmp_path, capsys):
    write_class_folders("glasses", tmp_path / "faces", 2, seed=2)
    argv = ["extract", "--model", str(tiny_model_dir), "--image-dir", str(tmp_path / "faces")]
    cli.main(argv + ["--output-dir", str(tmp_path / "h"), "--steps", "2", "--threads", "1", "--no-progress"])
    assert f"4 images x 2 steps, h {UNCONDITIONAL_H_SHAPE}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["recipe"] == "inversion" and manifest["prompts"] is None and manifest["height"] == 16


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--inversion-prompt", "a face"], "`--inversion-prompt`: for text-to-image models only"),
        (["--guidance-scale", "3", "--height", "32"], "`--guidance-scale`, `--height`: for text-to-image models only"),
        (["--eta", "1"], "`--eta 1`: the inversion recipe is deterministic DDIM (eta 0)"),
        (["--num-images", "3"], "['--num-images'] apply to the generation recipe only"),
        (["--record-branch", "uncond"], "`record_branch='uncond'`: an unconditional pipeline has no classifier-free"),
    ],
)
def test_the_extract_command_refuses_prompt_options_with_image_dir(tiny_model_dir, extra, fragment, tmp_path, capsys):
    write_class_folders("skin", tmp_path / "faces", 1)
    argv = ["extract", "--model", str(tiny_model_dir), "--image-dir", str(tmp_path / "faces")]
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--output-dir", str(tmp_path / "h"), "--threads", "1"] + extra)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "balancing-act extract: error: " in last and fragment in last, last
    assert not (tmp_path / "h").exists()
