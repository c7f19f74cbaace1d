"""`balancing-act extract`: record h-vectors at every denoising step, for training an h-classifier.

Two recipes (see `h_classifiers.extraction`):

    # labelled folders (one sub-folder per class) -> DDIM inversion
    balancing-act extract --image-dir data/skin --output-dir feats/skin --steps 50
    # generation with pseudo-labels from a labeller
    balancing-act extract --prompt "a photo of a face" --num-images 3000 --labeller toy:skin --output-dir feats/skin
    # an unconditional model (DDIMPipeline / DDPMPipeline): generation without a prompt, or inversion of folders
    balancing-act extract --model google/ddpm-celebahq-256 --eta 1 --num-images 3000 --labeller hf:ID ... --output-dir o
    balancing-act extract --model google/ddpm-celebahq-256 --image-dir data/gender --output-dir feats/gender
    # an SDXL model: both recipes as for Stable Diffusion (inversion with SDXL's pooled embedding and size ids)
    balancing-act extract --model stabilityai/stable-diffusion-xl-base-1.0 --image-dir data/gender --output-dir o
    # only h average-pooled to 2x2, for a pooled classifier (one for every resolution of the model)
    balancing-act extract --prompt "a photo of a face" --num-images 3000 --labeller toy:skin --pool-size 2 --output-dir o

Re-running the same command after an interruption resumes it (completed chunks are kept). Several processes / GPUs:
`accelerate launch --num_processes N -m h_classifiers.cli extract ...` shares the chunks between the processes (give
at least N chunks: --chunk-size <= images / N); the shards and manifest are those of one process.
"""

from __future__ import annotations

import argparse
import logging
import os

from h_classifiers.commands._common import (
    add_safety_checker_argument,
    add_threads_argument,
    apply_threads,
    blacked_out_note,
    positive_int,
    split_prompts,
)
from h_classifiers.commands._errors import argument_errors
from h_classifiers.commands._model_kind import (
    SD_GUIDANCE_SCALE,
    XL_GUIDANCE_SCALE,
    add_eta_argument,
    resolve_model_kind,
)
from h_classifiers.commands._parser import CommandParser, silence_known_notices


def build_parser() -> argparse.ArgumentParser:
    from h_classifiers.preflight import DTYPE_NAMES, RECORD_BRANCHES, SCHEDULERS, STORAGE_DTYPE_NAMES
    from h_classifiers.toy_assets import TOY_MODEL_PATH

    parser = CommandParser(
        prog="balancing-act extract",
        description="Record h (the UNet mid-block output) at every denoising step, from labelled image folders (DDIM "
        "inversion) or while generating (pseudo-labels from a labeller). Resumable: re-run the same command.",
    )
    parser.add_argument("--output-dir", required=True, help="Where the shards and manifest go.")
    parser.add_argument(
        "--model",
        default=str(TOY_MODEL_PATH),
        help="Stable Diffusion 1.x/2.x or SDXL directory or Hub id, or an unconditional model's (DDIMPipeline / "
        "DDPMPipeline: --image-dir, or the generation recipe without --prompt) (default: toy model).",
    )
    recipe = parser.add_argument_group(
        "recipe (give exactly one of --image-dir or --prompt; an unconditional model: --image-dir, or neither to "
        "generate)"
    )
    recipe.add_argument(
        "--image-dir",
        default=None,
        help="Inversion recipe: folder with one sub-folder of images per class; an unconditional model inverts them "
        "at its UNet's size, without a prompt (default: none).",
    )
    recipe.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="Generation recipe: a prompt (repeat for several; cycled) (default: none).",
    )
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        help="Generation: number of images (default: none; the generation recipe needs it).",
    )
    parser.add_argument(
        "--labeller",
        action="append",
        default=None,
        help="Generation: 'toy:ATTRIBUTE', 'hf:MODEL_ID_OR_PATH' (transformers image classifier) or "
        "'clip:MODEL_ID_OR_PATH' (CLIP zero-shot). Repeat for several attributes from one generation (one label set "
        "each; at most one hf/clip labeller, named by --attribute); the first is the store's default.",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="Comma-separated class names, in index order. Inversion: the sub-folder names (default: sorted). "
        "hf/clip labellers: required.",
    )
    parser.add_argument(
        "--attribute",
        default=None,
        help="Attribute name recorded in the manifest (default: the labeller's, else none).",
    )
    parser.add_argument(
        "--label-map",
        default=None,
        help="hf labeller: 'model_label:class,...' (default: class names match model labels, case-insensitive).",
    )
    parser.add_argument(
        "--labeller-prompts",
        default=None,
        help="clip labeller: one text per class, '|'-separated (default: 'a photo of a <class>').",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="hf/clip labellers: label -1 (unlabelled) below this probability (default: none, every image labelled).",
    )
    parser.add_argument("--inversion-prompt", default="", help="Inversion: the text condition (default: '').")
    parser.add_argument("--steps", type=positive_int, default=50, help="Denoising steps = heads (default: 50).")
    parser.add_argument(
        "--scheduler",
        default="ddim",
        choices=list(SCHEDULERS),
        help="Generation: sampling scheduler (default: ddim). Inversion always uses DDIM (eta = 0).",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="Classifier-free guidance (default: 7.5 for generation, 5.0 with an SDXL model, its pipeline's; 1.0 = "
        "off for inversion).",
    )
    parser.add_argument("--negative-prompt", default=None, help="Negative prompt (default: none).")
    add_eta_argument(parser)
    parser.add_argument(
        "--record-branch",
        default="cond",
        choices=list(RECORD_BRANCHES),
        help="With classifier-free guidance, which rows of [uncond; cond] to store (default: cond).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Generation: image i uses seed + i (default: 0).")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="Images per UNet call.")
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=256,
        help="Images per chunk, the unit of resumption (default: 256). Memory holds one chunk's h.",
    )
    parser.add_argument(
        "--storage-dtype",
        default="fp16",
        choices=list(STORAGE_DTYPE_NAMES),
        help="dtype of the stored h (default: fp16).",
    )
    parser.add_argument(
        "--pool-size",
        type=positive_int,
        default=None,
        help="Store h average-pooled to this grid (g x g per channel), all a pooled classifier reads: `train` then "
        "makes heads that read h of any resolution of the model (default: none, h as the UNet gives it).",
    )
    parser.add_argument("--height", type=positive_int, default=None, help="Image height (default: the model's).")
    parser.add_argument("--width", type=positive_int, default=None, help="Image width (default: the model's).")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps.")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPE_NAMES), help="Model dtype (default: float32)."
    )
    add_safety_checker_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def parse_label_map(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    mapping = {}
    for item in text.split(","):
        model_label, sep, class_name = item.rpartition(":")
        if not sep or not model_label.strip() or not class_name.strip():
            raise ValueError(f"`--label-map` items must be 'model_label:class', got {item!r} in {text!r}.")
        mapping[model_label.strip()] = class_name.strip()
    return mapping


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before anything is imported or loaded: the recipe, the model and image folder paths, the
    labellers' and the label map's forms (a one-line `ValueError` naming the option)."""
    from h_classifiers import preflight

    unconditional = getattr(args, "unconditional", False)  # then no --image-dir nor --prompt (`resolve_model_kind`)
    if not unconditional and (args.image_dir is None) == (args.prompt is None):
        raise ValueError("Give exactly one recipe: `--image-dir` (inversion) or `--prompt` (generation).")
    preflight.check_model_path(args.model)
    if args.image_dir is not None and not os.path.isdir(args.image_dir):
        raise FileNotFoundError(
            f"`--image-dir` {args.image_dir!r} is not a directory (expected one sub-folder of images per class)."
        )
    for spec in args.labeller or []:
        preflight.check_labeller_spec(spec, "--labeller")
    parse_label_map(args.label_map)
    preflight.check_pool_size(args.pool_size, preflight.unet_h_shape(args.model, args.height, args.width))
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise ValueError(f"`--min-confidence` must be a number in [0, 1], got {args.min_confidence:g}.")


def run(args: argparse.Namespace) -> dict:
    from h_classifiers.distributed import process_device, process_state
    from h_classifiers.evaluation import load_pipeline, resolve_device
    from h_classifiers.extraction import extract_from_folders, extract_from_generation
    from h_classifiers.labellers import labeller_from_spec

    unconditional = getattr(args, "unconditional", False)
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    apply_threads(args.threads, args.model)
    state = process_state(cpu=args.device == "cpu")
    device = process_device(state, resolve_device(args.device))
    common = {
        "num_inference_steps": args.steps,
        "negative_prompt": args.negative_prompt,
        "record_branch": args.record_branch,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "dtype": args.storage_dtype,
        "height": args.height,
        "width": args.width,
        "progress": not args.no_progress,
        "state": state,
        "pool_size": args.pool_size,
    }
    if args.image_dir is not None:
        unused = [name for name in ("num_images", "labeller") if getattr(args, name) is not None]
        if unused:
            raise ValueError(f"{['--' + n.replace('_', '-') for n in unused]} apply to the generation recipe only.")
        if getattr(args, "eta", None):  # an unconditional model's, 0 unless given
            raise ValueError(f"`--eta {args.eta:g}`: the inversion recipe is deterministic DDIM (eta 0).")
        # Inversion generates no image, so a safety checker would have nothing to check: it is not loaded.
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype, safety_checker=False)
        return extract_from_folders(
            pipe,
            args.image_dir,
            args.output_dir,
            inversion_prompt=args.inversion_prompt,
            guidance_scale=1.0 if args.guidance_scale is None else args.guidance_scale,
            class_names=class_names,
            attribute=args.attribute,
            **common,
        )
    if args.num_images is None or args.labeller is None:
        recipe = "of an unconditional model" if unconditional else "(`--prompt`)"
        raise ValueError(f"The generation recipe {recipe} needs `--num-images` and `--labeller`.")
    if sum(not spec.startswith("toy:") for spec in args.labeller) > 1:
        raise ValueError("Give at most one hf/clip `--labeller` per run (`--class-names` etc. describe that one).")
    labellers = [
        labeller_from_spec(
            spec,
            class_names=class_names,
            label_map=parse_label_map(args.label_map),
            prompts=split_prompts(args.labeller_prompts),
            attribute=args.attribute,
            min_confidence=args.min_confidence,
            device=device,
        )
        for spec in args.labeller
    ]
    pipe = load_pipeline(
        args.model,
        device=device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        safety_checker=not args.no_safety_checker,
    )
    return extract_from_generation(
        pipe,
        args.prompt,
        args.num_images,
        args.output_dir,
        labellers,
        guidance_scale=default_guidance_scale(args) if args.guidance_scale is None else args.guidance_scale,
        seed=args.seed,
        eta=args.eta,
        **common,
    )


def default_guidance_scale(args: argparse.Namespace) -> float:
    """The generation recipe's classifier-free guidance without `--guidance-scale`: the model's pipeline's default."""
    return XL_GUIDANCE_SCALE if getattr(args, "xl", False) else SD_GUIDANCE_SCALE


def label_summary(manifest: dict) -> str:
    """The class counts of every label set (one per labeller), e.g. "skin: light 10, dark 6; glasses: ..."."""
    images, sets = manifest.get("images") or [], manifest.get("label_sets") or {}
    if len(sets) <= 1:  # one labeller (or the folders): the manifest's counts
        return ", ".join(f"{k} {v}" for k, v in manifest["class_counts"].items())
    parts = []
    for attribute, label_set in sets.items():
        counts = [0] * len(label_set["class_names"])
        for record in images:
            label = record.get("labels", {}).get(attribute, -1)
            if label >= 0:
                counts[label] += 1
        parts.append(f"{attribute}: " + ", ".join(f"{c} {n}" for c, n in zip(label_set["class_names"], counts)))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    silence_known_notices()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_model_kind(parser, args)
    with argument_errors(parser, (ValueError, FileNotFoundError)):
        check_arguments(args)
    with argument_errors(parser, (ValueError, FileNotFoundError, TypeError)):
        manifest = run(args)
    from h_classifiers.distributed import is_main, process_state

    if not is_main(process_state()):  # the main process reports the merged store
        return
    pooled = f" (h {manifest['pooled_from']} average-pooled)" if manifest.get("pool_size") else ""
    print(
        f"{manifest['num_images']} images x {len(manifest['timesteps'])} steps, h {manifest['h_shape']}{pooled} "
        f"({manifest['dtype']}) in {args.output_dir}; labels: {label_summary(manifest)}; unlabelled "
        f"{manifest['num_unlabelled']}; skipped {manifest['num_skipped']}."
    )
    blacked_out = sum(bool(record.get("blacked_out")) for record in manifest.get("images") or [])
    note = blacked_out_note("extract", blacked_out, manifest["num_images"])
    if note is not None:
        print(note + " They are unlabelled.")


if __name__ == "__main__":
    main()
