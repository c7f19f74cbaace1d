"""h-classifier training: per-timestep heads from shards, balance, held-out metrics, saved folder, CLI."""

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard

from h_classifiers import HClassifier
from h_classifiers.feature_store import HFeatureStore, create_store, finish_store, write_chunk
from h_classifiers.training import TrainingConfig, class_weights, stratified_holdout, train_classifier


H_SHAPE = [4, 2, 2]
TIMESTEPS = [901, 501, 1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_store(path, counts, separation, seed=0, chunk=97, dtype="fp16"):
    """Gaussian features: class k has mean `separation[t] * e_k` at step t (noise std 1), written chunk by chunk."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    dim = math.prod(H_SHAPE)
    means = torch.zeros(len(counts), dim)
    means[torch.arange(len(counts)), torch.arange(len(counts))] = 1.0
    manifest = create_store(
        path, TIMESTEPS, [f"c{k}" for k in range(len(counts))], dtype=dtype, attribute="synthetic", model="toy/base"
    )
    for c, start in enumerate(range(0, len(labels), chunk)):
        y = labels[start : start + chunk]
        h = torch.stack([s * means[y] + torch.randn(len(y), dim, generator=generator) + 3.0 for s in separation]).view(
            len(TIMESTEPS), len(y), *H_SHAPE
        )
        manifest = write_chunk(path, manifest, c, {"cond": h}, y)
    finish_store(path, manifest)
    return labels


@pytest.mark.parametrize("head", ["logistic", "class_mean"])
def test_trains_above_chance_and_saves_the_hub_layout(tmp_path, head):
    synthetic_store(tmp_path / "feats", counts=[300, 120, 60], separation=[0.0, 2.0, 6.0])
    config = TrainingConfig(head=head, epochs=15, holdout_fraction=0.25, seed=3)
    result = train_classifier(tmp_path / "feats", tmp_path / "clf", config, progress=False)
    by_step = {m["step"]: m for m in result.metrics}
    # No signal at step 0 (chance), some at step 1, separable at step 2.
    assert by_step[0]["balanced_accuracy"] < 0.6
    assert by_step[1]["balanced_accuracy"] > 0.6
    assert by_step[2]["accuracy"] > 0.97 and by_step[2]["balanced_accuracy"] > 0.97
    assert by_step[2]["num_heldout"] == 75 + 30 + 15 and by_step[2]["num_train"] == 480 - 120
    # Saved folder: save_pretrained layout + card + metrics + plot, no temporary leftovers.
    files = {p.name for p in (tmp_path / "clf").iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "metrics.json", "accuracy.png"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert (tmp_path / "clf" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config_json = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config_json["attribute"] == "synthetic" and config_json["class_names"] == ["c0", "c1", "c2"]
    assert config_json["h_shape"] == H_SHAPE and config_json["timesteps"] == TIMESTEPS
    assert config_json["temperature"] == 8.0 and config_json["base_model"] == "toy/base"
    card = (tmp_path / "clf" / "README.md").read_text()
    assert "| step | timestep | held-out accuracy | balanced accuracy |" in card
    assert f"| 2 | 1 | {by_step[2]['accuracy']:.3f} |" in card
    assert "toy/base" in card and "## Intended use" in card and "## Limits" in card
    data = ModelCard.load(tmp_path / "clf" / "README.md").data  # the metadata, as the Hub reads it
    assert (data.base_model, data.license, data.library_name) == ("toy/base", "apache-2.0", "diffusers")
    assert {"balancing-act", "h-classifier", "debiasing", "stable-diffusion"} <= set(data.tags)
    metrics = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert metrics["per_step"][2]["accuracy"] == by_step[2]["accuracy"]
    # The reloaded classifier applies to raw h (the standardisation is folded in) and reproduces the accuracy.
    loaded = HClassifier.from_pretrained(tmp_path / "clf")
    data = HFeatureStore(tmp_path / "feats").load_timestep(2)
    accuracy = (loaded(data.features, TIMESTEPS[2]).argmax(-1) == data.labels).float().mean()
    assert accuracy > 0.97
    torch.testing.assert_close(loaded.weight, result.classifier.weight)
    # Guidance's parts: a calibration per head fitted on the held-out rows, and the class anchors of every head.
    assert (
        len(config_json["calibration_scale"]) == len(TIMESTEPS)
        and config_json["anchor_source"] == "class_means_spread"
    )
    assert all(m["nll_calibrated"] <= m["nll_raw"] + 1e-6 for m in metrics["per_step"])
    assert loaded.anchors.shape == (len(TIMESTEPS), 3, int(torch.tensor(H_SHAPE).prod()))
    means = torch.stack([data.features.flatten(1)[data.labels == k].float().mean(0) for k in range(3)])
    # the anchors sit on the lines through the class means (spread around their centroid), in the same order
    centred_anchors, centred_means = loaded.anchors[2] - loaded.anchors[2].mean(0), means - means.mean(0)
    cosine = torch.nn.functional.cosine_similarity(centred_anchors, centred_means, dim=1)
    assert (cosine > 0.95).all()


@pytest.mark.parametrize("head", ["logistic", "class_mean"])
def test_balanced_loss_and_sampling_lift_the_minority_class(tmp_path, head):
    synthetic_store(tmp_path / "feats", counts=[950, 50], separation=[1.5, 1.5, 1.5], seed=1, dtype="fp32")
    recall = {}
    for balance in ("none", "loss", "sampling"):
        config = TrainingConfig(head=head, epochs=10, balance=balance, holdout_fraction=0.3)
        result = train_classifier(tmp_path / "feats", config=config, progress=False)
        recall[balance] = sum(m["recall"][1] for m in result.metrics) / len(result.metrics)
    assert recall["loss"] > recall["none"] + 0.2
    assert recall["sampling"] > recall["none"] + 0.2


def test_reads_one_timestep_at_a_time(tmp_path, monkeypatch):
    synthetic_store(tmp_path / "feats", counts=[40, 40], separation=[1, 2, 3])
    loaded_steps = []
    original = HFeatureStore.load_timestep

    def spy(self, step, *args, **kwargs):
        loaded_steps.append(step)
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(HFeatureStore, "load_timestep", spy)
    train_classifier(tmp_path / "feats", config=TrainingConfig(epochs=1), progress=False)
    assert loaded_steps == [0, 1, 2]


def test_output_dir_is_never_replaced_silently(tmp_path):
    synthetic_store(tmp_path / "feats", counts=[30, 30], separation=[3, 3, 3])
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        train_classifier(tmp_path / "feats", tmp_path / "clf", TrainingConfig(epochs=1), progress=False)
    assert (tmp_path / "clf" / "keep.txt").read_text() == "mine"
    train_classifier(tmp_path / "feats", tmp_path / "clf", TrainingConfig(epochs=1), overwrite=True, progress=False)
    assert not (tmp_path / "clf" / "keep.txt").exists() and (tmp_path / "clf" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "feats"]


def test_holdout_is_stratified_and_seeded():
    labels = torch.tensor([0] * 80 + [1] * 20)
    index = torch.arange(100) + 1000
    held = stratified_holdout(labels, index, 0.25, seed=5)
    assert torch.equal(held, stratified_holdout(labels, index, 0.25, seed=5))
    assert not torch.equal(held, stratified_holdout(labels, index, 0.25, seed=6))
    assert int((held < 1080).sum()) == 20 and int((held >= 1080).sum()) == 5
    weights = class_weights(labels, 3)
    assert weights[2] == 0 and torch.isclose(weights[0] * 80, weights[1] * 20)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"balance": "oversample"}, "`balance` must be one of"),
        ({"head": "mlp"}, "`head` must be one of"),
        ({"epochs": 0}, "`epochs` must be a positive integer"),
        ({"holdout_fraction": 1.0}, "`holdout_fraction` must be in"),
        ({"learning_rate": float("nan")}, "`learning_rate` must be a positive number"),
        ({"branches": ["uncond"]}, "`branches` must be a non-empty subset"),
    ],
)
def test_training_argument_errors(tmp_path, kwargs, match):
    synthetic_store(tmp_path / "feats", counts=[10, 10], separation=[1, 1, 1])
    with pytest.raises(ValueError, match=match):
        train_classifier(tmp_path / "feats", config=TrainingConfig(**kwargs), progress=False)


def test_train_command(tmp_path, capsys):
    from h_classifiers.commands.train import main

    synthetic_store(tmp_path / "feats", counts=[60, 60], separation=[4, 4, 4])
    main(["--features-dir", str(tmp_path / "feats"), "--output-dir", str(tmp_path / "clf"), "--epochs", "3",
          "--attribute", "colour", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Saved the 'colour' classifier" in out and "last" in out
    assert HClassifier.from_pretrained(tmp_path / "clf").config.attribute == "colour"
    with pytest.raises(SystemExit):  # exists: refused with a clear argparse error
        main(["--features-dir", str(tmp_path / "feats"), "--output-dir", str(tmp_path / "clf"), "--no-progress"])
    assert "already exists" in capsys.readouterr().err


def test_train_command_says_saved_once(tmp_path, capsys, caplog):
    import logging

    from h_classifiers.commands.train import main

    caplog.set_level(logging.INFO)
    synthetic_store(tmp_path / "feats", counts=[20, 20], separation=[4, 4, 4])
    main(["--features-dir", str(tmp_path / "feats"), "--output-dir", str(tmp_path / "clf"), "--epochs", "1",
          "--min-steps", "2", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert (captured.out + captured.err + caplog.text).count("Saved") == 1


def test_the_base_model_is_recorded_as_a_hub_id_or_a_folder_name(tmp_path, monkeypatch):
    """A local path (the manifest records the absolute one) is not published in the config or the model card."""
    from h_classifiers.model_card import public_model_name

    local = tmp_path / "models" / "my-sd"
    local.mkdir(parents=True)
    synthetic_store(tmp_path / "feats", counts=[20, 20], separation=[4, 4, 4])
    manifest = json.loads((tmp_path / "feats" / "manifest.json").read_text())
    (tmp_path / "feats" / "manifest.json").write_text(json.dumps(manifest | {"model": str(local)}))
    config = TrainingConfig(epochs=1, min_steps=2)
    train_classifier(tmp_path / "feats", tmp_path / "clf", config, progress=False)
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["base_model"] == "my-sd"
    assert str(tmp_path) not in (tmp_path / "clf" / "README.md").read_text()
    # A folder name is no Hub model: the metadata leaves base_model out rather than name a model the Hub rejects.
    assert ModelCard.load(tmp_path / "clf" / "README.md").data.base_model is None
    result = train_classifier(tmp_path / "feats", config=config, base_model="someone/sd-15", progress=False)
    assert result.classifier.config.base_model == "someone/sd-15"
    monkeypatch.chdir(tmp_path)
    assert public_model_name("./models/my-sd/") == "my-sd" and public_model_name("/elsewhere/sd15") == "sd15"
    assert public_model_name("h_classifiers/assets/toy-sd") == "toy-sd" and public_model_name(None) is None
    assert (
        public_model_name("stable-diffusion-v1-5/stable-diffusion-v1-5")
        == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
