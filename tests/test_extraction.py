"""h extraction: both recipes end to end on the tiny pipeline, storage format, resume, corrupt images, reader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tiny_models import tiny_components

from h_classifiers import MidBlockHook, toy_world
from h_classifiers.extraction import extract_from_folders, extract_from_generation
from h_classifiers.feature_store import CHUNK_INFO_NAME, HFeatureStore, step_file_name
from h_classifiers.inversion import ddim_schedule, invert_and_record
from h_classifiers.labellers import Labeller


STEPS = 4
H_SHAPE = [64, 4, 4]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ParityLabeller(Labeller):
    """Deterministic labels from pixel content; -1 for some images (to exercise unlabelled rows)."""

    class_names = ["even", "odd"]
    attribute = "parity"
    source = "test:parity"

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def label(self, images):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return torch.tensor([int(np.asarray(im).sum()) % 3 - 1 for im in images])


def _save(tensor: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Toy faces in light/ and dark/ (3 + 2) plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    data = toy_world.render_faces(
        {
            "skin": torch.tensor([0, 0, 0, 1, 1]),
            "glasses": torch.zeros(5, dtype=torch.long),
            "hair": torch.zeros(5, dtype=torch.long),
        },
        torch.Generator().manual_seed(0),
        image_size=24,  # not the model's 16 px: exercises resize + centre crop
    )
    for i, skin in enumerate([0, 0, 0, 1, 1]):
        _save(data[i], root / toy_world.ATTRIBUTES["skin"][skin] / f"{i:02d}.png")
    (root / "light" / "zz_corrupt.png").write_bytes(b"this is not a png")
    return root


def _tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_inversion_recipe_end_to_end(sd_pipe, image_dir, tmp_path):
    with pytest.warns(UserWarning) as caught:
        manifest = extract_from_folders(
            sd_pipe, image_dir, tmp_path / "out", num_inference_steps=STEPS, batch_size=2, chunk_size=4,
            class_names=["light", "dark"], attribute="skin", progress=False,
        )  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert any("zz_corrupt.png" in m for m in messages) and any("1 image(s) could not be read" in m for m in messages)
    # The corrupt image is skipped and counted; the others are labelled by folder.
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["path"] == "light/zz_corrupt.png"
    assert manifest["num_images"] == 5 and manifest["class_counts"] == {"light": 3, "dark": 2}
    assert manifest["recipe"] == "inversion" and manifest["label_source"] == "folders"
    assert manifest["h_shape"] == H_SHAPE and manifest["dtype"] == "float16" and manifest["complete"]
    assert manifest["timesteps"] == ddim_schedule(sd_pipe, STEPS).timesteps.tolist()
    assert manifest["scheduler"]["class"] == "DDIMScheduler" and "beta_schedule" in manifest["scheduler"]["config"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["labels"] == manifest["labels"] == [0, 0, 0, 1, 1]
    # Two chunks of 4 planned images (the corrupt one is in the second), one file per step, no temporary leftovers.
    chunks = sorted((tmp_path / "out" / "chunks").iterdir())
    assert [c.name for c in chunks] == ["chunk_00000", "chunk_00001"]
    for chunk in chunks:
        assert sorted(p.name for p in chunk.iterdir()) == sorted(
            [CHUNK_INFO_NAME] + [step_file_name(s) for s in range(STEPS)]
        )
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    # One timestep's slice, read alone.
    store = HFeatureStore(tmp_path / "out")
    for step in range(STEPS):
        data = store.load_timestep(step)
        assert data.features.shape == (5, *H_SHAPE) and data.features.dtype == torch.float16
        assert data.labels.tolist() == [0, 0, 0, 1, 1] and data.image_index.tolist() == [
            0,
            1,
            2,
            4,
            5,
        ]  # 3 is the corrupt file
        assert torch.isfinite(data.features.float()).all()
    # Different steps and different images give different h (h is not repeated across a batch).
    first, last = store.load_timestep(0).features.float(), store.load_timestep(STEPS - 1).features.float()
    assert not torch.allclose(first, last)
    assert (first[0] - first[1]).abs().max() > 1e-3


def test_inversion_is_batch_independent(sd_pipe, image_dir, tmp_path):
    """Batch 3 stores the same h as batch 1 (the authors' inversion was right only for batch 1)."""
    kwargs = {"num_inference_steps": STEPS, "chunk_size": 8, "dtype": "fp32", "progress": False}
    with pytest.warns(UserWarning):
        extract_from_folders(sd_pipe, image_dir, tmp_path / "b1", batch_size=1, **kwargs)
    with pytest.warns(UserWarning):
        extract_from_folders(sd_pipe, image_dir, tmp_path / "b3", batch_size=3, **kwargs)
    one, three = HFeatureStore(tmp_path / "b1"), HFeatureStore(tmp_path / "b3")
    for step in range(STEPS):
        a, b = one.load_timestep(step), three.load_timestep(step)
        assert a.features.dtype == torch.float32
        torch.testing.assert_close(a.features, b.features, atol=2e-3, rtol=1e-2)  # batched matmuls round differently
        assert torch.equal(a.labels, b.labels)


def test_ddim_inversion_round_trip():
    """With a UNet whose prediction is a known constant, inverting then generating with DDIM (eta = 0) from the
    inverted latent gives back the clean latent: checks the schedule bookkeeping of the inversion."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.conv_out.weight.zero_()
        pipe.unet.conv_out.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.05]))
    images = toy_world.make_toy_dataset(2, seed=1, image_size=16).images * 2 - 1
    scheduler = ddim_schedule(pipe, 10)
    embeds, _ = pipe.encode_prompt("a face", "cpu", 2, False)
    unet_calls = []
    with MidBlockHook(pipe.unet, lambda h: unet_calls.append(h.shape[0])):
        hs, inverted = invert_and_record(pipe, images, scheduler, embeds, storage_dtype=torch.float32)
    assert len(hs) == 10 and len(unet_calls) == 11  # one extra call moves the clean latent to the first level
    with torch.no_grad():
        clean = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
    pipe.scheduler = scheduler
    out = pipe(["a face"] * 2, num_inference_steps=10, guidance_scale=1.0, latents=inverted, output_type="latent")
    assert (inverted - clean).abs().mean() > 0.1  # the inversion did move the latent
    torch.testing.assert_close(out.images, clean, atol=1e-4, rtol=1e-3)


def test_generation_recipe_records_the_conditional_rows(sd_pipe, tmp_path):
    labeller = ParityLabeller()
    manifest = extract_from_generation(
        sd_pipe, ["a photo of a face", "a face"], 5, tmp_path / "gen", labeller, num_inference_steps=STEPS,
        guidance_scale=3.0, record_branch="both", seed=7, batch_size=2, chunk_size=3, dtype="fp32", progress=False,
    )  # fmt: skip
    assert manifest["branches"] == ["uncond", "cond"] and manifest["recipe"] == "generation"
    assert manifest["label_source"] == "test:parity" and manifest["class_names"] == ["even", "odd"]
    assert [r["seed"] for r in manifest["images"]] == [7, 8, 9, 10, 11]
    assert [r["prompt"] for r in manifest["images"]][:3] == ["a photo of a face", "a face", "a photo of a face"]
    # Reference: the same images generated directly, h captured with MidBlockHook.
    recorded = []
    with MidBlockHook(sd_pipe.unet, lambda h: recorded.append(h.detach().clone())):
        images = sd_pipe(
            ["a photo of a face", "a face", "a photo of a face"], num_inference_steps=STEPS, guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)],
        ).images  # fmt: skip
    expected_labels = ParityLabeller()(images)
    assert manifest["labels"][:3] == expected_labels.tolist()
    store = HFeatureStore(tmp_path / "gen")
    for step in range(STEPS):
        cond = store.load_timestep(step, branches="cond", drop_unlabelled=False)
        uncond = store.load_timestep(step, branches=["uncond"], drop_unlabelled=False)
        torch.testing.assert_close(cond.features[:3], recorded[step][3:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(uncond.features[:3], recorded[step][:3], atol=1e-5, rtol=1e-4)
        both = store.load_timestep(step)  # both branches, unlabelled rows dropped
        keep = torch.tensor(manifest["labels"]) >= 0
        assert both.features.shape[0] == 2 * int(keep.sum())


def test_resume_after_interruption_gives_identical_shards(sd_pipe, tmp_path):
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 2.0, "batch_size": 2, "chunk_size": 4, "progress": False}
    full = extract_from_generation(sd_pipe, "a face", 10, tmp_path / "full", ParityLabeller(), **kwargs)
    # Interrupted in the middle of the second chunk (the labeller raises on its 3rd batch).
    with pytest.raises(KeyboardInterrupt):
        extract_from_generation(sd_pipe, "a face", 10, tmp_path / "resumed", ParityLabeller(fail_on_call=3), **kwargs)
    partial = HFeatureStore(tmp_path / "resumed")
    assert [c.name for c in partial.chunk_dirs] == ["chunk_00000"]
    assert partial.manifest["complete"] is False
    resumed_labeller = ParityLabeller()
    resumed = extract_from_generation(sd_pipe, "a face", 10, tmp_path / "resumed", resumed_labeller, **kwargs)
    assert resumed_labeller.calls == 3  # chunk 0 is kept; chunks 1 and 2 are generated (2 + 1 batches)
    assert resumed["complete"] and resumed["images"] == full["images"]
    index = [r["index"] for r in resumed["images"]]
    assert index == sorted(set(index)) == list(range(10))  # no duplicates
    for chunk in sorted((tmp_path / "full" / "chunks").iterdir()):
        twin = tmp_path / "resumed" / "chunks" / chunk.name
        for name in [step_file_name(s) for s in range(STEPS)]:
            a, b = _tensors(chunk / name), _tensors(twin / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "resumed").rglob(".tmp-*"))


def test_refuses_a_different_run_in_the_same_directory(sd_pipe, tmp_path):
    extract_from_generation(
        sd_pipe, "a face", 2, tmp_path / "out", ParityLabeller(), num_inference_steps=2, progress=False
    )
    with pytest.raises(ValueError, match="num_inference_steps"):
        extract_from_generation(
            sd_pipe, "a face", 2, tmp_path / "out", ParityLabeller(), num_inference_steps=3, progress=False
        )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        extract_from_generation(sd_pipe, "a face", 2, tmp_path / "other", ParityLabeller(), progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "int8"}, "`dtype` must be one of"),
        ({"record_branch": "uncond", "guidance_scale": 1.0}, "needs classifier-free guidance"),
        ({"record_branch": "left"}, "`record_branch` must be one of"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"height": 15}, "multiple of the VAE scale factor"),
    ],
)
def test_generation_argument_errors(sd_pipe, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_from_generation(sd_pipe, "a face", 2, tmp_path / "out", ParityLabeller(), progress=False, **kwargs)


def test_folder_argument_errors(sd_pipe, image_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="image_dir"):
        extract_from_folders(sd_pipe, tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="must name exactly the sub-folders"):
        extract_from_folders(sd_pipe, image_dir, tmp_path / "out", class_names=["light", "medium"])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        HFeatureStore(tmp_path / "none")


@pytest.fixture(scope="module")
def saved_model(sd_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    sd_pipe.save_pretrained(path)
    return path


def test_extract_command_both_recipes(saved_model, image_dir, tmp_path, capsys):
    from h_classifiers.commands.extract import main

    common = ["--model", str(saved_model), "--steps", "3", "--batch-size", "2", "--no-progress"]
    with pytest.warns(UserWarning):
        main(
            common
            + ["--image-dir", str(image_dir), "--class-names", "light,dark", "--output-dir", str(tmp_path / "a")]
        )
    assert "5 images x 3 steps" in capsys.readouterr().out
    assert HFeatureStore(tmp_path / "a").class_names == ["light", "dark"]
    main(
        common
        + ["--prompt", "a face", "--num-images", "3", "--labeller", "toy:glasses", "--output-dir", str(tmp_path / "b")]
    )
    store = HFeatureStore(tmp_path / "b")
    assert store.manifest["label_source"] == "toy_world.ToyOracle[glasses]" and store.class_names == [
        "without",
        "with",
    ]
    assert store.manifest["num_images"] == 3 and store.manifest["scheduler"]["class"] == "DDIMScheduler"
    with pytest.raises(SystemExit):
        main(common + ["--output-dir", str(tmp_path / "c")])  # no recipe
    assert "exactly one recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--prompt", "a face", "--output-dir", str(tmp_path / "c")])
    assert "needs `--num-images` and `--labeller`" in capsys.readouterr().err


class BrightnessLabeller(Labeller):
    class_names = ["dim", "mid", "bright"]
    attribute = "brightness"
    source = "test:brightness"

    def label(self, images):
        return torch.tensor([min(2, int(np.asarray(im).mean() / 85)) for im in images])


def test_one_generation_several_label_sets(sd_pipe, tmp_path):
    from h_classifiers.training import TrainingConfig, train_classifier

    labellers = [ParityLabeller(), BrightnessLabeller()]
    manifest = extract_from_generation(
        sd_pipe, "a face", 6, tmp_path / "gen", labellers, num_inference_steps=2, chunk_size=4, progress=False
    )
    assert sorted(manifest["label_sets"]) == ["brightness", "parity"]
    default, bright = HFeatureStore(tmp_path / "gen"), HFeatureStore(tmp_path / "gen", label_set="brightness")
    assert default.class_names == ["even", "odd"] and bright.class_names == ["dim", "mid", "bright"]
    expected = [r["labels"]["brightness"] for r in manifest["images"]]
    data = bright.load_timestep(1, drop_unlabelled=False)
    assert data.labels.tolist() == expected and bright.label_source == "test:brightness"
    # Same h, other labels.
    assert torch.equal(data.features, default.load_timestep(1, drop_unlabelled=False).features)
    with pytest.raises(ValueError, match="`label_set` must be one of"):
        HFeatureStore(tmp_path / "gen", label_set="age")
    # Training picks the label set named by `attribute`.
    result = train_classifier(
        tmp_path / "gen", config=TrainingConfig(epochs=1, min_steps=2), attribute="brightness", progress=False
    )
    assert result.classifier.config.class_names == ["dim", "mid", "bright"]
    with pytest.raises(ValueError, match="distinct attribute names"):
        extract_from_generation(
            sd_pipe, "a face", 2, tmp_path / "x", [ParityLabeller(), ParityLabeller()], progress=False
        )
