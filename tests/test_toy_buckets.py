"""The toy world's aspect-ratio buckets: faces in the centre of a wider or taller canvas (`render_faces(canvas=...)`,
the toy SDXL's data), the default square images unchanged bit for bit, and the oracle reading a non-square image by
its centre square."""

import pytest
import torch

from h_classifiers.toy_world import (
    ATTRIBUTES,
    DATA_BIAS,
    EYE_COLOR,
    GLASSES_COLOR,
    HAIR_COLORS,
    IMAGE_SIZE,
    MOUTH_COLOR,
    SKIN_COLORS,
    ToyOracle,
    _disc,
    _paint,
    make_toy_dataset,
    render_faces,
)


def _render_faces_before_canvas(labels, generator, image_size=IMAGE_SIZE):
    """`render_faces` as it was before the `canvas` argument (commit 77e1252), verbatim: the reference the default
    output must keep matching."""
    n = labels["skin"].shape[0]
    s = image_size / IMAGE_SIZE

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy[None], xx[None]

    level = uniform(0.42, 0.70, 1)
    tint = uniform(-0.025, 0.025, 3)
    angle = uniform(0.0, 2 * torch.pi, 1)
    amplitude = uniform(0.0, 0.06, 1)
    ramp = ((xx - 16) * torch.cos(angle)[:, :, None] + (yy - 16) * torch.sin(angle)[:, :, None]) / 16
    images = (level + tint)[:, :, None, None] + (amplitude[:, :, None] * ramp)[:, None]
    images = images.expand(n, 3, image_size, image_size).clone()

    cx, cy = 16 + uniform(-3, 3), 17 + uniform(-3, 3)
    r = uniform(8, 11)
    skin = SKIN_COLORS[labels["skin"]] + uniform(-0.03, 0.03, 3)
    _paint(images, _disc(xx, yy, cx, cy, r), skin)

    hair = labels["hair"]
    hair_mask = _disc(xx, yy, cx, cy, r + 1.5) & (yy < (cy - 0.3 * r)[:, None, None]) & (hair > 0)[:, None, None]
    hair_color = HAIR_COLORS[(hair - 1).clamp(min=0)] + uniform(-0.03, 0.03, 3)
    _paint(images, hair_mask, hair_color)

    eye_y = cy - 0.05 * r
    eyes = [(cx - 0.38 * r, eye_y), (cx + 0.38 * r, eye_y)]
    has_glasses = (labels["glasses"] > 0)[:, None, None]
    lenses = _disc(xx, yy, *eyes[0], 0.26 * r) | _disc(xx, yy, *eyes[1], 0.26 * r)
    bridge = ((yy - eye_y[:, None, None]).abs() < 0.6) & ((xx - cx[:, None, None]).abs() < (0.38 * r)[:, None, None])
    _paint(images, (lenses | bridge) & has_glasses, GLASSES_COLOR + uniform(-0.03, 0.03, 3))

    eye_r = (0.13 * r).clamp(min=1.1)
    _paint(images, _disc(xx, yy, *eyes[0], eye_r) | _disc(xx, yy, *eyes[1], eye_r), EYE_COLOR.expand(n, 3))

    mouth_x, mouth_y = cx[:, None, None], (cy + 0.45 * r)[:, None, None]
    ax, ay = (0.25 * r)[:, None, None], (0.08 * r + 0.4)[:, None, None]
    mouth = ((xx - mouth_x) / ax) ** 2 + ((yy - mouth_y) / ay) ** 2 < 1
    _paint(images, mouth, MOUTH_COLOR.expand(n, 3))

    images += 0.015 * torch.randn(images.shape, generator=generator)
    return images.clamp_(0, 1)


def _labels(num: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    # As make_toy_dataset draws them.
    return {
        a: torch.multinomial(torch.tensor(p), num, replacement=True, generator=generator) for a, p in DATA_BIAS.items()
    }


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_default_images_are_unchanged(image_size):
    seed, num = 5, 200
    data = make_toy_dataset(num, seed=seed, image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    before = _render_faces_before_canvas(_labels(num, generator), generator, image_size)
    assert torch.equal(data.images, before)
    square = make_toy_dataset(num, seed=seed, image_size=image_size, canvas=(image_size, image_size))
    assert torch.equal(square.images, before)


@pytest.mark.parametrize("canvas", [(32, 48), (48, 32)])
def test_bucket_centre_is_the_square_face(canvas):
    num = 400
    square, bucket = make_toy_dataset(num, seed=9), make_toy_dataset(num, seed=9, canvas=canvas)
    assert bucket.images.shape == (num, 3, *canvas)
    assert bucket.captions == square.captions
    assert all(torch.equal(bucket.labels[a], square.labels[a]) for a in ATTRIBUTES)
    top, left = (canvas[0] - 32) // 2, (canvas[1] - 32) // 2
    crop = bucket.images[:, :, top : top + 32, left : left + 32]
    # The same face and background at the same place: only the pixel noise (std 0.015 each) differs.
    difference = (crop - square.images).abs()
    assert difference.mean() < 0.03 and difference.max() < 0.15
    oracle = ToyOracle()
    for images in (crop, bucket.images):  # the whole image is read by its centre square
        read = oracle.read(images)
        assert read["valid"].all()
        assert all(torch.equal(read[a], bucket.labels[a]) for a in ATTRIBUTES)


def test_bucket_margins_are_background_not_mirrored_face():
    bucket = make_toy_dataset(64, seed=2, canvas=(32, 48))
    margins = torch.cat([bucket.images[..., :8], bucket.images[..., -8:]], dim=-1)
    classes = ToyOracle().pixel_classes(margins)
    assert classes["grey"].float().mean() > 0.99  # background fills the canvas
    for face_colour in ("blue", "black", "red", "mouth"):
        assert not classes[face_colour].any(), face_colour
    # No skin: at most a stray background pixel near a skin colour (the gradient's far ends, rarely).
    assert (classes["light"] | classes["dark_skin"]).float().mean() < 1e-3
    # The gradient continues into the margins (a linear ramp, not a copy of the border columns).
    ramp = bucket.images.mean(dim=(1, 2))  # per-column mean: [N, W]
    assert not torch.allclose(ramp[:, :8], ramp[:, 8:9].expand(-1, 8), atol=1e-3)


def test_oracle_reads_a_non_square_image_by_its_centre_square():
    oracle = ToyOracle()
    data = make_toy_dataset(64, seed=4, canvas=(32, 48))
    # Anything outside the centre square is ignored, even a second face.
    cluttered = data.images.clone()
    cluttered[..., :8] = torch.rand(64, 3, 32, 8, generator=torch.Generator().manual_seed(0))
    full, crop = oracle.diagnose(cluttered), oracle.diagnose(data.images[..., 8:40])
    assert full.keys() == crop.keys() and all(torch.equal(full[k], crop[k]) for k in full)
    # A larger non-square image: its centre square, then area-resized to 32x32 like any square image.
    big = make_toy_dataset(64, seed=4, image_size=64, canvas=(96, 64))
    read = oracle.read(big.images)
    assert read["valid"].float().mean() > 0.95
    assert all((read[a] == big.labels[a]).float().mean() > 0.95 for a in ATTRIBUTES)


@pytest.mark.parametrize("canvas", [(30, 48), (32, 47), (48, 33)])
def test_canvas_must_hold_a_centred_face(canvas):
    with pytest.raises(ValueError, match="canvas"):
        render_faces(_labels(2, torch.Generator()), torch.Generator(), canvas=canvas)
