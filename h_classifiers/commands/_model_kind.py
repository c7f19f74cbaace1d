"""Which options apply depends on the model: a text-to-image model (Stable Diffusion 1.x/2.x, or SDXL:
`preflight.xl_model_class`) takes a prompt, an unconditional model (a `DDIMPipeline` / `DDPMPipeline` folder or Hub id,
`preflight.unconditional_model_class`) takes none (`extract --image-dir` works for all: the inversion recipe needs no
prompt).

The prompt-only options default to None on the command line, so that one given explicitly to an unconditional model is
refused (one argparse error naming it) instead of being ignored; for a text-to-image model they then take their
defaults here (SDXL's classifier-free guidance scale is its pipeline's, `XL_GUIDANCE_SCALE`). `--eta` (DDIM's eta) is
the unconditional models' option.
"""

from __future__ import annotations

import argparse

from h_classifiers.arguments import non_negative_float


# argparse dest -> the option, for every option that only means something with a prompt.
PROMPT_ONLY_OPTIONS = {
    "prompt": "--prompt",
    "guidance_scale": "--guidance-scale",
    "negative_prompt": "--negative-prompt",
    "guided_branches": "--guided-branches",
    "class_prompts": "--class-prompts",
    "inversion_prompt": "--inversion-prompt",
    "height": "--height",
    "width": "--width",
}
ETA_DEFAULT = 0.0  # DDIMPipeline's
# The default classifier-free guidance scales of the pipelines: StableDiffusionPipeline's, StableDiffusionXLPipeline's.
SD_GUIDANCE_SCALE = 7.5
XL_GUIDANCE_SCALE = 5.0


def add_eta_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eta",
        type=non_negative_float,
        default=None,
        help="Unconditional models: DDIM's eta, 0 = deterministic DDIM, 1 = DDPM-like noise at every step (default: "
        f"{ETA_DEFAULT}, DDIMPipeline's; the paper uses 1). Not for text-to-image models.",
    )


def resolve_model_kind(
    parser: argparse.ArgumentParser, args: argparse.Namespace, text_defaults: dict[str, object] | None = None
) -> bool:
    """Reads the model's kind from its model_index.json and checks the options against it (an argparse error naming
    the options that do not apply), then fills the defaults of the kind: `--eta` for an unconditional model,
    `text_defaults` (argparse dest -> value, for the options left unset) for a text-to-image one (an SDXL model's
    `guidance_scale` is `XL_GUIDANCE_SCALE`). Returns whether the model is unconditional (also set as
    `args.unconditional`); `args.xl` says whether it is an SDXL model."""
    from h_classifiers.preflight import (
        check_model_path,
        unconditional_model_class,
        unconditional_scheduler_error,
        xl_model_class,
    )

    saved_as = unconditional_model_class(args.model)
    xl = None if saved_as is not None else xl_model_class(args.model)
    given = [option for dest, option in PROMPT_ONLY_OPTIONS.items() if getattr(args, dest, None) not in (None, "")]
    if saved_as is not None:
        if given:
            parser.error(
                f"{', '.join(f'`{option}`' for option in given)}: for text-to-image models only; `--model` "
                f"{args.model!r} is an unconditional model ({saved_as}), which generates from noise alone and takes "
                "no prompt."
            )
        scheduler = getattr(args, "scheduler", None)
        if scheduler not in (None, "ddim"):
            parser.error(unconditional_scheduler_error(scheduler))
        if hasattr(args, "eta") and args.eta is None:
            args.eta = ETA_DEFAULT
    else:
        if getattr(args, "eta", None) is not None:
            try:  # a model that is not there has no kind: say so rather than call it a text-to-image model
                check_model_path(args.model)
            except FileNotFoundError as error:
                parser.error(str(error))
            parser.error(
                f"`--eta`: for unconditional models (DDIMPipeline / DDPMPipeline) only; `--model` {args.model!r} is a "
                f"text-to-image model{'' if xl is None else f' ({xl})'}."
            )
        defaults = dict(text_defaults or {})
        if xl is not None and "guidance_scale" in defaults:
            defaults["guidance_scale"] = XL_GUIDANCE_SCALE
        for dest, value in defaults.items():
            if getattr(args, dest, None) is None:
                setattr(args, dest, value)
    args.unconditional, args.xl = saved_as is not None, xl is not None
    return args.unconditional
