"""The toy world: synthetic faces whose attributes are known and readable back from pixels.

Everything here is deterministic from a seed and light to import (torch only, no model is built). It holds:

- the attribute spec (`ATTRIBUTES`), the neutral prompt and the explicit prompt of each class (`attribute_prompt`);
- the data generator (`make_toy_dataset`): 32x32 RGB faces with a deliberate bias (skin 80/20, glasses 70/30
  without/with, hair 50/35/15 none/black/red, attributes independent) and a caption per image; optionally in the
  centre of a wider or taller canvas (`canvas`, the toy SDXL's aspect-ratio buckets);
- the pixel oracle (`ToyOracle`): a rule-based reader for each attribute and a strict validity rule;
- the paths of the committed assets (`TOY_MODEL_PATH`, `TOY_DDPM_PATH`, `TOY_CLASSIFIERS_PATH`);
- labelled class folders of rendered faces for the folder recipe (`write_class_folders`), also on the command line:

    python -m h_classifiers.toy_world --write-folders data/skin --attribute skin --num-per-class 200
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

# The paths of the committed assets, the attributes and the neutral prompt live in `toy_assets` (no torch import).
from .toy_assets import ASSETS_PATH as ASSETS_PATH
from .toy_assets import ATTRIBUTES as ATTRIBUTES
from .toy_assets import NEUTRAL_PROMPT as NEUTRAL_PROMPT
from .toy_assets import TOY_CLASSIFIERS_PATH as TOY_CLASSIFIERS_PATH
from .toy_assets import TOY_DDPM_CLASSIFIERS_PATH as TOY_DDPM_CLASSIFIERS_PATH
from .toy_assets import TOY_DDPM_PATH as TOY_DDPM_PATH
from .toy_assets import TOY_MODEL_PATH as TOY_MODEL_PATH


# The data's bias: class probabilities in the order of ATTRIBUTES (what the neutral prompt should reproduce).
DATA_BIAS: dict[str, list[float]] = {
    "skin": [0.8, 0.2],
    "glasses": [0.7, 0.3],
    "hair": [0.5, 0.35, 0.15],
}

IMAGE_SIZE = 32
NEUTRAL_CAPTIONS = [NEUTRAL_PROMPT, "a face", "a picture of a face", "an image of a face", "a photo of one face"]

# Colour prototypes (RGB in [0, 1]) shared by the generator and the oracle.
SKIN_COLORS = torch.tensor([[0.95, 0.80, 0.68], [0.45, 0.28, 0.18]])
HAIR_COLORS = torch.tensor([[0.10, 0.08, 0.08], [0.80, 0.25, 0.10]])  # black, red
GLASSES_COLOR = torch.tensor([0.15, 0.30, 0.90])
EYE_COLOR = torch.tensor([0.06, 0.05, 0.08])
MOUTH_COLOR = torch.tensor([0.75, 0.12, 0.22])

# Words of the explicit prompts; the captions use these and a few variants.
_SKIN_PHRASES = {"light": "light skin", "dark": "dark skin"}
_SKIN_ADJECTIVES = {"light": "light skinned", "dark": "dark skinned"}
_GLASSES_PHRASES = {"without": "without glasses", "with": "with glasses"}
_HAIR_PHRASES = {"none": "no hair", "black": "black hair", "red": "red hair"}
_HAIR_NONE_VARIANTS = ["a bald face", "a face without hair"]
_CAPTION_PREFIXES = ["a photo of", "a picture of", "an image of", ""]


def _check_class(attribute: str, class_name: str) -> None:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"`attribute` must be one of {list(ATTRIBUTES)}, got {attribute!r}.")
    if class_name not in ATTRIBUTES[attribute]:
        raise ValueError(f"`class_name` for {attribute!r} must be one of {ATTRIBUTES[attribute]}, got {class_name!r}.")


def attribute_prompt(attribute: str, class_name: str) -> str:
    """The explicit prompt that asks for one class of one attribute (the prompt baseline).

    Examples: "a photo of a face with dark skin", "a photo of a face without glasses", "a photo of a face with
    no hair".
    """
    _check_class(attribute, class_name)
    if attribute == "skin":
        return f"{NEUTRAL_PROMPT} with {_SKIN_PHRASES[class_name]}"
    if attribute == "glasses":
        return f"{NEUTRAL_PROMPT} {_GLASSES_PHRASES[class_name]}"
    return f"{NEUTRAL_PROMPT} with {_HAIR_PHRASES[class_name]}"


def explicit_prompts() -> dict[str, dict[str, str]]:
    """`{attribute: {class_name: prompt}}` for every class of every attribute."""
    return {a: {c: attribute_prompt(a, c) for c in classes} for a, classes in ATTRIBUTES.items()}


def caption_for(labels: dict[str, str], rng: random.Random, neutral_fraction: float = 0.5) -> str:
    """One caption for an image with the given class names: neutral, or naming one or more of its attributes."""
    if rng.random() < neutral_fraction:
        return rng.choice(NEUTRAL_CAPTIONS)
    named = [a for a in ATTRIBUTES if rng.random() < 0.5]
    if not named:
        named = [rng.choice(list(ATTRIBUTES))]
    if len(named) == 1 and rng.random() < 0.4:
        # The exact explicit prompt, so that the prompt baseline is in-distribution.
        return attribute_prompt(named[0], labels[named[0]])
    prefix = rng.choice(_CAPTION_PREFIXES)
    subject = "a face"
    withs = []
    for attribute in named:
        value = labels[attribute]
        if attribute == "skin":
            if rng.random() < 0.5:
                subject = f"a {_SKIN_ADJECTIVES[value]} face"
            else:
                withs.append(f"with {_SKIN_PHRASES[value]}")
        elif attribute == "glasses":
            withs.append(_GLASSES_PHRASES[value])
        elif value == "none" and rng.random() < 0.5 and subject == "a face":
            subject = rng.choice(_HAIR_NONE_VARIANTS)
        else:
            withs.append(f"with {_HAIR_PHRASES[value]}")
    rng.shuffle(withs)
    words = ([prefix] if prefix else []) + [subject] + ([" and ".join(withs)] if withs else [])
    return " ".join(words)


def caption_vocabulary() -> list[str]:
    """Every word that a caption or prompt of the toy world can contain (for the tiny tokenizer)."""
    texts = NEUTRAL_CAPTIONS + _HAIR_NONE_VARIANTS + _CAPTION_PREFIXES + ["and with"]
    texts += list(_SKIN_PHRASES.values()) + list(_SKIN_ADJECTIVES.values())
    texts += list(_GLASSES_PHRASES.values()) + list(_HAIR_PHRASES.values())
    texts += [p for prompts in explicit_prompts().values() for p in prompts.values()]
    return sorted({word for text in texts for word in text.split()})


class ToySamples(NamedTuple):
    """A batch of the toy dataset: images [N, 3, H, W] float in [0, 1], labels `{attribute: LongTensor[N]}`,
    captions (N strings)."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    captions: list[str]


def _disc(xx: torch.Tensor, yy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Boolean masks [N, H, W] of discs with per-image centre and radius (all [N])."""
    return (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2 < r[:, None, None] ** 2


def _paint(images: torch.Tensor, mask: torch.Tensor, colors: torch.Tensor) -> None:
    """Fill `mask` [N, H, W] of `images` [N, 3, H, W] with one colour per image, colors [N, 3]; in place."""
    m = mask[:, None].to(images.dtype)
    images.mul_(1 - m).add_(m * colors[:, :, None, None])


def _canvas_size(image_size: int, canvas: tuple[int, int] | None) -> tuple[int, int]:
    """The (height, width) of the rendered images: `canvas`, checked, or the square `image_size`."""
    if canvas is None:
        return image_size, image_size
    height, width = canvas
    if min(height, width) < image_size or (height - image_size) % 2 or (width - image_size) % 2:
        raise ValueError(
            f"`canvas` (height, width) must be at least `image_size` ({image_size}) on each side, with an even "
            f"margin so that the face is exactly centred, got {tuple(canvas)}."
        )
    return height, width


def render_faces(
    labels: dict[str, torch.Tensor],
    generator: torch.Generator,
    image_size: int = IMAGE_SIZE,
    canvas: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Draw one face per label set. Returns float images [N, 3, S, S] in [0, 1]. Geometry scales with `image_size`.

    `canvas` (height, width), at least `image_size` on each side: the face is drawn at the same scale in the centre of
    a larger canvas, [N, 3, height, width], whose background (grey level, tint, gradient, pixel noise) fills it all;
    its centre square of side `image_size` is a face like the square ones (the aspect-ratio buckets of the toy SDXL).
    None (the default) gives the square images, unchanged.
    """
    n = labels["skin"].shape[0]
    s = image_size / IMAGE_SIZE
    height, width = _canvas_size(image_size, canvas)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    # Coordinates in the 32-pixel face frame; a wider or taller canvas extends them by half its margin on each side.
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - (height - image_size) // 2) / s
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - (width - image_size) // 2) / s
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    yy, xx = yy[None], xx[None]

    # Background: grey of random level, slight tint, linear gradient.
    level = uniform(0.42, 0.70, 1)
    tint = uniform(-0.025, 0.025, 3)
    angle = uniform(0.0, 2 * torch.pi, 1)
    amplitude = uniform(0.0, 0.06, 1)
    ramp = ((xx - 16) * torch.cos(angle)[:, :, None] + (yy - 16) * torch.sin(angle)[:, :, None]) / 16
    images = (level + tint)[:, :, None, None] + (amplitude[:, :, None] * ramp)[:, None]
    images = images.expand(n, 3, height, width).clone()

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


def make_toy_dataset(
    num_samples: int,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    neutral_fraction: float = 0.5,
    canvas: tuple[int, int] | None = None,
) -> ToySamples:
    """`num_samples` biased toy faces with labels and captions, identical for the same arguments.

    Attributes are drawn independently with the probabilities in `DATA_BIAS`; about `neutral_fraction` of the
    captions are neutral, the rest name one or more of the image's attributes. `canvas` (height, width): the faces
    drawn in the centre of a larger canvas (`render_faces`); the labels and captions do not depend on it.
    """
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    generator = torch.Generator().manual_seed(seed)
    labels = {
        a: torch.multinomial(torch.tensor(p), num_samples, replacement=True, generator=generator)
        for a, p in DATA_BIAS.items()
    }
    images = render_faces(labels, generator, image_size, canvas)
    rng = random.Random(seed)
    captions = [
        caption_for({a: ATTRIBUTES[a][int(labels[a][i])] for a in ATTRIBUTES}, rng, neutral_fraction)
        for i in range(num_samples)
    ]
    return ToySamples(images, labels, captions)


def write_class_folders(
    attribute: str, output_dir: str | os.PathLike, num_per_class: int, seed: int = 0, image_size: int = IMAGE_SIZE
) -> dict[str, list[Path]]:
    """Labelled image folders for the folder recipe (`balancing-act extract --image-dir`): `num_per_class` rendered
    faces of each class of `attribute`, as PNG files `<output_dir>/<class name>/<index>.png`, written atomically.

    The other attributes are drawn independently with the data's bias (`DATA_BIAS`), so the classes differ in
    `attribute` only, and each looks like the data the toy models learnt. Deterministic from `seed`. `output_dir` must
    be new or empty (a run with other arguments would leave a mix). Returns {class name: paths, in index order}.
    """
    from PIL import Image

    from .io_utils import atomic_save_image

    if attribute not in ATTRIBUTES:
        raise ValueError(f"`attribute` must be one of {list(ATTRIBUTES)}, got {attribute!r}.")
    if isinstance(num_per_class, bool) or not isinstance(num_per_class, int) or num_per_class < 1:
        raise ValueError(f"`num_per_class` must be a positive integer, got {num_per_class!r}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"`output_dir` {str(output_dir)!r} must be a new or empty directory.")
    classes = ATTRIBUTES[attribute]
    total = num_per_class * len(classes)
    generator = torch.Generator().manual_seed(seed)
    labels = {
        a: torch.arange(len(classes)).repeat_interleave(num_per_class)
        if a == attribute
        else torch.multinomial(torch.tensor(p), total, replacement=True, generator=generator)
        for a, p in DATA_BIAS.items()
    }
    pixels = render_faces(labels, generator, image_size).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    digits = len(str(num_per_class - 1))
    written: dict[str, list[Path]] = {name: [] for name in classes}
    for i, array in enumerate(pixels):
        name = classes[i // num_per_class]
        path = output_dir / name / f"{i % num_per_class:0{digits}d}.png"
        atomic_save_image(Image.fromarray(array), path)
        written[name].append(path)
    return written


def _to_tensor(images: torch.Tensor | Sequence) -> torch.Tensor:
    """PIL images or a float tensor [N, 3, H, W] in [0, 1] -> float tensor [N, 3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"`images` tensor must be float [N, 3, H, W] in [0, 1], got dtype {images.dtype}, "
                f"shape {tuple(images.shape)}."
            )
        low, high = images.min().item(), images.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"`images` tensor values must be in [0, 1] (map [-1, 1] images with (x + 1) / 2 first), "
                f"got range [{low:.3f}, {high:.3f}]."
            )
        return images.detach().float().cpu().clamp(0, 1)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError("`images` must be a non-empty list of PIL images or a float tensor [N, 3, H, W] in [0, 1].")
    import numpy as np  # only needed for PIL input

    arrays = []
    for image in images:
        if not hasattr(image, "convert"):
            raise ValueError(f"`images` list items must be PIL images, got {type(image).__name__}.")
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("`images` PIL images must all have the same size.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class ToyOracle:
    """Reads the toy world's attributes from pixels with fixed colour rules, and judges validity strictly.

    `read(images)` takes a list of PIL images, or a float tensor [N, 3, H, W] with values in [0, 1] (a [-1, 1] tensor
    is refused: convert it with (x + 1) / 2). A non-square image is read by its centre square (the face of an
    aspect-ratio bucket, `render_faces(canvas=...)`); a square of another size than 32x32 is area-resized to 32x32.
    It returns `{"skin", "glasses", "hair"}` -> LongTensor[N] class indices (positions in `ATTRIBUTES`) and
    "valid" -> BoolTensor[N]. An image is valid when it shows exactly one compact face of uniform skin with eyes and a
    mouth, few pixels of no known colour, and every attribute read unambiguously (pixel counts outside the gap
    between "absent" and "present"); the class read for an invalid image is a best guess.
    """

    # Pixel-count thresholds at 32x32: "present" needs >= high, "absent" needs <= low; between is ambiguous.
    skin_distance = 0.16
    skin_pixels = (70, 430)
    skin_minority_max = 0.05
    skin_far_radius = 13.5
    skin_far_max = 0.03
    skin_rms_max = 8.5
    glasses_pixels = (3, 10)
    hair_pixels = (24, 40)
    eye_pixels_min = 2
    mouth_pixels_min = 2
    unexplained_max = 0.15

    def pixel_classes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean masks [N, H, W] of the colour classes the rules count."""
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        dist = torch.cdist(x.permute(0, 2, 3, 1).reshape(-1, 3), SKIN_COLORS).reshape(x.shape[0], *x.shape[2:], 2)
        light = dist[..., 0] < self.skin_distance
        dark_skin = dist[..., 1] < self.skin_distance
        top, bottom = x.max(dim=1).values, x.min(dim=1).values
        return {
            "light": light,
            "dark_skin": dark_skin,
            # Loose enough for lenses and eyes blurred into dark skin; grey background and skin never get there.
            "blue": (b - r > 0.2) & (b - g > 0.12),
            "black": top < 0.3,
            "red": (r > 0.5) & (r - g > 0.3) & (g > b),
            # Looser than hair red: the small mouth blurs into the skin around it.
            "mouth": (r > 0.4) & (r - g > 0.25) & (b >= g - 0.03),
            "grey": (top - bottom < 0.12) & (top >= 0.3),
        }

    def read(self, images: torch.Tensor | Sequence) -> dict[str, torch.Tensor]:
        out = self.diagnose(images)
        checks = [key for key in out if key.endswith("_ok")]
        valid = torch.stack([out[key] for key in checks]).all(dim=0)
        return {"skin": out["skin"], "glasses": out["glasses"], "hair": out["hair"], "valid": valid}

    def diagnose(self, images: torch.Tensor | Sequence) -> dict[str, torch.Tensor]:
        """The classes read and each validity check separately (`*_ok` BoolTensors; `valid` is their AND)."""
        x = _to_tensor(images)
        height, width = x.shape[-2:]
        if height != width:  # an aspect-ratio bucket's image: the face is in its centre square
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            x = x[..., top : top + side, left : left + side]
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = torch.nn.functional.adaptive_avg_pool2d(x, IMAGE_SIZE)
        masks = self.pixel_classes(x)
        counts = {k: m.flatten(1).sum(1) for k, m in masks.items()}
        out: dict[str, torch.Tensor] = {}

        n_light, n_dark = counts["light"], counts["dark_skin"]
        n_skin = n_light + n_dark
        out["skin"] = (n_dark > n_light).long()
        out["skin_size_ok"] = (n_skin >= self.skin_pixels[0]) & (n_skin <= self.skin_pixels[1])
        # Uniformity ignores skin pixels touching hair or eyes: a blurred black edge over light skin looks brown.
        dark_features = (masks["black"] | masks["red"]).float()[:, None]
        away = F.max_pool2d(dark_features, 3, stride=1, padding=1)[:, 0] == 0
        a_light, a_dark = (masks["light"] & away).flatten(1).sum(1), (masks["dark_skin"] & away).flatten(1).sum(1)
        out["skin_uniform_ok"] = torch.minimum(a_light, a_dark) <= self.skin_minority_max * (a_light + a_dark)
        out["skin_compact_ok"] = self._compact(masks["light"] | masks["dark_skin"])

        low, high = self.glasses_pixels
        out["glasses"] = (counts["blue"] >= high).long()
        out["glasses_ok"] = (counts["blue"] <= low) | (counts["blue"] >= high)

        low, high = self.hair_pixels
        n_black, n_red = counts["black"], counts["red"]
        hair = torch.where(n_black >= high, 1, torch.where(n_red >= high, 2, 0))
        out["hair"] = torch.where((n_black >= high) & (n_red > n_black), 2, hair).long()
        hair_ok = ((n_black <= low) & (n_red <= low)) | ((n_black >= high) & (n_red <= low))
        out["hair_ok"] = hair_ok | ((n_red >= high) & (n_black <= low))

        # A face has visible eyes and mouth (a smeared blob of skin colour does not).
        out["features_ok"] = (n_black >= self.eye_pixels_min) & (counts["mouth"] >= self.mouth_pixels_min)
        explained = torch.zeros_like(masks["grey"])
        for m in masks.values():
            explained |= m
        out["colours_ok"] = 1 - explained.flatten(1).float().mean(1) <= self.unexplained_max
        return out

    def _compact(self, mask: torch.Tensor) -> torch.Tensor:
        """One compact blob: few pixels far from the centroid and a small RMS radius (two faces or smears fail)."""
        n, h, w = mask.shape
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        m = mask.float()
        total = m.flatten(1).sum(1).clamp(min=1)
        cy = (m * yy).flatten(1).sum(1) / total
        cx = (m * xx).flatten(1).sum(1) / total
        d2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
        rms = ((m * d2).flatten(1).sum(1) / total).sqrt()
        far = (m * (d2 > self.skin_far_radius**2)).flatten(1).sum(1) / total
        return (rms <= self.skin_rms_max) & (far <= self.skin_far_max)


def class_fractions(read: dict[str, torch.Tensor], only_valid: bool = False) -> dict[str, list[float]]:
    """Per-attribute class fractions of an oracle reading (over all images, or over the valid ones only; zeros when
    there is none), by `metrics.class_fractions`."""
    from .metrics import class_fractions as fractions_of

    keep = read["valid"] if only_valid else None
    return {a: fractions_of(read[a], len(classes), keep) or [0.0] * len(classes) for a, classes in ATTRIBUTES.items()}


def main(argv: list[str] | None = None) -> None:
    """`python -m h_classifiers.toy_world --write-folders DIR --attribute ATTRIBUTE`: `write_class_folders`."""
    import argparse

    from h_classifiers.arguments import positive_int

    parser = argparse.ArgumentParser(
        prog="python -m h_classifiers.toy_world",
        description="Write labelled class folders of rendered toy faces (one sub-folder per class of --attribute, the "
        "other attributes drawn with the data's bias), for `balancing-act extract --image-dir`.",
    )
    parser.add_argument("--write-folders", required=True, metavar="OUTPUT_DIR", help="New or empty directory.")
    parser.add_argument("--attribute", required=True, choices=list(ATTRIBUTES), help="The attribute of the classes.")
    parser.add_argument("--num-per-class", type=positive_int, default=100, help="Images per class (default: 100).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the drawing (default: 0).")
    args = parser.parse_args(argv)
    try:
        written = write_class_folders(args.attribute, args.write_folders, args.num_per_class, seed=args.seed)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    counts = ", ".join(f"{name} {len(paths)}" for name, paths in written.items())
    print(f"{args.attribute} class folders in {args.write_folders}: {counts}.")


if __name__ == "__main__":
    main()
