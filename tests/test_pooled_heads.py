"""Pooled heads (`HClassifier(pool_size=g)`): the heads read h average-pooled to g x g, so one classifier reads h of
any resolution of its model; a guided move made in the pooled space is lifted back to h by the min-norm right
inverse of the pooling (`_pool_lift`). Flat classifiers are untouched (the rest of the suite)."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_pipeline_runtime import syncs_per_guided_step  # noqa: F401 (a fixture: host syncs per guided step)
from tiny_models import CLASSIFIER_TIMESTEPS, H_SHAPE, HRecorder, make_generator, tiny_classifier

import pipeline_balancing_act as pba
from h_classifiers import toy_world
from h_classifiers.extraction import extract_from_generation
from h_classifiers.feature_store import HFeatureStore, create_store, finish_store, write_chunk
from h_classifiers.labellers import Labeller
from h_classifiers.toy_assets import TOY_DDPM_PATH, TOY_MODEL_PATH
from h_classifiers.training import TrainingConfig, train_classifier
from pipeline_balancing_act import BalancingActPipeline, HClassifier


TOY_H_SHAPE = [64, 4, 4]  # the toy SD's h at 32x32 pixels (VAE factor 4, one UNet downsampler)


def pooled_classifier(pool_size: int = 2, h_shape=H_SHAPE, seed: int = 0, scale: float = 0.05) -> HClassifier:
    """Random pooled heads whose anchors are their own weights: a move towards class c raises its logit margin."""
    classifier = HClassifier(
        attribute="skin", class_names=["light", "dark"], h_shape=h_shape, timesteps=CLASSIFIER_TIMESTEPS,
        pool_size=pool_size,
    )  # fmt: skip
    generator = make_generator(seed)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * scale)
    heads, classes = classifier.weight.shape[:2]
    classifier.set_calibration([1.0] * heads, [[0.0] * classes] * heads)
    classifier.set_anchors(classifier.weight.detach(), "weights")
    return classifier.eval()


def torch_pooling_matrix(n: int, g: int) -> torch.Tensor:
    """P [g, n] written out from torch's rule: cell i averages floor(i n / g) .. ceil((i + 1) n / g)."""
    pool = torch.zeros(g, n, dtype=torch.float64)
    for i in range(g):
        start, end = i * n // g, -(-(i + 1) * n // g)
        pool[i, start:end] = 1.0 / (end - start)
    return pool


def lift(delta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    g = delta.shape[-1]
    return torch.einsum("hi,ncij,wj->nchw", pba._pool_lift(height, g), delta, pba._pool_lift(width, g))


# --- the heads -------------------------------------------------------------------------------------------------------


def test_pooled_forward_is_a_pool_then_the_linear_head():
    classifier = pooled_classifier(pool_size=2)
    assert (
        classifier.weight.shape == (len(CLASSIFIER_TIMESTEPS), 2, 64 * 2 * 2) and classifier.anchors.shape[-1] == 256
    )
    for size in [(4, 4), (4, 6), (7, 3)]:  # any height and width >= 2 with the trained 64 channels
        h = torch.randn(3, 64, *size, generator=make_generator(1))
        index = classifier.head_index(500)
        expected = F.linear(F.adaptive_avg_pool2d(h, 2).flatten(1), classifier.weight[index], classifier.bias[index])
        torch.testing.assert_close(classifier(h, 500), expected, rtol=0, atol=0)
    for shape in ([3, 32, 4, 4], [3, 64, 1, 4], [64, 4, 4]):  # other channels, h smaller than the grid, no batch
        with pytest.raises(ValueError, match=r"reads h of shape \[B, 64, H, W\] with H, W >= 2"):
            classifier(torch.zeros(shape), 500)
    flat = tiny_classifier()
    with pytest.raises(ValueError, match=r"was trained on h of shape \[B, 64, 4, 4\]"):
        flat(torch.zeros(3, 64, 4, 6), 500)


@pytest.mark.parametrize("pool_size", [0, -1, 5, True, 2.0, "2"])
def test_a_bad_pool_size_is_refused(pool_size):
    with pytest.raises(ValueError, match="pool_size"):
        HClassifier(class_names=["a", "b"], h_shape=[8, 4, 4], timesteps=[1], pool_size=pool_size)


@pytest.mark.parametrize("n, g", [(8, 8), (16, 8), (12, 8), (7, 3), (6, 4), (5, 1)])
def test_the_lift_is_the_min_norm_right_inverse_of_torch_pooling(n, g):
    lift_n = pba._pool_lift(n, g)
    pool = torch_pooling_matrix(n, g)
    assert lift_n.shape == (n, g) and lift_n.dtype == torch.float32
    torch.testing.assert_close(pool @ lift_n.double(), torch.eye(g, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(lift_n.double(), torch.linalg.pinv(pool), rtol=0, atol=1e-6)  # min-norm
    # In two dimensions (separable per axis), through torch's own pooling: pool(lift(d)) == d, uneven sizes included.
    delta = torch.randn(2, 5, g, g, generator=make_generator(n))
    lifted = lift(delta, n, n + 1)
    torch.testing.assert_close(F.adaptive_avg_pool2d(lifted, g), delta, rtol=0, atol=1e-5)
    if n % g == 0:  # each cell's value spread over its cell: nearest-neighbour upsampling
        nearest = F.interpolate(delta, size=(n, n), mode="nearest")
        torch.testing.assert_close(lift(delta, n, n), nearest, rtol=0, atol=1e-6)


def test_a_pooled_classifier_saves_and_loads_as_safetensors(tmp_path):
    classifier = pooled_classifier(pool_size=2)
    classifier.save_pretrained(tmp_path / "skin")
    assert sorted(p.name for p in (tmp_path / "skin").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    config = json.loads((tmp_path / "skin" / "config.json").read_text())
    assert config["pool_size"] == 2 and config["h_shape"] == H_SHAPE
    loaded = HClassifier.from_pretrained(tmp_path / "skin")
    assert loaded.config.pool_size == 2
    for name in ("weight", "bias", "anchors"):
        torch.testing.assert_close(getattr(loaded, name), getattr(classifier, name), rtol=0, atol=0)
    h = torch.randn(2, 64, 4, 6, generator=make_generator(3))
    torch.testing.assert_close(loaded.calibrated_logits(h, 1), classifier.calibrated_logits(h, 1), rtol=0, atol=0)
    # A classifier saved before pooled heads existed (no `pool_size` in its config) loads flat.
    tiny_classifier().save_pretrained(tmp_path / "flat")
    config = json.loads((tmp_path / "flat" / "config.json").read_text())
    del config["pool_size"]
    (tmp_path / "flat" / "config.json").write_text(json.dumps(config))
    assert HClassifier.from_pretrained(tmp_path / "flat").config.pool_size is None


def test_the_commands_preflight_lets_a_pooled_classifier_fit_its_model_at_any_resolution(tmp_path):
    from h_classifiers import preflight

    pooled_classifier(pool_size=2, h_shape=[64, 8, 8]).save_pretrained(tmp_path / "coarse")  # trained at 64x64 px
    preflight.check_classifier_fits(tmp_path / "coarse", TOY_MODEL_PATH)  # the toy SD's h is [64, 4, 4]
    pooled_classifier(pool_size=8, h_shape=[64, 8, 8]).save_pretrained(tmp_path / "fine")
    with pytest.raises(ValueError, match=r"reads h of shape \[64, H, W\] with H, W >= 8 .* h of shape \[64, 4, 4\]"):
        preflight.check_classifier_fits(tmp_path / "fine", TOY_MODEL_PATH)
    with pytest.raises(ValueError, match=r"\[64, H, W\].*\[128, 4, 4\]"):  # other channels: the toy DDPM's h
        preflight.check_classifier_fits(tmp_path / "coarse", TOY_DDPM_PATH)


# --- a guided call on the toy model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = BalancingActPipeline.from_pretrained(TOY_MODEL_PATH, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guided(pipe, classifier, height: int, width: int) -> HRecorder:
    """A sample-mode call (images 0, 3 to class 0; 1, 2 to class 1) on 4 images, 3 steps, with h recorded before and
    after the move."""
    with HRecorder(pipe.unet) as record:
        pipe(
            "a photo of a face", height=height, width=width, num_inference_steps=3, num_images_per_prompt=4,
            output_type="latent", generator=make_generator(0), h_classifier=classifier, guidance_mode="sample",
            target_classes=[0, 1, 1, 0], guidance_strength=10.0,
        )  # fmt: skip
    return record


@pytest.mark.parametrize("height, width", [(32, 32), (32, 48)])
def test_a_pooled_classifier_guides_at_any_resolution_without_host_syncs(
    toy_pipe,
    syncs_per_guided_step,  # noqa: F811
    height,
    width,
):
    classifier = pooled_classifier(pool_size=2, h_shape=TOY_H_SHAPE)
    toy_pipe(
        "a photo of a face", height=height, width=width, num_inference_steps=3, num_images_per_prompt=4,
        output_type="latent", h_classifier=classifier, guidance_mode="distribution", target_distribution=[0.5, 0.5],
    )  # fmt: skip
    assert syncs_per_guided_step == [0, 0, 0]
    record = guided(toy_pipe, classifier, height, width)
    assert [list(h.shape[1:]) for h in record.after] == [toy_pipe.h_shape(height, width)] * 3
    for before, after, t in zip(record.before, record.after, record.timesteps):
        cond_before, cond_after = before[4:], after[4:]  # classifier-free guidance: [uncond; cond], cond moved
        torch.testing.assert_close(after[:4], before[:4], rtol=0, atol=0)
        move = cond_after - cond_before
        # The move lies in the lift's range: it is the lift of its own pooled value (min norm).
        torch.testing.assert_close(
            lift(F.adaptive_avg_pool2d(move, 2), height // 8, width // 8), move, atol=1e-5, rtol=0
        )
        # Each image's logit margin moves towards its class: images 0, 3 to class 0, images 1, 2 to class 1.
        margin = [(z[:, 1] - z[:, 0]) for z in (classifier(cond_before, t), classifier(cond_after, t))]
        assert ((margin[1] - margin[0]) * torch.tensor([-1.0, 1.0, 1.0, -1.0]) > 0).all()


def test_a_pooled_move_is_the_flat_move_of_the_equivalent_flat_classifier(toy_pipe):
    """A flat classifier whose heads are the pooled heads composed with the pooling, and whose anchors are the pooled
    anchors lifted, reads the same logits at 32x32: the flat path moves h exactly as the pooled path does."""
    pooled = pooled_classifier(pool_size=2, h_shape=TOY_H_SHAPE)
    flat = HClassifier(
        attribute="skin", class_names=["light", "dark"], h_shape=TOY_H_SHAPE, timesteps=CLASSIFIER_TIMESTEPS
    )
    heads, classes, _ = pooled.weight.shape
    as_grid = (heads * classes, 64, 2, 2)
    pool_matrix = torch_pooling_matrix(4, 2).float()
    with torch.no_grad():  # w . pool(h) == (P^T w P) . h, channel by channel
        weight = torch.einsum("ih,ncij,jw->nchw", pool_matrix, pooled.weight.view(as_grid), pool_matrix)
        flat.weight.copy_(weight.reshape(heads, classes, -1))
    flat.set_calibration([1.0] * heads, [[0.0] * classes] * heads)
    flat.set_anchors(lift(pooled.anchors.view(as_grid), 4, 4).reshape(heads, classes, -1), "lifted")
    h = torch.randn(3, *TOY_H_SHAPE, generator=make_generator(5))
    torch.testing.assert_close(flat(h, 500), pooled(h, 500), atol=1e-5, rtol=1e-5)
    pooled_run, flat_run = guided(toy_pipe, pooled, 32, 32), guided(toy_pipe, flat, 32, 32)
    for ours, theirs in zip(pooled_run.after, flat_run.after):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    moved = sum(float((a - b).abs().max()) for a, b in zip(pooled_run.after, pooled_run.before))
    assert moved > 1e-2  # the calls did guide


def test_pooled_and_flat_classifiers_in_one_call_are_refused(ba_pipe):
    pooled = pooled_classifier(pool_size=2)
    for target in ([[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], "hold"], ["hold", [0.5, 0.5]]):
        with pytest.raises(ValueError, match=r"`h_classifier`.*pool sizes \[2, None\]"):
            ba_pipe(
                "a face", num_inference_steps=2, num_images_per_prompt=2, output_type="np",
                h_classifier=[pooled, tiny_classifier(seed=1)], guidance_mode="distribution",
                target_distribution=target,
            )  # fmt: skip


def test_a_pooled_classifier_whose_grid_is_larger_than_h_is_refused(ba_pipe):
    # The tiny SD (VAE factor 2): h is 4x4 at 16x16 pixels, 2x4 at 8x16.
    with pytest.raises(ValueError, match=r"H, W >= 4 .* at 8x16 pixels \(`height` x `width`\)"):
        ba_pipe(
            "a face", height=8, width=16, num_inference_steps=2, num_images_per_prompt=2, output_type="np",
            h_classifier=pooled_classifier(pool_size=4), guidance_mode="sample", target_classes=0,
        )  # fmt: skip


# --- extraction and training ------------------------------------------------------------------------------------------


def test_extract_with_a_pool_size_stores_pooled_h_and_train_makes_a_pooled_classifier(sd_pipe, tmp_path, capsys):
    from h_classifiers.commands.extract import main as extract
    from h_classifiers.commands.train import main as train

    sd_pipe.save_pretrained(tmp_path / "model")
    skin = torch.tensor([0, 1] * 4)
    faces = toy_world.render_faces(
        {"skin": skin, "glasses": torch.zeros(8, dtype=torch.long), "hair": torch.zeros(8, dtype=torch.long)},
        make_generator(0),
        image_size=16,
    )
    for i, (face, label) in enumerate(zip(faces, skin.tolist())):
        folder = tmp_path / "images" / toy_world.ATTRIBUTES["skin"][label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((face.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
    common = ["--model", str(tmp_path / "model"), "--steps", "2", "--batch-size", "4", "--no-progress"]
    recipe = ["--image-dir", str(tmp_path / "images"), "--class-names", "light,dark"]
    extract(common + recipe + ["--pool-size", "2", "--output-dir", str(tmp_path / "pooled")])
    assert "h [64, 2, 2] (h [64, 4, 4] average-pooled)" in capsys.readouterr().out
    extract(common + recipe + ["--output-dir", str(tmp_path / "flat")])
    pooled, flat = HFeatureStore(tmp_path / "pooled"), HFeatureStore(tmp_path / "flat")
    assert (pooled.pool_size, pooled.manifest["pooled_from"], pooled.h_shape) == (2, H_SHAPE, [64, 2, 2])
    assert (flat.pool_size, flat.manifest["pooled_from"], flat.h_shape) == (None, None, H_SHAPE)
    for step in range(2):  # the stored features are the flat h, pooled (before the fp16 rounding)
        expected = F.adaptive_avg_pool2d(flat.load_timestep(step, drop_unlabelled=False).features.float(), 2)
        stored = pooled.load_timestep(step, drop_unlabelled=False).features
        torch.testing.assert_close(stored.float(), expected, atol=2e-3, rtol=2e-3)
    options = ["--epochs", "2", "--min-steps", "1", "--no-progress"]
    train(["--features-dir", str(tmp_path / "pooled"), "--output-dir", str(tmp_path / "a"), *options])
    train(
        ["--features-dir", str(tmp_path / "flat"), "--pool-size", "2", "--output-dir", str(tmp_path / "b"), *options]
    )
    for name in ("a", "b"):
        classifier = HClassifier.from_pretrained(tmp_path / name)
        assert (classifier.config.pool_size, classifier.config.h_shape) == (2, H_SHAPE)
        assert classifier.weight.shape[-1] == classifier.anchors.shape[-1] == 64 * 2 * 2
        assert "average-pooled to 2x2" in (tmp_path / name / "README.md").read_text()
    capsys.readouterr()
    for argv, message in [
        (["--features-dir", str(tmp_path / "pooled"), "--pool-size", "1"], "already average-pooled to 2x2"),
        (["--features-dir", str(tmp_path / "flat"), "--pool-size", "5"], "`--pool-size` 5 is larger than h"),
        (["--features-dir", str(tmp_path / "flat"), "--pool-size", "0"], "expected a positive integer"),
    ]:
        with pytest.raises(SystemExit):
            train([*argv, "--output-dir", str(tmp_path / "c"), *options])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before anything loads: the model's h is 4x4
        extract(common + recipe + ["--pool-size", "8", "--output-dir", str(tmp_path / "c")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == "balancing-act extract: error: `--pool-size` 8 is larger than h, whose shape is [64, 4, 4]; give at most 4."
    )


class HalfLabeller(Labeller):
    class_names = ["a", "b"]
    attribute = "half"
    source = "test:half"

    def label(self, images):
        return torch.arange(len(images)) % 2


def test_the_generation_recipe_pools_what_it_records(sd_pipe, tmp_path):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, "record_branch": "both", "progress": False}
    extract_from_generation(sd_pipe, "a face", 3, tmp_path / "flat", HalfLabeller(), dtype="fp32", **kwargs)
    manifest = extract_from_generation(
        sd_pipe, "a face", 3, tmp_path / "pooled", HalfLabeller(), dtype="fp32", pool_size=3, **kwargs
    )
    assert (manifest["pool_size"], manifest["pooled_from"], manifest["h_shape"]) == (3, H_SHAPE, [64, 3, 3])
    flat, pooled = HFeatureStore(tmp_path / "flat"), HFeatureStore(tmp_path / "pooled")
    for step in range(2):
        expected = F.adaptive_avg_pool2d(flat.load_timestep(step).features, 3)
        torch.testing.assert_close(pooled.load_timestep(step).features, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="different extraction run.*pool_size"):  # a resumed run keeps its pool size
        extract_from_generation(sd_pipe, "a face", 3, tmp_path / "pooled", HalfLabeller(), dtype="fp32", **kwargs)
    with pytest.raises(ValueError, match=r"`pool_size` 5 is larger than h: .* \[64, 4, 4\] at 16x16 pixels"):
        extract_from_generation(sd_pipe, "a face", 3, tmp_path / "c", HalfLabeller(), pool_size=5, **kwargs)


def test_training_pools_a_flat_store_in_blocks_like_the_pooled_store(tmp_path):
    """`train --pool-size g` on a flat store trains on exactly the pooled h a pooled store would hold (fp32 here)."""
    generator = make_generator(0)
    h = torch.randn(2, 40, *H_SHAPE, generator=generator)  # [T, n, C, H, W]
    labels = torch.arange(40) % 2
    h[:, labels == 1, :, :2] += 1.0  # class 1: the left half brighter
    for name, stored, extra in [
        ("flat", h, {}),
        (
            "pooled",
            F.adaptive_avg_pool2d(h.flatten(0, 1), 2).view(2, 40, 64, 2, 2),
            {"pool_size": 2, "pooled_from": H_SHAPE},
        ),
    ]:
        manifest = create_store(tmp_path / name, [999, 1], ["a", "b"], dtype="fp32", attribute="x", **extra)
        finish_store(tmp_path / name, write_chunk(tmp_path / name, manifest, 0, {"cond": stored}, labels))
    config = {"epochs": 3, "min_steps": 1}
    from_flat = train_classifier(tmp_path / "flat", config=TrainingConfig(pool_size=2, **config), progress=False)
    from_pooled = train_classifier(tmp_path / "pooled", config=TrainingConfig(**config), progress=False)
    for a, b in zip(from_flat.classifier.state_dict().values(), from_pooled.classifier.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert from_flat.metrics[-1]["accuracy"] == 1.0


def test_pooled_classifiers_are_stored_in_float16_by_default_and_load_as_float32(tmp_path):
    """`storage_dtype` "auto": a pooled classifier's file holds float16 (half the size), a flat one's float32 as
    before; each loads as float32 equal to the trained weights rounded to the stored type."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    h = torch.randn(2, 40, *H_SHAPE, generator=make_generator(1))
    labels = torch.arange(40) % 2
    h[:, labels == 1, :, :2] += 1.0
    manifest = create_store(tmp_path / "store", [999, 1], ["a", "b"], dtype="fp32", attribute="x")
    finish_store(tmp_path / "store", write_chunk(tmp_path / "store", manifest, 0, {"cond": h}, labels))
    quick = {"epochs": 2, "min_steps": 1}
    expected = {
        ("pooled", "auto"): torch.float16,
        ("pooled", "fp32"): torch.float32,
        ("flat", "auto"): torch.float32,
        ("flat", "fp16"): torch.float16,
    }
    sizes = {}
    for (kind, storage), dtype in expected.items():
        config = TrainingConfig(pool_size=2 if kind == "pooled" else None, storage_dtype=storage, **quick)
        out = tmp_path / f"{kind}-{storage}"
        result = train_classifier(tmp_path / "store", out, config=config, progress=False)
        stored = load_file(str(out / SAFETENSORS_WEIGHTS_NAME))
        assert {t.dtype for t in stored.values()} == {dtype}
        sizes[kind, storage] = (out / SAFETENSORS_WEIGHTS_NAME).stat().st_size
        loaded = HClassifier.from_pretrained(out)
        for name, trained in result.classifier.state_dict().items():
            assert loaded.state_dict()[name].dtype == torch.float32
            torch.testing.assert_close(loaded.state_dict()[name], trained.to(dtype).float(), rtol=0, atol=0)
    assert sizes["pooled", "auto"] < 0.55 * sizes["pooled", "fp32"]
    with pytest.raises(ValueError, match="`storage_dtype` must be one of"):
        TrainingConfig(storage_dtype="float16").validate()
