"""Arguments and input resolution shared by the commands (and `lab/reproduce/`): the thread policy of every
command, and the start of `generate` and `evaluate`.

Argument parsing and the checks of `start_run` import neither torch nor diffusers (`h_classifiers.preflight`): `--help`
and a bad argument are one quick answer; the heavy modules are imported once every check has passed.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h_classifiers import preflight

# The argparse value types live in `h_classifiers.arguments` (below the commands); these names stay importable here.
from h_classifiers.arguments import non_negative_float as non_negative_float
from h_classifiers.arguments import positive_float as positive_float
from h_classifiers.arguments import positive_int as positive_int
from h_classifiers.commands._errors import argument_errors
from h_classifiers.metrics import check_target_values, parse_target
from h_classifiers.preflight import DTYPE_NAMES, SCHEDULERS


if TYPE_CHECKING:
    import torch

    from h_classifiers.evaluation import EvaluationSpec


def split_prompts(text: str | None) -> list[str] | None:
    """`"a photo of a man|a photo of a woman"` -> a list (one prompt per class)."""
    return None if text is None else [p.strip() for p in text.split("|")]


def text_defaults() -> dict[str, Any]:
    """The values of the prompt options of `generate` / `evaluate` for a text-to-image model (`_model_kind`)."""
    from h_classifiers.commands._model_kind import SD_GUIDANCE_SCALE

    return {"prompt": toy_defaults()["prompt"], "guidance_scale": SD_GUIDANCE_SCALE}


def toy_defaults() -> dict[str, str]:
    from h_classifiers.toy_assets import NEUTRAL_PROMPT, TOY_CLASSIFIERS_PATH, TOY_MODEL_PATH

    return {
        "model": str(TOY_MODEL_PATH),
        "classifier": str(TOY_CLASSIFIERS_PATH / "skin"),
        "prompt": NEUTRAL_PROMPT,
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, classifier, scheduler, device, labeller: the arguments every generating command takes."""
    defaults = toy_defaults()
    parser.add_argument(
        "--model",
        default=defaults["model"],
        help="Stable Diffusion 1.x/2.x or SDXL directory or Hub id, or an unconditional model's (DDIMPipeline / "
        "DDPMPipeline: no prompt; docs/cli.md, 'Unconditional models') (default: the committed toy model).",
    )
    parser.add_argument(
        "--scheduler",
        default="ddim",
        choices=list(SCHEDULERS),
        help="Sampling scheduler (default: ddim). dpm++ is DPMSolverMultistep, euler_a is Euler ancestral.",
    )
    parser.add_argument("--steps", type=positive_int, default=25, help="Denoising steps (default: 25).")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="Classifier-free guidance of a text-to-image model (default: 7.5; an SDXL model: 5.0, its pipeline's).",
    )
    parser.add_argument(
        "--height",
        type=positive_int,
        default=None,
        help="Image height of a text-to-image model, a multiple of its VAE's scale (default: the model's, e.g. 512 "
        "for SD 1.5, 1024 for SDXL base).",
    )
    parser.add_argument(
        "--width", type=positive_int, default=None, help="Image width (default: the model's, as --height)."
    )
    from h_classifiers.commands._model_kind import add_eta_argument

    add_eta_argument(parser)
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps."
    )
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPE_NAMES), help="Model dtype (default: float32)."
    )
    add_safety_checker_argument(parser)
    add_threads_argument(parser)
    parser.add_argument(
        "--labeller",
        default="auto",
        help="Measures the images: 'auto' (the toy oracle for the committed toy models, else none), 'none', "
        "'toy:ATTRIBUTE', "
        "'hf:MODEL_ID' (transformers image classifier) or 'clip:MODEL_ID' (CLIP zero-shot).",
    )
    parser.add_argument(
        "--labeller-prompts",
        default=None,
        help="CLIP zero-shot: one text per class separated by '|' (default: 'a photo of a <class>').",
    )


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classifier",
        default=toy_defaults()["classifier"],
        help="h-classifier directory or Hub id (default: the shipped toy skin classifier).",
    )
    parser.add_argument(
        "--target",
        default="uniform",
        help="Target distribution: K probabilities '0.3,0.7', 'uniform' (default; 50/50 for two classes) or a "
        "class name.",
    )
    parser.add_argument(
        "--strength",
        type=non_negative_float,
        default=None,
        help="guidance_strength, in class gaps per guided step (default: the pipeline's, DEFAULT_GUIDANCE_STRENGTH; "
        "DEFAULT_UNCONDITIONAL_GUIDANCE_STRENGTH for an unconditional model).",
    )
    # --solver and --guided-branches are checked against the pipeline's constants in `start_run` (no diffusers import
    # while parsing).
    parser.add_argument(
        "--solver",
        default=None,
        help="distribution_solver: exact counts assigned to images ('assign'), or the paper's soft KL / chi-square "
        "('kl', 'chi2') (default: the pipeline's, assign).",
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=None,
        help="classifier_temperature of the soft solvers (--solver kl / chi2; default: the classifier's "
        "config.temperature).",
    )
    parser.add_argument(
        "--guided-branches",
        default=None,
        help="With classifier-free guidance: guide the conditional rows only ('cond') or both halves ('both') "
        "(default: the pipeline's).",
    )


def guidance_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's guidance arguments the user set (unset ones keep the pipeline's defaults)."""
    kwargs = {}
    if args.strength is not None:
        kwargs["guidance_strength"] = args.strength
    if args.guided_branches is not None:
        kwargs["guided_branches"] = args.guided_branches
    if args.temperature is not None:
        kwargs["classifier_temperature"] = args.temperature
    if args.solver is not None:
        kwargs["distribution_solver"] = args.solver
    return kwargs


def evaluation_spec(
    args: argparse.Namespace, target: list[float], class_prompts: list[str] | None = None
) -> EvaluationSpec:
    """The `EvaluationSpec` of the `generate` / `evaluate` command-line arguments (an unconditional model: no prompt,
    `--eta`)."""
    from h_classifiers.evaluation import EvaluationSpec

    return EvaluationSpec(
        prompt=args.prompt,
        target=target,
        num_images=args.num_images,
        batch_size=args.batch_size,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        class_prompts=class_prompts,
        guidance=guidance_kwargs(args),
        eta=args.eta,
        height=args.height,
        width=args.width,
    )


def eta_note(args: argparse.Namespace) -> str:
    """What follows the steps in the summary line: `, eta 1` for an unconditional model; for a text-to-image one the
    image size asked for (`, height 768, width 1024`; nothing for the model's default size)."""
    if getattr(args, "eta", None) is not None:
        return f", eta {args.eta:g}"
    sizes = [(name, getattr(args, name, None)) for name in ("height", "width")]
    return "".join(f", {name} {value}" for name, value in sizes if value is not None)


def is_toy_model(model: str | os.PathLike | None) -> bool:
    """Whether `model` is the committed toy Stable Diffusion (the thread policy's and the prompt baseline's toy)."""
    from h_classifiers.toy_assets import TOY_MODEL_PATH

    if model is None:
        return False
    path = Path(model)
    return path.exists() and path.resolve() == TOY_MODEL_PATH.resolve()


# The one thread policy of every command (generate, evaluate, extract, train). Measured on a busy 2-core CPU: 2.4 s
# vs 16 s for 64 toy images (generate), 0.30 s vs 3.04 s per image (extract) with one thread vs torch's default.
THREADS_HELP = (
    "torch CPU threads (default: 1 when the work is on the committed toy model, whose small kernels gain nothing from "
    "threads and slow down badly when another process is busy; torch's choice otherwise)."
)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)


def default_threads(model: str | os.PathLike | None) -> int | None:
    """The thread count a command uses without `--threads`: 1 for the toy model's work, else None (torch's choice).
    `model`: the model the command runs (train: the model its features come from)."""
    return 1 if is_toy_model(model) else None


def apply_threads(threads: int | None, model: str | os.PathLike | None) -> int | None:
    """Sets torch's CPU threads to `threads` (`--threads`), else to `default_threads(model)`; returns what was set
    (None: torch's choice, untouched)."""
    threads = default_threads(model) if threads is None else threads
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


def add_safety_checker_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-safety-checker",
        action="store_true",
        help="Load the model without its safety checker (default: a model's own safety checker is kept; the images "
        "it flags are blacked out, counted as unlabelled and reported).",
    )


def blacked_out_note(name: str, count: int | None, total: int) -> str | None:
    """The line that says how many images the safety checker blacked out (None when it blacked out none)."""
    if not count:
        return None
    return f"{name}: {count} of {total} images blacked out by the model's safety checker (NSFW content detected)."


def quiet_loading() -> None:
    """No per-component loading bars from diffusers / transformers: the commands print their own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def check_classifier_path(path: str, argument: str = "--classifier") -> None:
    """A local classifier path that does not exist fails at once, before anything is loaded (no Hub lookup)."""
    if os.path.exists(path):
        return
    if preflight.looks_like_local_path(path):
        raise FileNotFoundError(
            f"`{argument}` {path!r} does not exist (expected a directory written by `balancing-act train` / "
            "`HClassifier.save_pretrained`, or a Hub id 'user/name')."
        )


def check_choice(value: str | None, accepted: tuple[str, ...] | list[str], argument: str) -> None:
    if value is not None and value not in accepted:
        raise ValueError(f"`{argument}` must be one of {list(accepted)}, got {value!r}.")


# What `--labeller` takes besides a labeller spec (`preflight.check_labeller_spec`).
LABELLER_WORDS = ("auto", "none")


def check_guidance_choices(args: argparse.Namespace) -> None:
    """`--solver`, `--guided-branches` and `--strength` against the pipeline's own lists and bound."""
    from h_classifiers.preflight import DISTRIBUTION_SOLVERS, GUIDED_BRANCHES, MAX_GUIDANCE_STRENGTH

    check_choice(args.solver, DISTRIBUTION_SOLVERS, "--solver")
    check_choice(args.guided_branches, GUIDED_BRANCHES, "--guided-branches")
    if args.strength is not None and args.strength > MAX_GUIDANCE_STRENGTH:
        raise ValueError(
            f"`--strength` must be from 0 to {MAX_GUIDANCE_STRENGTH:g} class gaps per guided step; got {args.strength:g} "
            "(the range that keeps images intact: docs/guidance.md, 'Strength')."
        )


def local_class_names(classifier: str) -> list[str] | None:
    """The class names in a local classifier folder's config.json, read without loading the classifier; None for a
    Hub id or a config that cannot be read (loading it then says what is wrong)."""
    try:
        names = json.loads((Path(classifier) / "config.json").read_text(encoding="utf-8"))["class_names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def check_target_early(text: str, classifier: str) -> None:
    """`--target` checked before the classifier is loaded: against the classes of a local classifier folder (read
    from its config.json), else as far as it can be without them (non-negative numbers summing to 1)."""
    class_names = local_class_names(classifier)
    if class_names is not None:
        parse_target(text, class_names, argument="--target")
    else:
        check_target_values(text, argument="--target")


def check_distribution_images(num_images: int) -> None:
    """The command-line rule for distribution mode, checked before anything is loaded (the one place it lives):
    balancing a class distribution needs at least 2 images."""
    if num_images < 2:
        raise ValueError(
            f"distribution mode needs --num-images >= 2 (a distribution over {num_images} image means nothing); "
            "steer a single image with sample mode."
        )


@dataclass
class Run:
    """What `generate` and `evaluate` start from: the processes, the device, the classifier and the target."""

    state: Any  # accelerate PartialState of a multi-process run, else None
    device: torch.device
    classifier: Any
    class_names: list[str]
    target: list[float]


def start_run(parser: argparse.ArgumentParser, args: argparse.Namespace, distribution: bool) -> Run:
    """The start `generate` and `evaluate` share: the checks that need nothing loaded and no torch (one argparse error
    each: the classifier path, the guidance choices, the image count, the target against the classifier's classes,
    the model path, the classifier's h shape against the model's, the labeller), the thread count, the processes of
    `accelerate launch`, then the classifier and the target. `distribution`: the run guides distribution mode (at
    least 2 images; whole rounds of a global batch)."""
    with argument_errors(parser):
        check_classifier_path(args.classifier)
        check_guidance_choices(args)
        if distribution:
            check_distribution_images(args.num_images)
        check_target_early(args.target, args.classifier)
        preflight.check_model_path(args.model)
        preflight.check_classifier_fits(args.classifier, args.model, height=args.height, width=args.width)
        preflight.check_labeller_spec(args.labeller, "--labeller", LABELLER_WORDS)
    from h_classifiers.distributed import process_device, process_state
    from h_classifiers.evaluation import resolve_device
    from h_classifiers.generation import check_global_rounds

    apply_threads(args.threads, args.model)
    quiet_loading()
    state = process_state(cpu=args.device == "cpu")
    with argument_errors(parser):
        if distribution:
            check_global_rounds(args.num_images, args.batch_size, state)
        device = process_device(state, resolve_device(args.device))
        classifier = load_classifier(args.classifier)
        target = resolve_target(args.target, classifier)
    return Run(state, device, classifier, list(classifier.config.class_names), target)


def load_classifier(path: str):
    check_classifier_path(path)
    from h_classifiers import HClassifier

    return HClassifier.from_pretrained(path)


def resolve_target(text: str, classifier) -> list[float]:
    return parse_target(text, list(classifier.config.class_names), argument="--target")


def build_labeller(args: argparse.Namespace, classifier, device: torch.device):
    """The labeller named by `--labeller` for the classifier's attribute and classes, or None."""
    from h_classifiers.labellers import labeller_from_spec

    attribute = classifier.config.attribute
    class_names = list(classifier.config.class_names)
    spec = args.labeller
    if spec == "none":
        return None
    if spec == "auto":  # the toy oracle reads the images of every committed toy model
        from h_classifiers.toy_assets import ATTRIBUTES, committed_toy_model

        if committed_toy_model(args.model) is None or ATTRIBUTES.get(attribute) != class_names:
            return None
        spec = f"toy:{attribute}"
    labeller = labeller_from_spec(
        spec,
        class_names=class_names,
        prompts=split_prompts(args.labeller_prompts),
        attribute=attribute,
        device=device,
    )
    if list(labeller.class_names) != class_names:
        raise ValueError(
            f"`--labeller` {spec!r} labels the classes {list(labeller.class_names)}, but the classifier's classes are "
            f"{class_names}."
        )
    return labeller


def format_summary(name: str, summary: dict[str, Any], class_names: list[str]) -> str:
    """One line: per-class fractions, FD, valid rate, hit rates, images blacked out, time."""
    if summary.get("fractions") is None:
        measured = "no labelled image"
    else:
        measured = "  ".join(f"{c} {f:.3f}" for c, f in zip(class_names, summary["fractions"]))
        measured += f"  | FD {summary['fd']:.3f}  valid {summary['valid_rate']:.1%}"
    if summary.get("hit_rate") is not None:
        # The hit rate counts valid images only; the strict one counts an invalid image as a miss.
        measured += f"  asked-class hit {summary['hit_rate']:.1%} of valid"
        if summary.get("hit_rate_strict") is not None:
            measured += f", {summary['hit_rate_strict']:.1%} strict"
    if summary.get("num_blacked_out"):
        measured += f"  {summary['num_blacked_out']} blacked out by the safety checker"
    if "images_generated" in summary:  # selection: what keeping images to the target cost
        ratio = summary["images_generated_per_kept"]
        measured += f"  kept {summary['images_kept']} of {summary['images_generated']} generated"
        measured += "" if ratio is None else f" ({ratio:.2f} per kept)"
        if not summary["filled"]:
            short = sum(summary["shortfall"])
            measured += f", {short} short of the target counts after the cap of {summary['max_images']} images"
    return f"{name:<12} {measured}  ({summary['seconds']:.1f} s)"


def format_verdicts(report: dict[str, Any]) -> list[str]:
    """Lines for `report["verdict"]` (`evaluation.target_verdicts`): per configuration whether it met the target, its
    FD, and which configuration came closest."""
    verdict, results = report["verdict"], report["results"]
    lines = [f"target met (FD <= {verdict['threshold_fd']:g}):"]
    for name, met in verdict["met"].items():
        shown = "not measured (no labelled image)" if met is None else "met" if met else "missed"
        fd = results[name].get("fd")
        lines.append(f"  {name:<14} {shown}" + ("" if fd is None else f" (FD {fd:.3f})"))
    closest = verdict["closest"]
    if closest is None:
        lines.append("closest to the target: none (no configuration had a labelled image)")
    else:
        lines.append(f"closest to the target: {closest} (FD {results[closest]['fd']:.3f})")
    return lines
