"""Image grids for the reports: images tiled row by row (`make_grid`) and titled panels side by side
(`side_by_side`). `h_classifiers.evaluation` re-exports both, where the commands and tools import them from."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageOps


def make_grid(
    images: Sequence[Image.Image], columns: int = 8, tile: int | None = None, padding: int = 2
) -> Image.Image:
    """
    Images tiled row by row, each shown `tile` pixels wide (default: small images such as the toy world's 32 px are
    enlarged by an integer factor to at least 64 px with nearest neighbour, so they stay crisp; large ones such as
    Stable Diffusion's 512 px are reduced to 128 px), laid out by `diffusers.utils.make_image_grid`.
    """
    from diffusers.utils import make_image_grid

    if not images:
        raise ValueError("`images` is empty; nothing to put in a grid.")
    width, height = images[0].size
    if tile is None:
        tile = width * math.ceil(64 / width) if width < 64 else min(width, 128)
    w, h = tile, max(1, round(height * tile / width))
    resample = Image.NEAREST if tile >= width else Image.LANCZOS
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    # diffusers' grid has no padding and wants full rows: each cell carries the white padding on its left and top,
    # blank cells complete the last row, and one more padding closes the grid on the right and at the bottom.
    cells = [
        ImageOps.expand(image.convert("RGB").resize((w, h), resample), (padding, padding, 0, 0), "white")
        for image in images
    ]
    cells += [Image.new("RGB", cells[0].size, "white")] * (rows * columns - len(cells))
    return ImageOps.expand(make_image_grid(cells, rows, columns), (0, 0, padding, padding), "white")


def side_by_side(panels: Sequence[tuple[str, Image.Image]], header: int = 18, gap: int = 12) -> Image.Image:
    """Panels next to each other, each with its title above it."""
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    height = header + max(p.height for _, p in panels)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in panels:
        draw.text((x + 2, 3), title, fill="black")
        canvas.paste(panel, (x, header))
        x += panel.width + gap
    return canvas
