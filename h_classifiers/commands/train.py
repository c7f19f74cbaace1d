"""`balancing-act train`: train an h-classifier (one linear head per timestep) from extracted h shards.

balancing-act train --features-dir feats/skin --output-dir classifiers/skin [--push_to_hub user/skin-classifier]
balancing-act train --features-dir feats/skin --pool-size 2 --output-dir classifiers/skin-pooled  # any resolution
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace

from h_classifiers.commands._common import add_threads_argument, apply_threads, positive_int
from h_classifiers.commands._errors import argument_errors
from h_classifiers.commands._parser import CommandParser, silence_known_notices


def build_parser() -> argparse.ArgumentParser:
    from h_classifiers.training import BALANCE_MODES, HEAD_TYPES, STORAGE_DTYPES, TrainingConfig

    # The dataclass's plain defaults, without building a config (its temperature default imports the pipeline).
    defaults = SimpleNamespace(**{f.name: f.default for f in fields(TrainingConfig) if f.default is not MISSING})
    parser = CommandParser(
        prog="balancing-act train",
        description="Train the per-timestep heads of an h-classifier from `balancing-act extract` shards, one "
        "timestep at a time; save it (safetensors + config + model card + metrics + plot).",
    )
    parser.add_argument("--features-dir", required=True, help="Output of `balancing-act extract`.")
    parser.add_argument("--output-dir", required=True, help="Where the classifier folder goes.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output-dir.")
    parser.add_argument(
        "--attribute",
        default=None,
        help="Attribute name (default: the manifest's). With a store of several label sets (extract with several "
        "--labeller), selects which labels to train on.",
    )
    parser.add_argument("--base-model", default=None, help="Base model recorded (default: manifest).")
    parser.add_argument(
        "--head",
        default=defaults.head,
        choices=list(HEAD_TYPES),
        help="'logistic' (default): a free linear head per timestep trained by cross-entropy (the paper's). "
        "'class_mean': weights along the class-mean directions of h, scale and biases fitted by cross-entropy "
        "(fewer parameters, less accurate when the attribute is subtle). Either way guidance reads the calibrated "
        "head and moves h between the class anchors (docs/training.md).",
    )
    parser.add_argument(
        "--balance",
        default=defaults.balance,
        choices=list(BALANCE_MODES),
        help="Class balance: weighted 'loss' (default), balanced 'sampling', or 'none'.",
    )
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help=f"(default: {defaults.epochs})")
    parser.add_argument(
        "--min-steps",
        type=positive_int,
        default=defaults.min_steps,
        help=f"At least this many optimiser steps per head; small data sets get more epochs (default: {defaults.min_steps}).",
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="AdamW learning rate.")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay.")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=defaults.holdout_fraction,
        help="Fraction of each class's images held out for the metrics (default: 0.2).",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Split and shuffling seed (default: 0).")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Softmax temperature of the paper's soft distribution loss (distribution_solver kl / chi2), stored in "
        "the config (default: the pipeline's DEFAULT_TEMPERATURE).",
    )
    parser.add_argument(
        "--pool-size",
        type=positive_int,
        default=None,
        help="Heads that read h average-pooled to this grid (g x g per channel), so that one classifier reads h of "
        "any resolution of the model: a flat store's h is pooled here; a store extracted with --pool-size is pooled "
        "already (its classifier is pooled without this option; give the same size or none) (default: none).",
    )
    parser.add_argument(
        "--storage-dtype",
        choices=list(STORAGE_DTYPES),
        default=defaults.storage_dtype,
        help="Float type of the saved weights: fp16 halves the file (loading gives float32; guidance computes in "
        "float32); auto: fp16 for pooled heads, fp32 for flat ones (default: auto).",
    )
    parser.add_argument(
        "--branches", default=None, help="Recorded CFG branches to train on, comma-separated (default: all)."
    )
    parser.add_argument("--device", default="cpu", help="Training device (default: cpu).")
    add_threads_argument(parser)
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="Push the saved folder to this Hub repo (default: none, no push).",
    )
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create the repo private.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def features_model(args: argparse.Namespace) -> str | None:
    """The model the features come from (for the thread policy): `--base-model`, else the store's manifest's."""
    if args.base_model is not None:
        return args.base_model
    from h_classifiers.feature_store import MANIFEST_NAME

    try:
        return json.loads((Path(args.features_dir) / MANIFEST_NAME).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None  # training reports a missing or broken store


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before training starts (and before the pipeline is imported): `--push-to-hub` is a valid
    repo id, the features folder holds a store, `--pool-size` fits a flat store's h, the output folder is free (or
    `--overwrite`)."""
    if args.push_to_hub is not None:
        from h_classifiers.hub import validate_repo_id

        try:  # fail before training, not after
            validate_repo_id(args.push_to_hub)
        except Exception as error:
            raise ValueError(f"`--push-to-hub` {args.push_to_hub!r} is not a valid Hub repo id: {error}") from None
    from h_classifiers.feature_store import MANIFEST_NAME

    if not (Path(args.features_dir) / MANIFEST_NAME).is_file():
        what = "does not exist" if not Path(args.features_dir).exists() else f"has no {MANIFEST_NAME}"
        raise FileNotFoundError(
            f"`--features-dir` {args.features_dir!r} {what}; expected the `--output-dir` of `balancing-act extract`."
        )
    from h_classifiers import preflight

    manifest = preflight.read_json(Path(args.features_dir) / MANIFEST_NAME) or {}
    if manifest.get("pool_size") is None:  # a pooled store's own size is checked by training
        preflight.check_pool_size(args.pool_size, manifest.get("h_shape"))
    if Path(args.output_dir).exists() and not args.overwrite:
        raise FileExistsError(f"`--output-dir` {args.output_dir!r} already exists; pass `--overwrite` to replace it.")


def run(args: argparse.Namespace):
    from h_classifiers.training import TrainingConfig, train_classifier

    apply_threads(args.threads, features_model(args))
    config = TrainingConfig(
        head=args.head,
        epochs=args.epochs,
        min_steps=args.min_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        holdout_fraction=args.holdout_fraction,
        balance=args.balance,
        seed=args.seed,
        **({"temperature": args.temperature} if args.temperature is not None else {}),
        branches=[b.strip() for b in args.branches.split(",")] if args.branches else None,
        device=args.device,
        pool_size=args.pool_size,
        storage_dtype=args.storage_dtype,
    )
    result = train_classifier(
        args.features_dir,
        args.output_dir,
        config,
        attribute=args.attribute,
        base_model=args.base_model,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    url = None
    if args.push_to_hub is not None:
        from h_classifiers.hub import HubUnreachableError, push_classifier

        try:
            url = push_classifier(args.output_dir, args.push_to_hub, private=args.private or None)
        except HubUnreachableError as error:
            raise SystemExit(
                f"balancing-act train: the classifier is saved in {args.output_dir}, but {error}"
            ) from None
    return result, url


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    silence_known_notices()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    with argument_errors(parser, (ValueError, FileNotFoundError, FileExistsError)):
        check_arguments(args)
        result, url = run(args)
    s = result.summary
    print(f"Saved the {result.classifier.config.attribute!r} classifier to {args.output_dir}")
    for name in ("first", "middle", "last"):
        m = s[name]
        print(
            f"  {name:<6} step {m['step']:>3} (t={m['timestep']:g}): held-out accuracy {_fmt(m['accuracy'])}, "
            f"balanced {_fmt(m['balanced_accuracy'])}"
        )
    if url:
        print(f"Pushed to {url}")


if __name__ == "__main__":
    main()
