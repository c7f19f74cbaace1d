"""The toy world: data generator, pixel oracle, prompts, the training command, and the committed model."""

import json

import pytest
import torch

from h_classifiers.toy_world import (
    ATTRIBUTES,
    DATA_BIAS,
    NEUTRAL_PROMPT,
    TOY_MODEL_PATH,
    ToyOracle,
    attribute_prompt,
    caption_vocabulary,
    make_toy_dataset,
)


@pytest.fixture(scope="module")
def dataset():
    return make_toy_dataset(2000, seed=123)


@pytest.fixture(scope="module")
def reading(dataset):
    return ToyOracle().read(dataset.images)


def test_oracle_reads_dataset_attributes(dataset, reading):
    for attribute in ATTRIBUTES:
        accuracy = (reading[attribute] == dataset.labels[attribute]).float().mean().item()
        assert accuracy >= 0.99, (attribute, accuracy)
        assert reading[attribute].dtype == torch.long
    assert reading["valid"].dtype == torch.bool
    assert reading["valid"].float().mean().item() >= 0.99


def test_dataset_has_the_bias(dataset):
    assert dataset.images.shape == (2000, 3, 32, 32)
    assert 0 <= dataset.images.min() and dataset.images.max() <= 1
    for attribute, probs in DATA_BIAS.items():
        counts = torch.bincount(dataset.labels[attribute], minlength=len(probs)).float() / 2000
        assert torch.allclose(counts, torch.tensor(probs), atol=0.03), (attribute, counts)
    neutral = sum(caption == NEUTRAL_PROMPT for caption in dataset.captions) / 2000
    assert 0.05 < neutral < 0.5


def test_dataset_is_deterministic_from_seed():
    a, b, c = make_toy_dataset(16, seed=5), make_toy_dataset(16, seed=5), make_toy_dataset(16, seed=6)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in ATTRIBUTES)
    assert not torch.equal(a.images, c.images)


def test_captions_name_true_attributes(dataset):
    words = set(caption_vocabulary())
    for i, caption in enumerate(dataset.captions[:300]):
        assert set(caption.split()) <= words, caption
        if "dark" in caption.split():
            assert dataset.labels["skin"][i] == 1, caption
        if "with glasses" in caption:
            assert dataset.labels["glasses"][i] == 1, caption
        if "red hair" in caption:
            assert dataset.labels["hair"][i] == 2, caption


def test_oracle_pil_matches_tensor(dataset):
    from PIL import Image

    images = dataset.images[:32]
    pil = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    from_pil, from_tensor = ToyOracle().read(pil), ToyOracle().read(images)
    for key in list(ATTRIBUTES) + ["valid"]:
        assert torch.equal(from_pil[key], from_tensor[key]), key
    # Upscaled images are area-resized back to 32x32 and read the same.
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert torch.equal(ToyOracle().read(big)["skin"], from_tensor["skin"])


def test_oracle_refuses_bad_input(dataset):
    oracle = ToyOracle()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle.read(dataset.images[:4] * 2 - 1)
    with pytest.raises(ValueError, match="images"):
        oracle.read(dataset.images[:4, :1])
    with pytest.raises(ValueError, match="images"):
        oracle.read((dataset.images[:4] * 255).byte())
    with pytest.raises(ValueError, match="PIL"):
        oracle.read([dataset.images[0]])
    with pytest.raises(ValueError, match="images"):
        oracle.read([])


def test_oracle_rejects_broken_images(dataset, reading):
    images = dataset.images[:8]
    assert reading["valid"][:8].all()
    bald = dataset.labels["hair"] == 0  # whole faces, so that each half shows plenty of skin
    light = ((dataset.labels["skin"] == 0) & bald).nonzero()[0].item()
    dark = ((dataset.labels["skin"] == 1) & bald).nonzero()[0].item()
    background = dataset.images[:8, :, :2, :2].mean(dim=(2, 3), keepdim=True).expand_as(images)
    two_faces = torch.cat([images[:, :, :, 8:24], images[:, :, :, 8:24]], dim=3)
    half_and_half = dataset.images[light].clone()
    half_and_half[:, 16:] = dataset.images[dark][:, 16:]
    smeared = torch.nn.functional.avg_pool2d(images, 7, stride=1, padding=3, count_include_pad=False)
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, broken in [
        ("background only", background),
        ("two faces", two_faces),
        ("mixed skin", half_and_half[None]),
        ("smeared", smeared),
        ("noise", noise),
    ]:
        assert not ToyOracle().read(broken)["valid"].any(), name


def test_attribute_prompts():
    prompts = [attribute_prompt(a, c) for a, classes in ATTRIBUTES.items() for c in classes]
    assert len(set(prompts)) == len(prompts)
    assert attribute_prompt("skin", "dark").startswith(NEUTRAL_PROMPT)
    assert "red" in attribute_prompt("hair", "red") and "without" in attribute_prompt("glasses", "without")
    with pytest.raises(ValueError, match="attribute"):
        attribute_prompt("age", "old")
    with pytest.raises(ValueError, match="class_name"):
        attribute_prompt("skin", "green")


def test_tokenizer_spells_every_word_as_one_token(tmp_path):
    from lab.toy_model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    for t in (tokenizer, reloaded):
        ids = t(" ".join(caption_vocabulary())).input_ids
        assert len(ids) == len(caption_vocabulary()) + 2
        assert t.unk_token_id not in ids[1:-1]
    assert tokenizer(NEUTRAL_PROMPT).input_ids == reloaded(NEUTRAL_PROMPT).input_ids


def test_train_toy_smoke_and_resume(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from lab.train_toy_model import build_vae, load_checkpoint, main, save_checkpoint

    out, work = tmp_path / "toy-sd", tmp_path / "work"
    tiny = ["--num-images", "64", "--vae-steps", "2", "--unet-steps", "2", "--unet-batch-size", "8"]
    threads = torch.get_num_threads()
    try:
        main(
            tiny + ["--vae-batch-size", "8", "--checkpoint-every", "1", "--output", str(out), "--work-dir", str(work)]
        )
    finally:
        torch.set_num_threads(threads)  # the command sets it for the whole process
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.safety_checker is None
    assert json.loads((out / "model_index.json").read_text())["requires_safety_checker"] is False
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert load_file(str(work / "latents.safetensors"))["latents"].shape == (64, 4, 8, 8)

    # A checkpoint restores the weights and the optimizer exactly.
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters())
    assert load_checkpoint(work / "vae_checkpoint.safetensors", {"vae": vae}, optimizer) == 2
    save_checkpoint(tmp_path / "again.safetensors", {"vae": vae}, optimizer, 2)
    assert (
        load_file(str(tmp_path / "again.safetensors")).keys()
        == load_file(str(work / "vae_checkpoint.safetensors")).keys()
    )

    # The UNet checkpoint holds diffusers' EMA weights (not the raw ones) and its learning-rate schedule.
    from safetensors import safe_open

    with safe_open(str(work / "unet_checkpoint.safetensors"), framework="pt") as f:
        schedule = json.loads(f.metadata()["lr_scheduler"])
    assert schedule["last_epoch"] == 2
    unet_weights = load_file(str(work / "unet_checkpoint.safetensors"))
    raw, ema = unet_weights["unet.conv_in.weight"], unet_weights["ema_unet.conv_in.weight"]
    assert not torch.equal(raw, ema) and (raw - ema).abs().max() < 0.1

    with pytest.raises(SystemExit):
        main(["--caption-dropout", "1.5"])


def test_committed_model_samples_valid_biased_faces():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_PATH, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # The tokenizer survived the save/load round trip: every caption word is one token.
    ids = pipe.tokenizer(" ".join(caption_vocabulary())).input_ids
    assert len(ids) == len(caption_vocabulary()) + 2

    def sample(prompt: str, n: int) -> dict:
        out = pipe(
            prompt,
            num_images_per_prompt=n,
            num_inference_steps=15,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return ToyOracle().read(out.images)

    neutral = sample(NEUTRAL_PROMPT, 32)
    assert neutral["valid"].float().mean() >= 0.9
    light = (neutral["skin"] == 0).float().mean()
    assert 0.55 <= light < 1.0, light  # biased toward light skin, yet not collapsed
    dark = sample(attribute_prompt("skin", "dark"), 16)
    assert (dark["skin"] == 1).float().mean() >= 0.75
