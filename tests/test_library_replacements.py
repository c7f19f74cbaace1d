"""Hand-written code replaced by library code (diffusers / transformers), each checked against what it replaced: the
old implementations are kept here as references."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from h_classifiers import toy_world
from h_classifiers.evaluation import make_grid


# ---------------------------------------------------------------------------------------------------------------
# Image grids: diffusers.utils.make_image_grid
# ---------------------------------------------------------------------------------------------------------------


def reference_make_grid(images, columns=8, tile=None, padding=2):
    """evaluation.make_grid before it used diffusers.utils.make_image_grid."""
    width, height = images[0].size
    if tile is None:
        tile = width * math.ceil(64 / width) if width < 64 else min(width, 128)
    w, h = tile, max(1, round(height * tile / width))
    resample = Image.NEAREST if tile >= width else Image.LANCZOS
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (w + padding) + padding, rows * (h + padding) + padding), "white")
    for i, image in enumerate(images):
        cell = image.convert("RGB").resize((w, h), resample)
        grid.paste(cell, (padding + (i % columns) * (w + padding), padding + (i // columns) * (h + padding)))
    return grid


def reference_toy_report_grid(rows, columns, scale=2):
    """lab/toy_report.save_grid's image before it used diffusers.utils.make_image_grid."""
    size = rows[0][1].shape[-1] * scale
    label_width, pad = 280, 2
    grid = Image.new("RGB", (label_width + columns * (size + pad), len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images[:columns]):
            array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(array).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_width + c * (size + pad), y))
    return grid


def random_images(n, size, seed=0, mode="RGB"):
    generator = torch.Generator().manual_seed(seed)
    arrays = torch.randint(0, 256, (n, size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
    return [Image.fromarray(a).convert(mode) for a in arrays]


@pytest.mark.parametrize(
    "n, size, kwargs",
    [
        (10, (32, 32), {}),  # toy images enlarged x2 with nearest neighbour, a partial last row
        (16, (16, 16), {"columns": 4, "padding": 1}),
        (3, (512, 512), {"padding": 0}),  # reduced to 128 px (Lanczos), one row
        (5, (96, 64), {"columns": 2, "tile": 40}),  # not square, odd tile
        (1, (32, 32), {"padding": 5}),
    ],
)
def test_make_grid_is_pixel_identical_to_the_hand_written_grid(n, size, kwargs):
    images = random_images(n, size, seed=n)
    new, old = make_grid(images, **kwargs), reference_make_grid(images, **kwargs)
    assert new.size == old.size and new.mode == old.mode == "RGB"
    assert np.array_equal(np.asarray(new), np.asarray(old))


def test_make_grid_converts_other_modes():
    images = random_images(3, (8, 8), mode="L") + random_images(2, (8, 8), mode="RGBA")
    assert np.array_equal(np.asarray(make_grid(images)), np.asarray(reference_make_grid(images)))


def test_toy_report_grid_is_pixel_identical(tmp_path):
    from lab.toy_report import save_grid

    data = toy_world.make_toy_dataset(7, seed=2)
    rows = [("a photo of a face", data.images[:7]), ("a face with red hair", data.images[:3])]  # one row is short
    save_grid(rows, tmp_path / "grid.png", columns=5)
    with Image.open(tmp_path / "grid.png") as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(reference_toy_report_grid(rows, 5)))


# ---------------------------------------------------------------------------------------------------------------
# Images for inversion: the pipeline's VaeImageProcessor makes the tensor
# ---------------------------------------------------------------------------------------------------------------


def reference_load_image(path, height, width):
    """extraction.load_image before the pipeline's image processor made the tensor."""
    with Image.open(path) as image:
        image.load()
        image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture(scope="module")
def image_processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8)  # what StableDiffusionPipeline builds


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (100, 64), (47, 33), (512, 384)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_inversion_images_give_the_same_tensor(size, mode, image_processor, tmp_path):
    from h_classifiers.inversion import load_image

    path = tmp_path / "image.png"
    random_images(1, size, seed=size[0], mode=mode)[0].save(path)
    for height, width in ((32, 32), (64, 32)):
        new = load_image(path, height, width, image_processor)
        assert new.shape == (3, height, width) and new.dtype == torch.float32
        torch.testing.assert_close(new, reference_load_image(path, height, width), rtol=0, atol=1e-6)


def test_the_image_processors_own_crop_would_change_resized_images(image_processor, tmp_path):
    """Why the resize and crop stay ours (see `extraction.load_image`): at the target size the processor agrees, a
    resized image differs (it floors the resized size and resamples with Lanczos)."""
    for size, expected_equal in (((32, 32), True), ((512, 384), False)):
        path = tmp_path / f"{size[0]}.png"
        random_images(1, size, seed=1)[0].save(path)
        with Image.open(path) as image:
            processed = image_processor.preprocess(image.convert("RGB"), 32, 32, resize_mode="crop")[0]
        difference = float((processed - reference_load_image(path, 32, 32)).abs().max())
        assert (difference < 1e-6) == expected_equal, difference


# ---------------------------------------------------------------------------------------------------------------
# DDIM inversion: diffusers.DDIMInverseScheduler compared, not adopted (see extraction._ddim_move)
# ---------------------------------------------------------------------------------------------------------------


def inverse_scheduler_h(pipe, images, embeds, steps, step_ahead):
    """h at every step (generation order) of an inversion driven by DDIMInverseScheduler: its own loop (UNet at t on
    the previous level's latent), or its `step` given the next timestep after a UNet call at (x_t, t)."""
    from diffusers import DDIMInverseScheduler

    from h_classifiers import MidBlockHook

    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    inverse = DDIMInverseScheduler.from_config(config, clip_sample=False)
    inverse.set_timesteps(steps)
    ascending = inverse.timesteps.tolist()
    calls = []
    with torch.no_grad(), MidBlockHook(pipe.unet, lambda h: calls.append(h.clone())):
        x = pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
        if not step_ahead:
            for t in ascending:
                x = inverse.step(pipe.unet(x, t, encoder_hidden_states=embeds).sample, t, x).prev_sample
            return list(reversed(calls))
        x = inverse.step(pipe.unet(x, ascending[0], encoder_hidden_states=embeds).sample, ascending[0], x).prev_sample
        calls.clear()
        for j, t in enumerate(ascending):
            out = pipe.unet(x, t, encoder_hidden_states=embeds).sample
            if j + 1 < len(ascending):
                x = inverse.step(out, ascending[j + 1], x).prev_sample
    return list(reversed(calls))


def max_relative_difference(a, b):
    return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b))


def test_ddim_inverse_scheduler_reproduces_the_stored_h_only_on_evenly_spaced_schedules():
    from diffusers import StableDiffusionPipeline
    from tiny_models import tiny_components

    from h_classifiers.inversion import ddim_schedule, invert_and_record

    pipe = StableDiffusionPipeline(**tiny_components(), requires_safety_checker=False)
    images = toy_world.make_toy_dataset(3, seed=4, image_size=16).images * 2 - 1
    embeds, _ = pipe.encode_prompt("", "cpu", 3, False)

    def ours(steps):
        hs, _ = invert_and_record(pipe, images, ddim_schedule(pipe, steps), embeds, storage_dtype=torch.float32)
        return hs

    # Leading spacing (the toy model's and SD 1.x's): the library's step, given the next timestep, is exact.
    assert pipe.scheduler.config.timestep_spacing == "leading"
    for steps in (5, 7):
        reference = ours(steps)
        assert max_relative_difference(reference, inverse_scheduler_h(pipe, images, embeds, steps, True)) < 1e-6
    # Its own loop pairs the UNet's timestep with the previous level's latent: other h.
    assert max_relative_difference(reference, inverse_scheduler_h(pipe, images, embeds, 7, False)) > 1e-2
    # Trailing spacing with steps not dividing 1000: the timesteps are uneven and its fixed stride mis-steps.
    pipe.scheduler.register_to_config(timestep_spacing="trailing")
    assert max_relative_difference(ours(7), inverse_scheduler_h(pipe, images, embeds, 7, True)) > 1e-4
    pipe.scheduler.register_to_config(timestep_spacing="linspace")
    ours(7)  # any DDIM schedule inverts
    with pytest.raises(ValueError, match="linspace"):
        inverse_scheduler_h(pipe, images, embeds, 7, True)
