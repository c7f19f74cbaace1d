"""`balancing-act evaluate`: vanilla / sample / distribution / prompt baseline, measured with a labeller.

Writes `results.json`, a grid PNG per configuration and `fractions.png` (measured vs target) to `--output-dir`.

Several processes / GPUs: `accelerate launch --num_processes N -m h_classifiers.cli evaluate ...` shares each
configuration's images between the processes (rounds of N x --batch-size; distribution mode guides each round as one
global batch) and gathers them all before measuring, so the metrics are those of one process making the same images.
Selection too: each process labels its share of a round, and the labels are gathered before the next round.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from h_classifiers.commands import _common, _errors, _model_kind
from h_classifiers.commands._parser import CommandParser, silence_known_notices
from h_classifiers.preflight import (
    CONFIGURATIONS,
    DEFAULT_CONFIGURATIONS,
    OPT_IN_CONFIGURATIONS,
    TEXT_CONFIGURATIONS,
)


# The parser and the checks import no torch: the modules that generate are imported in `main` once they have passed.


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="balancing-act evaluate",
        description="Generate N images per configuration (vanilla, sample mode, distribution mode, prompt baseline) "
        "with fixed seeds and measure class fractions, FD = ||p_ref - p||_2 (one-hot labels over labelled images), "
        "valid rate and seconds.",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="Prompt of a text-to-image model (default: the neutral one; an unconditional model takes none).",
    )
    parser.add_argument(
        "--configurations",
        default=None,
        help=f"Comma-separated subset of {','.join(CONFIGURATIONS)} (default: all but the opt-in "
        f"{','.join(OPT_IN_CONFIGURATIONS)}: selection generates vanilla images until the target counts are filled; "
        f"an unconditional model: {','.join(default_configurations(True))}, as {' and '.join(TEXT_CONFIGURATIONS)} "
        f"need a prompt; an SDXL model: {','.join(default_configurations(xl=True))}, Fair Diffusion's SEGA pipeline "
        "being Stable Diffusion 1.x/2.x's).",
    )
    parser.add_argument(
        "--selection-max-images",
        type=_common.positive_int,
        default=None,
        help="selection: the most images it generates before it stops and reports the classes that fell short "
        "(default: 20 x --num-images).",
    )
    parser.add_argument(
        "--class-prompts",
        default=None,
        help="Prompt baseline: one explicit prompt per class separated by '|' (default for the toy model: the toy "
        "world's explicit prompts; otherwise required for 'prompt').",
    )
    parser.add_argument("--num-images", type=_common.positive_int, default=512, help="Images per configuration.")
    parser.add_argument(
        "--batch-size", type=_common.positive_int, default=64, help="Images per pipeline call in each process."
    )
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i in every configuration.")
    parser.add_argument(
        "--output-dir", default="outputs/evaluate", help="Where results go (default: outputs/evaluate)."
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="Hide the progress bar (each configuration's line is still printed as it finishes).",
    )
    _common.add_guidance_arguments(parser)
    _common.add_model_arguments(parser)
    return parser


def unconditional_configurations() -> list[str]:
    """Every configuration an unconditional model can run."""
    return [c for c in CONFIGURATIONS if c not in TEXT_CONFIGURATIONS]


# The configurations an SDXL model cannot run: diffusers' SEGA pipeline (Fair Diffusion) is Stable Diffusion 1.x/2.x's.
NOT_XL_CONFIGURATIONS = ("fair_diffusion",)


def default_configurations(unconditional: bool = False, xl: bool = False) -> list[str]:
    """What runs without `--configurations`: every configuration the model can run but the opt-in ones."""
    return [
        c
        for c in DEFAULT_CONFIGURATIONS
        if not (unconditional and c in TEXT_CONFIGURATIONS) and not (xl and c in NOT_XL_CONFIGURATIONS)
    ]


def parse_configurations(text: str | None, unconditional: bool = False, xl: bool = False) -> list[str]:
    """`--configurations` (None: `default_configurations`)."""
    if text is None:
        return default_configurations(unconditional, xl)
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGURATIONS]
    if unknown or not names:
        raise ValueError(
            f"`--configurations` must be a comma-separated subset of {list(CONFIGURATIONS)}, got {text!r}."
        )
    text_only = [c for c in names if c in TEXT_CONFIGURATIONS]
    if unconditional and text_only:
        raise ValueError(
            f"`--configurations` {text_only}: the prompt and Fair Diffusion baselines write the class into the prompt, "
            f"and an unconditional model takes no prompt; choose from {unconditional_configurations()}."
        )
    not_xl = [c for c in names if c in NOT_XL_CONFIGURATIONS]
    if xl and not_xl:
        raise ValueError(
            f"`--configurations` {not_xl}: Fair Diffusion runs diffusers' SEGA pipeline, which has no SDXL version; "
            f"choose from {[c for c in CONFIGURATIONS if c not in NOT_XL_CONFIGURATIONS]}."
        )
    return names


def check_selection_arguments(args: argparse.Namespace, configurations: list[str]) -> None:
    """`--selection-max-images`: for the selection configuration, and at least `--num-images`."""
    if args.selection_max_images is None:
        return
    if "selection" not in configurations:
        raise ValueError(
            "`--selection-max-images` applies to the selection configuration only; add selection to "
            f"`--configurations` (got {','.join(configurations)})."
        )
    from h_classifiers.selection import check_max_images

    check_max_images(args.selection_max_images, args.num_images, "--selection-max-images")


def default_class_prompts(args: argparse.Namespace, classifier) -> list[str] | None:
    prompts = _common.split_prompts(args.class_prompts)
    if prompts is not None or not _common.is_toy_model(args.model):
        return prompts
    from h_classifiers.toy_world import ATTRIBUTES, attribute_prompt

    attribute = classifier.config.attribute
    if ATTRIBUTES.get(attribute) != list(classifier.config.class_names):
        return None
    return [attribute_prompt(attribute, c) for c in ATTRIBUTES[attribute]]


def main(argv: list[str] | None = None) -> dict:
    silence_known_notices()
    parser = build_parser()
    args = parser.parse_args(argv)
    _model_kind.resolve_model_kind(parser, args, _common.text_defaults())
    try:  # what can be checked before anything is loaded
        configurations = parse_configurations(args.configurations, args.unconditional, args.xl)
        check_selection_arguments(args, configurations)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    run = _common.start_run(parser, args, distribution="distribution" in configurations)
    state, device, classifier, class_names, target = run.state, run.device, run.classifier, run.class_names, run.target
    from tqdm.auto import tqdm

    from h_classifiers.distributed import is_main, num_processes
    from h_classifiers.evaluation import evaluate, load_pipeline
    from h_classifiers.io_utils import portable_path
    from h_classifiers.metrics import format_probabilities

    with _errors.argument_errors(parser):
        class_prompts = default_class_prompts(args, classifier)
        if "prompt" in configurations and (class_prompts is None or len(class_prompts) != len(class_names)):
            raise ValueError(
                f"The prompt baseline needs `--class-prompts` with one prompt per class of {class_names} separated "
                f"by '|', got {args.class_prompts!r}."
            )
        labeller = _common.build_labeller(args, classifier, device)
        if labeller is None:
            raise ValueError("`--labeller` is required to evaluate (e.g. 'clip:MODEL_ID' or 'hf:MODEL_ID').")
        pipe = load_pipeline(args.model, device, args.dtype, args.scheduler, not args.no_safety_checker)

    if is_main(state):
        print(
            f"attribute {classifier.config.attribute!r}, classes {class_names}, target "
            f"{format_probabilities(target)}, {args.num_images} images per configuration, {args.scheduler} "
            f"{args.steps} steps" + _common.eta_note(args)
        )
    spec = _common.evaluation_spec(args, target, class_prompts)
    spec = replace(spec, selection_max_images=args.selection_max_images)
    total = args.num_images * len(configurations)  # selection advances the bar by the images it keeps
    with tqdm(total=total, desc="evaluate", unit="img", disable=args.no_progress or not is_main(state)) as bar:
        metadata = {
            "attribute": classifier.config.attribute,
            "model": portable_path(args.model),
            "classifier": portable_path(args.classifier),
            "scheduler": args.scheduler,
            "labeller": labeller.source,
            "num_processes": num_processes(state),
        }

        def finished(name: str, summary: dict) -> None:  # one line per configuration, as it finishes
            if is_main(state):
                bar.write(_common.format_summary(name, summary, class_names))

        with _errors.pipeline_input_errors(parser):
            report = evaluate(
                pipe,
                classifier,
                spec,
                labeller,
                configurations,
                args.output_dir,
                class_names,
                bar.update,
                metadata,
                state,
                on_result=finished,
            )
    if not is_main(state):
        return report
    for line in _common.format_verdicts(report):
        print(line)
    print(f"results: {args.output_dir}/results.json")
    return report


if __name__ == "__main__":
    main()
