"""Fair Diffusion (Friedrich et al., 2023), the baseline a user would pick instead: SEGA edit prompts per image.

Each image draws a class at random from the target distribution (Fair Diffusion's coin, seeded), and is generated
from the unchanged prompt with semantic guidance towards that class's prompt and away from every other class's
prompt, with diffusers' `SemanticStableDiffusionPipeline` built with `from_pipe` on the same components.

`FairDiffusion` is a callable with the pipeline call signature the generation loop uses (`prompt`, `generator`,
per-image `target_classes`), so the same loop (`generation.generate_batches`) and the same per-image seeds serve it.
SEGA's edit prompts apply to a whole call, so one batch is generated as one call per drawn class and put back in
order; each image keeps its own generator, so an image does not depend on how its batch was split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch


# SEGA settings, chosen on the toy world on seeds disjoint from the reproduction table's
# (`python -m lab.reproduce --sweep fair-diffusion`, docs/lab/results/sweep_fair-diffusion.md).
DEFAULT_FAIR_DIFFUSION_SETTINGS: dict[str, Any] = {
    "edit_guidance_scale": 8.0,
    "edit_warmup_steps": 5,
    "edit_threshold": 0.9,
    "edit_momentum_scale": 0.1,
    "edit_mom_beta": 0.4,
}


def draw_classes(target: Sequence[float], num_images: int, seed: int) -> list[int]:
    """Fair Diffusion's per-image coin: a class drawn independently from `target` for each image (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(
        torch.as_tensor(target, dtype=torch.float64), num_images, True, generator=generator
    ).tolist()


@dataclass
class FairDiffusion:
    """SEGA towards each image's class prompt and away from the other classes' prompts."""

    pipe: Any  # a Stable Diffusion pipeline whose components are shared
    class_prompts: list[str]
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_FAIR_DIFFUSION_SETTINGS))

    def __post_init__(self):
        from diffusers import SemanticStableDiffusionPipeline

        if getattr(self.pipe, "text_encoder_2", None) is not None:  # SEGA's pipeline has one text encoder
            raise ValueError(
                "The fair_diffusion baseline runs on Stable Diffusion 1.x/2.x only: diffusers' SEGA pipeline "
                "(SemanticStableDiffusionPipeline) has no SDXL version."
            )

        self.sega = SemanticStableDiffusionPipeline.from_pipe(self.pipe)
        self.sega.set_progress_bar_config(disable=True)

    def __call__(self, prompt: list[str], generator: list[torch.Generator], target_classes: list[int], **kwargs):
        if not (len(prompt) == len(generator) == len(target_classes)):
            raise ValueError("`prompt`, `generator` and `target_classes` need one entry per image.")
        images: list[Any] = [None] * len(prompt)
        # What the safety checker flagged, per image (None when no checker ran), as the pipeline outputs report it.
        flagged: list[bool] | None = [False] * len(prompt)
        for k in sorted(set(target_classes)):
            rows = [i for i, c in enumerate(target_classes) if c == k]
            others = [p for j, p in enumerate(self.class_prompts) if j != k]
            output = self.sega(
                prompt=[prompt[i] for i in rows],
                generator=[generator[i] for i in rows],
                editing_prompt=[self.class_prompts[k], *others],
                reverse_editing_direction=[False] + [True] * len(others),
                **self.settings,
                **kwargs,
            )
            for i, image in zip(rows, output.images):
                images[i] = image
            detected = getattr(output, "nsfw_content_detected", None)
            if detected is None:
                flagged = None
            elif flagged is not None:
                for i, flag in zip(rows, detected):
                    flagged[i] = bool(flag)
        if kwargs.get("output_type") in ("pt", "np") and len(images):
            images = torch.stack(images) if kwargs["output_type"] == "pt" else np.stack(images)
        return SimpleNamespace(images=images, nsfw_content_detected=flagged)
