"""The committed toy assets (models and classifiers) and the names of the toy world's attributes: plain paths and
names, importable without torch, for the command line's defaults and early checks (`h_classifiers.toy_world`
re-exports them)."""

from __future__ import annotations

import os
from pathlib import Path


ASSETS_PATH = Path(__file__).resolve().parent / "assets"
TOY_MODEL_PATH = ASSETS_PATH / "toy-sd"
TOY_DDPM_PATH = ASSETS_PATH / "toy-ddpm"  # the unconditional pixel-space DDPM (a DDIMPipeline)
TOY_CLASSIFIERS_PATH = ASSETS_PATH / "classifiers"
TOY_DDPM_CLASSIFIERS_PATH = TOY_CLASSIFIERS_PATH / "toy-ddpm"  # the toy DDPM's h-classifiers, one folder each
# Each committed toy model, and the folder of its h-classifiers (one sub-folder per attribute).
TOY_MODEL_CLASSIFIERS = {
    TOY_MODEL_PATH: TOY_CLASSIFIERS_PATH,
    TOY_DDPM_PATH: TOY_DDPM_CLASSIFIERS_PATH,
}

ATTRIBUTES: dict[str, list[str]] = {
    "skin": ["light", "dark"],
    "glasses": ["without", "with"],
    "hair": ["none", "black", "red"],
}
NEUTRAL_PROMPT = "a photo of a face"


def committed_toy_model(model: str | os.PathLike | None) -> Path | None:
    """The committed toy model (a key of `TOY_MODEL_CLASSIFIERS`) that `model` names, else None. Every one draws
    the toy world's faces, so the toy world's pixel oracle reads their images."""
    if model is None:
        return None
    path = Path(model)
    if not path.exists():
        return None
    path = path.resolve()
    return next((toy for toy in TOY_MODEL_CLASSIFIERS if toy.resolve() == path), None)
