"""Evaluation of Balancing Act guidance: generate, label, measure class fractions, FD, valid rate and time.

These configurations are compared on the same prompt and the same per-image seeds:

- `vanilla`: the pipeline without guidance (bit-for-bit Stable Diffusion);
- `sample`: sample guidance; image i is guided to class c_i, the c_i drawn deterministically so that the classes
  match the target distribution (`asked_classes`); the per-image hit rate on the asked class is reported;
- `distribution`: distribution guidance toward the target; when the images take several batches, a `BalanceState`
  carries the class counts from batch to batch so that the whole run lands on the target;
- `prompt`: the prompt baseline: no guidance, the attribute written into the prompt (one explicit prompt per class),
  the classes drawn as for `sample`, e.g. for a 30/70 skin target 30% "light" and 70% "dark" explicit prompts;
- `fair_diffusion`: the Fair Diffusion baseline (`baselines.FairDiffusion`): the neutral prompt, SEGA edit prompts
  towards a class drawn at random per image from the target and away from the other classes;
- `selection` (opt-in, `h_classifiers.selection`): vanilla images read by the labeller and kept while their class has
  room, until the target counts are filled; it reports the images generated per image kept, its seconds are those of
  every image generated.

Measurement (the measures are defined in `h_classifiers.metrics`): a labeller (`h_classifiers.labellers`) gives each
image a class index, or -1 when it cannot label it (the toy oracle: an invalid image). Class fractions are one-hot
predictions counted over the labelled images only; fairness discrepancy FD = || p_ref - p_measured ||_2 over those
fractions; the valid rate is the fraction of images labelled (for the toy oracle: the oracle's validity rule); seconds
is the wall time of generation (VAE decode included, labelling excluded). An image the model's safety checker blacked
out counts as unlabelled, and their number is reported (`num_blacked_out`). A configuration meets the target when its
FD is at most `TARGET_FD`.

Image i of a run always uses the seed `seed + i` (one generator per image), so a configuration's images do not depend
on the batch size unless the guidance does (only distribution mode couples the images of a batch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .distributed import gather_indexed, is_main

# `Generation` (what one configuration generated) and `nsfw_flags` live in `generation`, below the tools that share
# them (this module, selection, extraction); these names stay importable from here.
from .generation import Generation as Generation
from .generation import generate_batches
from .generation import nsfw_flags as nsfw_flags
from .grids import make_grid as make_grid
from .grids import side_by_side as side_by_side
from .io_utils import atomic_save_figure, atomic_save_image, atomic_write_json

# Targets and measures live in `metrics`; these names stay importable from here.
from .metrics import TARGET_FD as TARGET_FD
from .metrics import asked_classes as asked_classes
from .metrics import check_target_values as check_target_values
from .metrics import class_counts as class_counts
from .metrics import class_fractions as class_fractions
from .metrics import fairness_discrepancy as fairness_discrepancy
from .metrics import format_probabilities as format_probabilities
from .metrics import hit_rates as hit_rates
from .metrics import parse_target as parse_target
from .metrics import summarize_labels as summarize_labels
from .metrics import target_verdicts as target_verdicts

# The names the command line offers, and what a model's files say, live in `preflight` (no torch import); these names
# stay importable from here.
from .preflight import CONFIGURATIONS as CONFIGURATIONS
from .preflight import DEFAULT_CONFIGURATIONS as DEFAULT_CONFIGURATIONS
from .preflight import DTYPE_NAMES, MODEL_EXPECTED
from .preflight import OPT_IN_CONFIGURATIONS as OPT_IN_CONFIGURATIONS
from .preflight import SCHEDULERS as SCHEDULERS
from .preflight import TEXT_CONFIGURATIONS as TEXT_CONFIGURATIONS
from .preflight import UNCONDITIONAL_PIPELINES as UNCONDITIONAL_PIPELINES
from .preflight import is_local_model as is_local_model
from .preflight import model_index as model_index
from .preflight import unconditional_model_class as unconditional_model_class
from .preflight import unconditional_scheduler_error as unconditional_scheduler_error
from .preflight import xl_model_class as xl_model_class


GUIDED_CONFIGURATIONS = {"sample": "sample", "distribution": "distribution"}


# ----------------------------------------------------------------------------------------------------------------
# Pipeline helpers
# ----------------------------------------------------------------------------------------------------------------


def set_scheduler(pipe, name: str, config: dict[str, Any] | None = None, **overrides: Any) -> None:
    """
    Swap `pipe.scheduler` for the named scheduler (`SCHEDULERS`), built from `config` (default: the current
    scheduler's config; pass the model's original one when switching several times).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {list(SCHEDULERS)}, got {name!r}.")
    import diffusers

    class_name, defaults = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    pipe.scheduler = scheduler_class.from_config(config or pipe.scheduler.config, **{**defaults, **overrides})


def generate_images(
    pipe,
    prompts: Sequence[str] | None,
    seed: int,
    batch_size: int,
    per_image: dict[str, Sequence[Any]] | None = None,
    progress: Callable[[int], None] | None = None,
    state=None,
    **call_kwargs: Any,
) -> tuple[list[Image.Image], float, list[int] | None]:
    """
    Generate one image per prompt in batches (`generation.generate_batches`: image i uses a generator seeded with
    `seed + i`; `prompts=None` with `num_images=N` in `call_kwargs`: an unconditional pipeline; `per_image` values
    such as `target_classes` are sliced per batch; `call_kwargs` go to every pipeline
    call). Returns the PIL images, the wall time in seconds and the indices of the images the pipeline's safety
    checker blacked out (None when no safety checker ran). With an accelerate `state` of several processes each
    generates its share and every process gets all the images, in order (`distributed.gather_indexed`).
    """
    start = time.perf_counter()
    batches = generate_batches(
        pipe, prompts, seed, batch_size, per_image, progress, state=state, output_type="pil", **call_kwargs
    )
    gathered = gather_indexed(
        (
            (i, (i, image, flag))  # the index travels with the image: a resumed run gathers only some indices
            for batch in batches
            for i, image, flag in zip(batch.indices, batch.output.images, nsfw_flags(batch.output))
        ),
        state,
    )
    seconds = time.perf_counter() - start
    images = [image for _, image, _ in gathered]
    checked = any(flag is not None for _, _, flag in gathered)
    blacked_out = [i for i, _, flag in gathered if flag] if checked else None
    return images, seconds, blacked_out


@dataclass
class EvaluationSpec:
    """What one evaluation generates: the prompt, the target, the images and the sampling/guidance settings.
    `prompt=None`: an unconditional model (`BalancingActUnconditionalPipeline`): each call gets `batch_size=` and no
    prompt, `guidance_scale`, `height` and `width` are unused (None) and `eta` is DDIM's eta (None: the pipeline's
    default)."""

    prompt: str | None
    target: list[float]
    num_images: int = 512
    batch_size: int = 64
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    # The explicit prompt of each class (prompt baseline); None skips that configuration.
    class_prompts: list[str] | None = None
    # Extra pipeline arguments for the guided configurations: guidance_strength, guided_branches, guidance_steps, ...
    guidance: dict[str, Any] = field(default_factory=dict)
    # SEGA settings of the Fair Diffusion baseline (None: `baselines.DEFAULT_FAIR_DIFFUSION_SETTINGS`).
    fair_diffusion: dict[str, Any] | None = None
    # DDIM's eta of an unconditional model (0: deterministic DDIM, 1: DDPM-like); None: not passed.
    eta: float | None = None
    # Selection: the most images it may generate (None: `selection.SELECTION_MAX_FACTOR` x num_images).
    selection_max_images: int | None = None
    # The image size of a text-to-image model, in pixels (None: the pipeline's default, not passed).
    height: int | None = None
    width: int | None = None


def run_configuration(
    pipe,
    classifier,
    spec: EvaluationSpec,
    configuration: str,
    progress: Callable[[int], None] | None = None,
    labeller: Callable[[list[Image.Image]], torch.Tensor] | None = None,
    **options: Any,
) -> Generation:
    """Generate `spec.num_images` images for one configuration (see the module docstring). `options` go to
    `generation.generate_batches` (`state` for several processes, `skip`, `on_batch`); `labeller`: selection's."""
    if configuration not in CONFIGURATIONS:
        raise ValueError(f"`configuration` must be one of {list(CONFIGURATIONS)}, got {configuration!r}.")
    n = spec.num_images
    common = {"num_inference_steps": spec.num_inference_steps, "guidance_scale": spec.guidance_scale}
    common.update({k: v for k, v in (("height", spec.height), ("width", spec.width)) if v is not None})
    prompts, asked, per_image = [spec.prompt] * n, None, None
    if spec.prompt is None:  # an unconditional model: no prompt, no classifier-free guidance
        if configuration in TEXT_CONFIGURATIONS:
            raise ValueError(
                f"The {configuration} baseline writes the class into the prompt; an unconditional model has none "
                f"(configurations: {[c for c in CONFIGURATIONS if c not in TEXT_CONFIGURATIONS]})."
            )
        common = {"num_inference_steps": spec.num_inference_steps, "num_images": n}
        prompts = None
        if spec.eta is not None:
            common["eta"] = spec.eta
    if configuration in ("prompt", "fair_diffusion") and (
        not spec.class_prompts or len(spec.class_prompts) != len(spec.target)
    ):
        raise ValueError(
            f"The {configuration} baseline needs one explicit prompt per class ({len(spec.target)}), got "
            f"{spec.class_prompts}."
        )
    if configuration == "prompt":
        asked = asked_classes(spec.target, n)
        prompts = [spec.class_prompts[k] for k in asked]
    elif configuration == "fair_diffusion":
        from .baselines import DEFAULT_FAIR_DIFFUSION_SETTINGS, FairDiffusion, draw_classes

        asked = draw_classes(spec.target, n, spec.seed)
        per_image = {"target_classes": asked}
        pipe = FairDiffusion(pipe, list(spec.class_prompts), spec.fair_diffusion or DEFAULT_FAIR_DIFFUSION_SETTINGS)
    elif configuration in GUIDED_CONFIGURATIONS:
        common.update(h_classifier=classifier, guidance_mode=GUIDED_CONFIGURATIONS[configuration], **spec.guidance)
        if configuration == "sample":
            asked = asked_classes(spec.target, n)
            per_image = {"target_classes": asked}
        else:
            common["target_distribution"] = list(spec.target)
            if n > spec.batch_size and common.get("distribution_solver", "assign") == "assign":
                # Several calls: carry the counts, so the whole run (not each batch) lands on the target.
                from pipeline_balancing_act import BalanceState

                common["balance_state"] = BalanceState()
    elif configuration == "selection":  # vanilla's calls, images kept to the target counts
        from .selection import run_selection

        return run_selection(pipe, spec, common, labeller, progress, **options)
    images, seconds, blacked_out = generate_images(
        pipe, prompts, spec.seed, spec.batch_size, per_image, progress, **options, **common
    )
    return Generation(images, seconds, asked, blacked_out)


def evaluate(
    pipe,
    classifier,
    spec: EvaluationSpec,
    labeller: Callable[[list[Image.Image]], torch.Tensor],
    configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
    output_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    metadata: dict[str, Any] | None = None,
    state=None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """
    Run and measure each configuration (default: all but the opt-in ones). Returns `{**metadata, "spec": ...,
    "class_names": ..., "results": {configuration: summary}}`; with `output_dir`, also writes `results.json`,
    `grid_<configuration>.png` and `fractions.png` there. With an accelerate `state` of several processes, the
    processes share the generation and every one measures all the images (gathered), as one process would; the main
    process writes the files. `on_result(configuration, summary)` is called as each configuration is measured.
    """
    class_names = list(class_names or getattr(classifier, "config", {}).get("class_names", []))
    results = {}
    grids = {}
    for configuration in configurations:
        generation = run_configuration(pipe, classifier, spec, configuration, progress, labeller, state=state)
        labels = labeller(generation.images) if generation.labels is None else generation.labels
        summary = summarize_labels(labels, spec.target, generation.asked, generation.blacked_out)
        summary["seconds"] = generation.seconds
        if generation.selection is not None:
            summary.update(generation.selection)
        results[configuration] = summary
        grids[configuration] = generation.images
        if on_result is not None:
            on_result(configuration, summary)
    report = {**(metadata or {}), "spec": asdict(spec), "class_names": class_names, "results": results}
    report["verdict"] = target_verdicts(results)
    if output_dir is not None and is_main(state):
        write_outputs(report, grids, output_dir)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Output files (written atomically, `h_classifiers.io_utils`)
# ----------------------------------------------------------------------------------------------------------------


def save_fraction_chart(
    target: Sequence[float],
    measured: dict[str, Sequence[float] | None],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Bar chart PNG: per class, the target fraction next to each configuration's measured fraction."""
    # The object API needs no pyplot backend, so the library never changes the caller's matplotlib backend.
    from matplotlib.figure import Figure

    series = [("target", list(target))] + [(name, list(f)) for name, f in measured.items() if f is not None]
    width = 0.8 / len(series)
    fig = Figure(figsize=(1.6 + 1.4 * len(class_names) * len(series) / 3, 3.2))
    ax = fig.subplots()
    for j, (name, values) in enumerate(series):
        xs = [k + (j - (len(series) - 1) / 2) * width for k in range(len(class_names))]
        ax.bar(xs, values, width, label=name, color="black" if name == "target" else None)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of valid images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=min(len(series), 5), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def write_outputs(
    report: dict[str, Any], images: dict[str, list[Image.Image]], output_dir: str | os.PathLike, grid_size: int = 64
) -> None:
    """`results.json`, a grid PNG per configuration (its first `grid_size` images) and `fractions.png`."""
    output_dir = Path(output_dir)
    atomic_write_json(output_dir / "results.json", report, indent=2)
    for configuration, configuration_images in images.items():
        if not configuration_images:  # selection that kept nothing
            continue
        atomic_save_image(make_grid(configuration_images[:grid_size]), output_dir / f"grid_{configuration}.png")
    measured = {name: summary["fractions"] for name, summary in report["results"].items()}
    save_fraction_chart(
        report["spec"]["target"],
        measured,
        report["class_names"],
        output_dir / "fractions.png",
        chart_title(report),
    )


def chart_title(report: dict[str, Any]) -> str:
    """The title of `fractions.png`: the prompt; for an unconditional model (no prompt) the model's name."""
    if report["spec"].get("prompt"):
        return report["spec"]["prompt"]
    model = report.get("model")
    name = os.path.basename(os.path.normpath(str(model))) if model else ""  # a folder's or a Hub repo's name
    return f"{name} (unconditional, no prompt)" if name else "unconditional model (no prompt)"


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(device: str) -> torch.device:
    """`"auto"` -> cuda if available, else mps if available, else cpu; anything else as given."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.") from None


def load_pipeline(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    scheduler: str | None = None,
    safety_checker: bool = True,
):
    """
    A `BalancingActPipeline` from a Stable Diffusion 1.x/2.x directory or Hub id on `device` in `dtype`, optionally
    with the named scheduler (`SCHEDULERS`); its progress bar is off (callers show their own). The model's own safety
    checker is kept (a model that declares none, like the toy model, loads without one and without a warning);
    `safety_checker=False` loads the model without it.

    An SDXL model (`xl_model_class`: a `StableDiffusionXLPipeline` folder or Hub id) loads as `BalancingActXLPipeline`,
    with the named scheduler too; SDXL has no safety checker (`safety_checker` is moot).

    An unconditional model (`unconditional_model_class`: a `DDIMPipeline` / `DDPMPipeline` folder or Hub id) loads
    as `BalancingActUnconditionalPipeline`, which samples with DDIM (`scheduler` None or "ddim") and has no safety
    checker.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
        dtype = DTYPES[dtype]
    model = os.fspath(model)
    if is_local_model(model):
        if not os.path.exists(model):
            raise FileNotFoundError(f"`model` {model!r} does not exist; {MODEL_EXPECTED}.")
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise FileNotFoundError(f"`model` {model!r} has no model_index.json; {MODEL_EXPECTED}.")
    if unconditional_model_class(model) is not None:
        if scheduler not in (None, "ddim"):
            raise ValueError(unconditional_scheduler_error(scheduler))
        from pipeline_balancing_act_unconditional import BalancingActUnconditionalPipeline

        # DDIMPipeline turns any scheduler (a DDPM checkpoint's DDPMScheduler) into a DDIMScheduler
        pipe = BalancingActUnconditionalPipeline.from_pretrained(model, dtype=dtype)
    elif xl_model_class(model) is not None:
        # Imported here, not at the top: the SDXL pipeline's module is only loaded for an SDXL model.
        from pipeline_balancing_act_xl import BalancingActXLPipeline

        pipe = BalancingActXLPipeline.from_pretrained(model, dtype=dtype)
        if scheduler is not None:
            set_scheduler(pipe, scheduler)
    else:
        from pipeline_balancing_act import BalancingActPipeline

        pipe = BalancingActPipeline.from_pretrained(model, dtype=dtype, **safety_checker_kwargs(safety_checker))
        if scheduler is not None:
            set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def safety_checker_kwargs(keep: bool) -> dict[str, Any]:
    """`from_pretrained` arguments: none to keep the model's safety checker, or those that drop it without the
    warning diffusers gives for a checker removed by hand."""
    return {} if keep else {"safety_checker": None, "requires_safety_checker": False}
