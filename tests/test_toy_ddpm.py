"""The toy world's unconditional pixel DDPM: the committed DDIMPipeline, its bottleneck, and the training script."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from h_classifiers.toy_world import IMAGE_SIZE, TOY_DDPM_PATH


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # the training command sets it for the whole process


def mid_block_output(unet, x: torch.Tensor, t) -> torch.Tensor:
    seen = []
    hook = unet.mid_block.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            unet(x, t)
    finally:
        hook.remove()
    return seen[0]


def test_builders_put_h_after_three_downsamplings():
    from diffusers import DDIMScheduler, UNet2DModel

    from lab.toy_model import build_pixel_scheduler, build_pixel_unet

    unet = build_pixel_unet()
    assert isinstance(unet, UNet2DModel) and unet.config.sample_size == IMAGE_SIZE
    h = mid_block_output(unet, torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([10, 900]))
    assert h.shape == (2, unet.config.block_out_channels[-1], IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    scheduler = build_pixel_scheduler()
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.num_train_timesteps == 1000
    assert scheduler.betas[0].item() == pytest.approx(1e-4) and scheduler.betas[-1].item() == pytest.approx(0.02)


def test_committed_model_loads_offline_and_samples(one_thread):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    assert (TOY_DDPM_PATH / "unet" / "diffusion_pytorch_model.safetensors").exists()
    pipe = DDIMPipeline.from_pretrained(TOY_DDPM_PATH, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert json.loads((TOY_DDPM_PATH / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"

    # h, the mid-block output, comes after three downsamplings: [B, C, 4, 4] for 32x32 images.
    x = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    h = mid_block_output(pipe.unet, x, 500)
    assert h.shape == (3, pipe.unet.config.block_out_channels[-1], 4, 4)

    out = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np")
    assert out.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert 0 <= out.images.min() and out.images.max() <= 1

    # The committed oracle report describes this model, with a path relative to the repository.
    report = json.loads((ROOT / "docs" / "lab" / "toy_ddpm_report.json").read_text())
    assert report["model"] == "h_classifiers/assets/toy-ddpm"
    assert report["architecture"]["h_shape"] == list(h.shape[1:])
    assert report["architecture"]["parameters"] == sum(p.numel() for p in pipe.unet.parameters())
    assert set(report["samples"]) == {"eta_0", "eta_1"}


def test_train_toy_ddpm_smoke_resume_and_report(tmp_path, one_thread):
    from diffusers import DDIMPipeline

    from lab.train_toy_ddpm import main

    tiny = ["--num-images", "16", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "3"]

    def run(name: str, *extra: str):
        work, out = tmp_path / f"{name}-work", tmp_path / f"{name}-ddpm"
        return main(tiny + ["--work-dir", str(work), "--output", str(out), *extra]), work, out

    # Interrupted after 2 steps (a checkpoint is saved there, nothing is exported), then resumed to the end.
    report, work, out = run("resumed", "--stop-after", "2")
    assert report is None and not out.exists()
    assert (work / "unet_checkpoint.safetensors").exists() and not (work / "unet_final.safetensors").exists()
    run("resumed")
    resumed = load_file(str(work / "unet_final.safetensors"))

    # It ends exactly where an uninterrupted run does: batches, optimizer, schedule and EMA are all restored.
    small_report = ["--report-samples", "3", "--report-steps", "2", "--fit-images", "4", "--h-dependence-images", "2"]
    report, straight_work, straight_out = run("straight", "--report", str(tmp_path / "report.json"), *small_report)
    straight = load_file(str(straight_work / "unet_final.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)

    pipe = DDIMPipeline.from_pretrained(straight_out, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["training"]["steps"] == 4 and saved["architecture"]["h_shape"][1:] == [4, 4]
    for key in ("eta_0", "eta_1"):
        row = saved["samples"][key]
        assert row["num_samples"] == 3 and 0 <= row["valid_rate"] <= 1
        assert set(row["fractions"]) == {"skin", "glasses", "hair"}
        assert "colours_ok" in row["checks_passed"]

    # A finished run rerun with a larger --steps continues from its last step (a warm restart) and says so.
    extended, _, _ = run(
        "straight",
        "--steps",
        "6",
        "--report",
        str(tmp_path / "extended.json"),
        *small_report,
    )
    assert extended["training"]["steps"] == 6 and extended["training"]["extended_from"] == [4]
    longer = load_file(str(straight_work / "unet_final.safetensors"))
    assert any(not torch.equal(longer[k], straight[k]) for k in straight)
    assert (tmp_path / "extended.md").read_text().count("trained 4 then 6 steps") == 1

    for key in ("eta_0", "eta_1"):  # the h dependence, per sampler
        assert saved["diagnostics"]["h_dependence"][key]["num_images"] == 2
    assert set(saved["diagnostics"]["noise_fit"]["20"]) == {"mse", "slope", "mean_slope"}

    # The Min-SNR loss weighting runs too.
    run("snr", "--snr-gamma", "5", "--steps", "2")

    # A new run from an exported model's weights, with the low-frequency loss: its report measures the model it
    # started from beside it, with the same code.
    started, _, _ = run(
        "stage",
        "--init-from",
        str(straight_out),
        "--steps",
        "2",
        "--low-frequency-weight",
        "1",
        "--report",
        str(tmp_path / "stage.json"),
        *small_report,
    )
    assert started["training"]["init_from"] == str(straight_out) and started["training"]["low_frequency_weight"] == 1
    assert started["previous"]["model"] == str(straight_out) and set(started["previous"]["samples"]) == {
        "eta_0",
        "eta_1",
    }
    assert "previous model" in (tmp_path / "stage.md").read_text()


def test_the_low_frequency_loss_weighs_each_grid_at_unit_noise_variance():
    from lab.train_toy_ddpm import LOW_FREQUENCY_GRIDS, low_frequency_loss

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(512, 3, 32, 32, generator=generator)
    # predicting nothing: each grid's error is the noise averaged over its cells, of variance 1 once scaled
    loss = low_frequency_loss(torch.zeros_like(noise), noise, torch.ones(512))
    assert float(loss.mean()) == pytest.approx(1.0, abs=0.05) and LOW_FREQUENCY_GRIDS == (1, 2, 4, 8)
    assert torch.equal(low_frequency_loss(noise, noise, torch.ones(512)), torch.zeros(512))  # exact: no loss
    half = low_frequency_loss(torch.zeros_like(noise), noise, torch.full((512,), 0.5))
    assert torch.allclose(half, loss * 0.5)  # weighted by the noise fraction


@pytest.mark.parametrize("model", ["ddpm", "sdxl"])
def test_cut_deep_skips_zeroes_exactly_the_skip_inputs_of_the_lowest_up_blocks(model):
    """`lab.toy_model.cut_deep_skips`: in each cut up block, every resnet's weights on the skip tensor it reads (the
    last input channels of `cat([hidden, skip])`) are zero, the rest is untouched, the blocks above keep their
    skips, and `hold_cut` puts the zeros back after an optimiser step."""
    from lab.toy_model import build_pixel_unet, cut_deep_skips, hold_cut

    if model == "ddpm":
        unet = build_pixel_unet()
        inputs = (torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([10]))
        kwargs = {}
    else:
        from lab.toy_sdxl import build_unet

        unet = build_unet()
        inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]))
        kwargs = {
            "encoder_hidden_states": torch.randn(1, 5, unet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.ones(1, 6)},
        }
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cut = cut_deep_skips(unet, 2)
    skips = {}  # up block -> the channels of the skip tensors it reads, in the order its resnets read them

    def record(index):
        def hook(module, args, kwargs_):
            tuple_ = args[1] if len(args) > 1 else kwargs_["res_hidden_states_tuple"]
            skips[index] = [t.shape[1] for t in reversed(tuple_)]

        return hook

    for i, block in enumerate(unet.up_blocks):
        block.register_forward_pre_hook(record(i), with_kwargs=True)
    with torch.no_grad():
        unet(*inputs, **kwargs)
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    expected = set()
    for i, block in enumerate(unet.up_blocks):
        for j, (resnet, skip) in enumerate(zip(block.resnets, skips[i])):
            for name in ("conv1", "conv_shortcut"):
                conv, key = getattr(resnet, name), f"up_blocks.{i}.resnets.{j}.{name}.weight"
                if conv is None or i >= 2:
                    continue
                first = conv.in_channels - skip
                assert torch.count_nonzero(conv.weight[:, first:]) == 0
                assert torch.equal(conv.weight[:, :first], before[key][:, :first])
                expected.add(key)
    assert changed == expected and len(cut) == len(expected)
    with torch.no_grad():
        for weight, _ in cut:
            weight.add_(1.0)  # an optimiser step
    hold_cut(cut)
    assert all(torch.count_nonzero(w[:, first:]) == 0 for w, first in cut)
