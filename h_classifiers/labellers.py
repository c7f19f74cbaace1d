"""Pluggable labellers: images -> class indices for one attribute.

A labeller turns finished images into class indices for the attribute an h-classifier will learn. It is what gives
the pseudo-labels of the generation recipe (`extraction.extract_from_generation`) and can measure generated images.

Contract (`Labeller`):
- `class_names`: the K class names, in the order of the indices it returns.
- `attribute`: the attribute name (may be None for a generic labeller).
- `source`: a short string recorded in the extraction manifest (what produced the labels).
- `__call__(images: list[PIL.Image.Image]) -> torch.LongTensor [N]`: class index per image, or `-1` when the image
  cannot be labelled (an invalid toy-world image, or a prediction below `min_confidence`). Images labelled -1 are
  kept in the feature shards (their h is stored) but dropped from training by the reader.

Three labellers:
- `ToyOracleLabeller`: the toy world's exact pixel oracle for one attribute; invalid images get -1.
- `ImageClassifierLabeller`: any transformers image-classification model (Hub id or local path) through
  `transformers.pipeline("image-classification")`, its `id2label` mapped onto our classes.
- `CLIPZeroShotLabeller`: CLIP zero-shot through `transformers.pipeline("zero-shot-image-classification")`, one text
  prompt per class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from .preflight import LABELLER_KINDS as LABELLER_KINDS
from .preflight import check_labeller_spec


class Labeller:
    """Base class: subclasses set `class_names`, `attribute`, `source` and implement `label`."""

    class_names: list[str]
    attribute: str | None = None
    source: str = "labeller"

    def label(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = list(images)
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"`images[{i}]` must be a PIL.Image.Image, got {type(image).__name__}.")
        if not images:
            return torch.zeros(0, dtype=torch.long)
        labels = self.label(images).to(torch.long).cpu()
        if labels.shape != (len(images),):
            raise RuntimeError(
                f"{type(self).__name__} returned labels of shape {tuple(labels.shape)} for {len(images)} images."
            )
        return labels


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names]
    if len(names) < 2:
        raise ValueError(f"`class_names` needs at least 2 classes, got {names}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`class_names` must be unique, got {names}.")
    return names


def _check_min_confidence(min_confidence: float | None) -> float | None:
    if min_confidence is None:
        return None
    if not (isinstance(min_confidence, (int, float)) and not math.isnan(min_confidence) and 0 <= min_confidence <= 1):
        raise ValueError(f"`min_confidence` must be a number in [0, 1] or None, got {min_confidence!r}.")
    return float(min_confidence)


def _pick(class_probs: torch.Tensor, min_confidence: float | None) -> torch.Tensor:
    confidence, labels = class_probs.max(dim=-1)
    if min_confidence is not None:
        labels = torch.where(confidence >= min_confidence, labels, torch.full_like(labels, -1))
    return labels


class ToyOracleLabeller(Labeller):
    """The toy world's pixel oracle for one attribute (`toy_world.ToyOracle`).

    Images the oracle calls invalid (no single compact face, smeared, ambiguous) get label -1.
    """

    def __init__(self, attribute: str):
        from h_classifiers import toy_world

        if attribute not in toy_world.ATTRIBUTES:
            raise ValueError(f"`attribute` must be one of {sorted(toy_world.ATTRIBUTES)}, got {attribute!r}.")
        self.attribute = attribute
        self.class_names = list(toy_world.ATTRIBUTES[attribute])
        self.source = f"toy_world.ToyOracle[{attribute}]"
        self._oracle = toy_world.ToyOracle()

    def label(self, images: list[Image.Image]) -> torch.Tensor:
        reading = self._oracle.read(images)
        labels = reading[self.attribute].to(torch.long)
        valid = reading["valid"].to(torch.bool)
        return torch.where(valid, labels, torch.full_like(labels, -1))


class _TransformersLabeller(Labeller):
    """A labeller over a transformers `pipeline` (which loads the model and its processor, batches and moves the
    inputs); subclasses turn the pipeline's output into class probabilities [N, K] (`_class_probs`)."""

    min_confidence: float | None = None

    def __init__(
        self,
        task: str,
        model_name_or_path: str,
        device: str | torch.device | None,
        batch_size: int,
        model_kwargs: dict | None,
    ):
        from transformers import pipeline

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = batch_size
        self.pipeline = pipeline(task, model=model_name_or_path, device=self.device, model_kwargs=model_kwargs or {})

    def _class_probs(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def label(self, images: list[Image.Image]) -> torch.Tensor:
        return _pick(self._class_probs(images), self.min_confidence)


class ImageClassifierLabeller(_TransformersLabeller):
    """A transformers image-classification model as labeller (`pipeline("image-classification")`).

    Args:
        model_name_or_path: Hub id or local directory of an `AutoModelForImageClassification` checkpoint.
        class_names: our K class names (the classifier's classes, in order).
        label_map: model label (a name from the model's `config.id2label`) -> one of `class_names`. Several model
            labels may map to one class (their probabilities are summed); model labels left out are ignored (the
            prediction is restricted to mapped labels). Default: each class name matches the model label of the same
            name, case-insensitively.
        min_confidence: label -1 when the winning class's probability (renormalised over mapped labels) is below it.
    """

    def __init__(
        self,
        model_name_or_path: str,
        class_names: Sequence[str],
        label_map: dict[str, str] | None = None,
        attribute: str | None = None,
        min_confidence: float | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        model_kwargs: dict | None = None,
    ):
        self.class_names = _check_class_names(class_names)
        self.attribute = attribute
        self.min_confidence = _check_min_confidence(min_confidence)
        self.source = f"transformers:{model_name_or_path}"
        super().__init__("image-classification", model_name_or_path, device, batch_size, model_kwargs)
        id2label = {int(i): str(name) for i, name in self.pipeline.model.config.id2label.items()}
        self.mapping = build_label_mapping(id2label, self.class_names, label_map)
        # The pipeline reports scores by label name: a name shared by several ids shares its score among them.
        self._label_of_id = id2label
        self._ids_per_label = {name: list(id2label.values()).count(name) for name in id2label.values()}

    def _class_probs(self, images: list[Image.Image]) -> torch.Tensor:
        outputs = self.pipeline(images, top_k=None, function_to_apply="softmax", batch_size=self.batch_size)
        probs = torch.zeros(len(images), self.mapping.shape[0])
        for row, predictions in enumerate(outputs):
            scores: dict[str, float] = {}
            for prediction in predictions:
                scores[prediction["label"]] = scores.get(prediction["label"], 0.0) + prediction["score"]
            for i, name in self._label_of_id.items():
                probs[row, i] = scores.get(name, 0.0) / self._ids_per_label[name]
        probs = probs @ self.mapping  # [N, K]: summed over the model labels of each class
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)


def build_label_mapping(
    id2label: dict[int, str], class_names: Sequence[str], label_map: dict[str, str] | None = None
) -> torch.Tensor:
    """Matrix [num_model_labels, K] with 1 where a model label feeds one of our classes.

    Raises a ValueError naming the offending labels when a mapping refers to an unknown model label or class, or when
    a class receives no model label.
    """
    class_names = list(class_names)
    model_labels = {int(i): str(name) for i, name in id2label.items()}
    by_name = {}
    for i, name in model_labels.items():
        by_name.setdefault(name.lower(), []).append(i)
    if label_map is None:  # by name; classes without a namesake are reported below
        label_map = {name: name for name in class_names if name.lower() in by_name}
    mapping = torch.zeros(max(model_labels) + 1, len(class_names))
    for model_label, class_name in label_map.items():
        if class_name not in class_names:
            raise ValueError(
                f"`label_map` maps {model_label!r} to {class_name!r}, which is not in `class_names` {class_names}."
            )
        ids = by_name.get(str(model_label).lower())
        if ids is None:
            raise ValueError(
                f"`label_map` names the model label {model_label!r}, but the model's id2label has "
                f"{sorted(model_labels.values())}."
            )
        for i in ids:
            mapping[i, class_names.index(class_name)] = 1.0
    missing = [name for k, name in enumerate(class_names) if mapping[:, k].sum() == 0]
    if missing:
        raise ValueError(
            f"No model label maps to the classes {missing}; pass `label_map` (model label -> class). The model's "
            f"labels are {sorted(model_labels.values())}."
        )
    return mapping


class CLIPZeroShotLabeller(_TransformersLabeller):
    """CLIP zero-shot labeller (`pipeline("zero-shot-image-classification")`): the class whose text prompt is most
    similar to the image.

    Args:
        model_name_or_path: Hub id or local directory of a `CLIPModel` checkpoint with its `CLIPProcessor`.
        class_names: our K class names.
        prompts: one text prompt per class (same order; used verbatim). Default: `"a photo of a {class name}"`.
        min_confidence: label -1 when the softmax probability of the winning prompt is below it.
    """

    def __init__(
        self,
        model_name_or_path: str,
        class_names: Sequence[str],
        prompts: Sequence[str] | None = None,
        attribute: str | None = None,
        min_confidence: float | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        model_kwargs: dict | None = None,
    ):
        self.class_names = _check_class_names(class_names)
        if prompts is None:
            prompts = [f"a photo of a {name}" for name in self.class_names]
        prompts = [str(p) for p in prompts]
        if len(prompts) != len(self.class_names):
            raise ValueError(
                f"`prompts` needs one prompt per class ({len(self.class_names)}: {self.class_names}), got {len(prompts)}."
            )
        if len(set(prompts)) != len(prompts):
            raise ValueError(f"`prompts` must be distinct (one per class), got {prompts}.")
        self.prompts = prompts
        self.attribute = attribute
        self.min_confidence = _check_min_confidence(min_confidence)
        self.source = f"clip:{model_name_or_path}"
        super().__init__("zero-shot-image-classification", model_name_or_path, device, batch_size, model_kwargs)

    def _class_probs(self, images: list[Image.Image]) -> torch.Tensor:
        outputs = self.pipeline(
            images, candidate_labels=self.prompts, hypothesis_template="{}", batch_size=self.batch_size
        )
        column = {prompt: k for k, prompt in enumerate(self.prompts)}
        probs = torch.zeros(len(images), len(self.prompts))
        for row, predictions in enumerate(outputs):
            for prediction in predictions:
                probs[row, column[prediction["label"]]] = prediction["score"]
        return probs


def labeller_from_spec(
    spec: str,
    class_names: Sequence[str] | None = None,
    label_map: dict[str, str] | None = None,
    prompts: Sequence[str] | None = None,
    attribute: str | None = None,
    min_confidence: float | None = None,
    device: str | torch.device | None = None,
) -> Labeller:
    """Builds a labeller from a command-line spec: `toy:ATTRIBUTE`, `hf:MODEL_ID_OR_PATH` or `clip:MODEL_ID_OR_PATH`."""
    check_labeller_spec(spec, "labeller")
    kind, _, target = spec.partition(":")
    if kind == "toy":
        return ToyOracleLabeller(target)
    if class_names is None:
        raise ValueError(f"`class_names` is required for the {kind!r} labeller (our class names, in order).")
    if kind == "hf":
        return ImageClassifierLabeller(
            target, class_names, label_map=label_map, attribute=attribute, min_confidence=min_confidence, device=device
        )
    return CLIPZeroShotLabeller(
        target, class_names, prompts=prompts, attribute=attribute, min_confidence=min_confidence, device=device
    )
