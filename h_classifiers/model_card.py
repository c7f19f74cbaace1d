"""What a trained h-classifier folder says about itself: the model card (README.md, a `huggingface_hub.ModelCard`
whose metadata is a `ModelCardData`), its per-timestep metrics table and the accuracy plot (accuracy.png).
`training.save_classifier` writes them next to the weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

    from pipeline_balancing_act import HClassifier


PLOT_NAME = "accuracy.png"
# The module of each Balancing Act pipeline (the manifest's "pipeline"), for the card's usage.
PIPELINE_MODULES = {
    "BalancingActPipeline": "pipeline_balancing_act",
    "BalancingActXLPipeline": "pipeline_balancing_act_xl",
    "BalancingActUnconditionalPipeline": "pipeline_balancing_act_unconditional",
}
# The card's metadata: the classifier heads are this project's work, under its license.
CARD_LICENSE = "apache-2.0"
CARD_LIBRARY = "diffusers"
CARD_TAGS = ("balancing-act", "h-classifier", "debiasing", "stable-diffusion")


def public_model_name(model: str | os.PathLike | None) -> str | None:
    """The base model as a published config or card records it: a Hub id as given, a local directory by its folder
    name only (a local absolute path says nothing to others and shows the author's file system)."""
    from pipeline_balancing_act import looks_like_local_path

    if model is None:
        return None
    name = os.fspath(model)
    if looks_like_local_path(name) or os.path.isdir(name):
        return Path(os.path.abspath(os.path.expanduser(name))).name
    return name


def metrics_table(metrics: list[dict], class_names: list[str]) -> str:
    """Markdown table: one row per timestep."""
    header = "| step | timestep | held-out accuracy | balanced accuracy | " + " | ".join(
        f"recall {c}" for c in class_names
    )
    lines = [header + " | train accuracy |", "|" + "---|" * (5 + len(class_names))]
    for m in metrics:
        recalls = " | ".join(f"{r:.3f}" for r in m["recall"])
        lines.append(
            f"| {m['step']} | {m['timestep']:g} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | {recalls} | "
            f"{m['train_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def plot_metrics(metrics: list[dict], path: str | os.PathLike, title: str) -> None:
    # The object API needs no pyplot backend, so the library never changes the caller's matplotlib backend.
    from matplotlib.figure import Figure

    steps = [m["step"] for m in metrics]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, [m["accuracy"] for m in metrics], label="held-out accuracy")
    ax.plot(steps, [m["balanced_accuracy"] for m in metrics], label="held-out balanced accuracy")
    ax.plot(steps, [m["train_accuracy"] for m in metrics], label="train accuracy", linestyle=":")
    ax.set_xlabel("denoising step (0 = noisiest)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def hub_base_model(base_model: str | None) -> str | None:
    """The `base_model` of the card's metadata: a Hub id 'owner/name' only (the Hub rejects a card whose base_model
    names no model; a local folder name such as the toy model's says nothing there)."""
    if not base_model or base_model.count("/") != 1:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def card_data(classifier: HClassifier) -> ModelCardData:
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=hub_base_model(classifier.config.base_model),
        license=CARD_LICENSE,
        library_name=CARD_LIBRARY,
        tags=list(CARD_TAGS),
    )


def model_card(classifier: HClassifier, metrics: list[dict], summary: dict, manifest: dict) -> ModelCard:
    """The classifier's model card: metadata from `card_data`, then what the heads are, how to use them, their
    training data, held-out accuracy per step, intended use and limits."""
    from huggingface_hub import ModelCard

    cfg = classifier.config
    prompts = manifest.get("prompts") or []
    # The pipeline that guides the base model (a store written before the manifest recorded it: Stable Diffusion's).
    pipeline = manifest.get("pipeline") or "BalancingActPipeline"
    module = PIPELINE_MODULES.get(pipeline, "pipeline_balancing_act")
    imports = (
        f"from pipeline_balancing_act import {pipeline}, HClassifier"
        if module == "pipeline_balancing_act"
        else f"from pipeline_balancing_act import HClassifier\nfrom {module} import {pipeline}"
    )
    unconditional = pipeline == "BalancingActUnconditionalPipeline"
    call, count = ("batch_size=16", None) if unconditional else ('"a photo of a face"', "num_images_per_prompt=16")
    if manifest.get("recipe") == "generation" and manifest.get("prompts", []) is None:  # an unconditional model
        eta = (manifest.get("plan") or {}).get("eta")
        source = (
            f"h recorded while generating {manifest.get('num_images')} images with the unconditional model"
            f"{'' if eta is None else f' (DDIM eta {eta:g})'}, pseudo-labelled by `{manifest.get('label_source')}`"
        )
    elif manifest.get("recipe") == "generation":
        source = (
            f"h recorded while generating {manifest.get('num_images')} images with prompt(s) {prompts} "
            f"(classifier-free guidance {manifest.get('guidance_scale')}, branch(es) {manifest.get('branches')}), "
            f"pseudo-labelled by `{manifest.get('label_source')}`"
        )
    elif manifest.get("recipe") == "inversion" and manifest.get("prompts", []) is None:  # an unconditional model
        source = (
            f"h recorded during deterministic DDIM inversion (eta = 0) of {manifest.get('num_images')} labelled images "
            "(one folder per class) with the unconditional model"
        )
    elif manifest.get("recipe") == "inversion":
        source = (
            f"h recorded during deterministic DDIM inversion (eta = 0, prompt {prompts[0] if prompts else ''!r}) of "
            f"{manifest.get('num_images')} labelled images (one folder per class)"
        )
    else:
        source = f"h written directly to a feature store ({manifest.get('num_images')} rows, labels from `{manifest.get('label_source')}`)"
    counts = ", ".join(f"{k}: {v}" for k, v in summary.get("class_counts", {}).items())
    first, middle, last = (summary.get(k, {}) for k in ("first", "middle", "last"))
    training = summary.get("config", {})
    pool = cfg.get("pool_size")
    shape_text = (
        f"h shape {list(cfg.h_shape)}: use it only with this model at this resolution"
        if pool is None
        else f"h shape {list(cfg.h_shape)}, average-pooled to {pool}x{pool}: use it with this model at any resolution "
        f"whose h is at least {pool}x{pool}"
    )
    if training.get("head") == "class_mean":
        head_text = (
            "one class-mean head per timestep: class k's weight is the direction from the mean of the class means to "
            "class k's mean h (training split), times one scale; the scale and the biases are fitted by cross-entropy "
            f"(L-BFGS, class balance `{training.get('balance')}`)."
        )
    else:
        head_text = (
            f"one logistic (free linear) head per timestep, cross-entropy with class balance "
            f"`{training.get('balance')}`, AdamW (lr {training.get('learning_rate')}, weight decay "
            f"{training.get('weight_decay')}), {training.get('epochs')} epochs (at least {training.get('min_steps')} "
            f"steps), batch {training.get('batch_size')}, features standardised during training (folded back into "
            "the saved heads)."
        )
    body = f"""# h-classifier: `{cfg.attribute}` ({", ".join(cfg.class_names)})

Per-timestep linear heads over the UNet mid-block output h (the "Attribute Distribution Predictor" of *Balancing Act:
Distribution-Guided Debiasing in Diffusion Models*, CVPR 2024), for h-space guidance with `{pipeline}`.

- Base model: `{cfg.base_model}` ({shape_text})
- Classes: {list(cfg.class_names)} (class index = position)
- Heads: {len(cfg.timesteps)}, at the timesteps of `{(manifest.get("scheduler") or {}).get("class")}` with
  {manifest.get("num_inference_steps")} steps ({cfg.timesteps[0]:g} ... {cfg.timesteps[-1]:g}); any other scheduler's
  timestep uses the nearest head
- Calibration: {
        "per-step temperature and class offsets fitted on the held-out images"
        if cfg.calibration_scale
        else "none (saved before calibration existed)"
    }
- Anchors (the points in h guidance moves between): {
        cfg.anchor_source or "none (guidance moves along the head weights)"
    }
- Temperature of the paper's soft distribution loss: {cfg.temperature:g}

## Usage

```py
{imports}

pipe = {pipeline}.from_pretrained("<the base model>")
classifier = HClassifier.from_pretrained("<this folder or repo id>")
images = pipe(
    {call},
    h_classifier=classifier,
    guidance_mode="distribution",
    target_distribution=[1 / {len(cfg.class_names)}] * {len(cfg.class_names)},{
        ""
        if count is None
        else f'''
    {count},'''
    }
).images
```

## Training data

{source}. Labelled images: {summary.get("num_images")} ({counts}); {summary.get("num_heldout_images")} held out
(stratified by class, seed {training.get("seed")}). Features stored as {manifest.get("dtype")}.

Training: {head_text}

## Held-out accuracy

First step: {first.get("accuracy", float("nan")):.3f} (balanced {first.get("balanced_accuracy", float("nan")):.3f});
middle step: {middle.get("accuracy", float("nan")):.3f} (balanced {middle.get("balanced_accuracy", float("nan")):.3f});
last step: {last.get("accuracy", float("nan")):.3f} (balanced {last.get("balanced_accuracy", float("nan")):.3f}).

![accuracy per step]({PLOT_NAME})

{metrics_table(metrics, list(cfg.class_names))}

## Intended use

Steering the attribute distribution of images generated by the base model (distribution guidance) or the attribute
of each image (sample guidance), and measuring it on h. Not a classifier of real photographs.

## Limits

- Valid only for the base model and the h shape above (another model, resolution or fine-tune gives other h).
- The labels come from `{manifest.get("label_source")}`: its errors and its class definitions are inherited.
- Early (noisiest) steps are the least accurate; accuracy was measured on held-out images of the same source only.
- The attribute classes are a simplification chosen for this classifier; they are not a statement about people.
"""
    return ModelCard(f"---\n{card_data(classifier).to_yaml()}\n---\n\n{body}")
