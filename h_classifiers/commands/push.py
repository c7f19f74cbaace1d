"""`balancing-act push`: push a saved h-classifier folder, or the pipeline file, to the Hugging Face Hub.

    balancing-act push classifiers/skin user/skin-h-classifier [--private]
    balancing-act push --pipeline user/balancing-act   # pipeline_balancing_act.py as the repo's pipeline.py
    balancing-act push --pipeline user/sdxl-balanced --xl   # the SDXL pipeline, with the core beside it

The second makes `DiffusionPipeline.from_pretrained(model, custom_pipeline="user/balancing-act",
trust_remote_code=True)` load `BalancingActPipeline`. Both can be given in one command. The token comes from
`--token`, else `HF_TOKEN` or a cached `hf auth login`.
"""

from __future__ import annotations

import argparse

from h_classifiers.commands._parser import CommandParser


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="balancing-act push",
        usage="%(prog)s [FOLDER REPO_ID] [--pipeline PIPELINE_REPO_ID] [options]",
        description=(
            "Push a saved h-classifier folder to a Hugging Face Hub model repo, and/or (--pipeline) publish "
            "pipeline_balancing_act.py as a Hub repo's pipeline.py, which diffusers loads with "
            "DiffusionPipeline.from_pretrained(model, custom_pipeline=PIPELINE_REPO_ID, trust_remote_code=True)."
        ),
        epilog="Options also accept underscores: --commit_message is --commit-message.",
    )
    parser.add_argument(
        "folder",
        nargs="?",
        metavar="FOLDER",
        help="A folder written by `balancing-act train` (HClassifier.save_pretrained).",
    )
    parser.add_argument(
        "repo_id",
        nargs="?",
        metavar="REPO_ID",
        help="Hub repo id, e.g. 'user/skin-h-classifier' (created if missing).",
    )
    parser.add_argument(
        "--pipeline",
        metavar="PIPELINE_REPO_ID",
        default=None,
        help="Also (or only) upload pipeline_balancing_act.py as pipeline.py of this Hub model repo (created if "
        "missing), e.g. 'user/balancing-act'. Default: none.",
    )
    parser.add_argument(
        "--unconditional",
        action="store_true",
        help="With --pipeline: publish the unconditional pipeline (pipeline_balancing_act_unconditional.py as "
        "pipeline.py, with pipeline_balancing_act.py beside it, which it imports).",
    )
    parser.add_argument(
        "--xl",
        action="store_true",
        help="With --pipeline: publish the Stable Diffusion XL pipeline (pipeline_balancing_act_xl.py as pipeline.py, "
        "with pipeline_balancing_act.py beside it, which it imports).",
    )
    parser.add_argument("--private", action="store_true", help="Create the repo(s) private.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    parser.add_argument(
        "--commit-message",
        default=None,
        help="Commit message (default: 'Upload Balancing Act h-classifier', or for --pipeline 'Upload the Balancing "
        "Act pipeline as pipeline.py').",
    )
    parser.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.folder is None) != (args.repo_id is None):
        parser.error("give both FOLDER and REPO_ID to push a classifier (or only --pipeline PIPELINE_REPO_ID).")
    if args.folder is None and args.pipeline is None:
        parser.error("nothing to push: give FOLDER REPO_ID (a classifier) and/or --pipeline PIPELINE_REPO_ID.")

    from h_classifiers.hub import (
        UNCONDITIONAL_PIPELINE_MODULE,
        XL_PIPELINE_MODULE,
        HubUnreachableError,
        check_repo_id,
        pipeline_file,
        push_classifier,
        push_pipeline,
    )

    options = {
        "token": args.token,
        "private": args.private or None,
        "commit_message": args.commit_message,
        "revision": args.revision,
    }
    try:
        if args.unconditional and args.xl:  # refused before anything is pushed
            raise ValueError("--unconditional and --xl name two pipelines: a repo's pipeline.py is one of them.")
        if args.pipeline is not None:
            check_repo_id(args.pipeline)
            pipeline_file()
            if args.unconditional:
                pipeline_file(UNCONDITIONAL_PIPELINE_MODULE)
            if args.xl:
                pipeline_file(XL_PIPELINE_MODULE)
        elif args.unconditional or args.xl:
            raise ValueError(f"{'--xl' if args.xl else '--unconditional'} goes with --pipeline PIPELINE_REPO_ID.")
        if args.folder is not None:
            url = push_classifier(args.folder, args.repo_id, **options)
            print(f"Pushed {args.folder} to {url}")
        if args.pipeline is not None:
            url = push_pipeline(args.pipeline, unconditional=args.unconditional, xl=args.xl, **options)
            print(
                f"Pushed the pipeline to {url} (pipeline.py): load it with DiffusionPipeline.from_pretrained(model, "
                f'custom_pipeline="{args.pipeline}", trust_remote_code=True)'
            )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    except HubUnreachableError as error:
        raise SystemExit(f"{parser.prog}: {error}") from None


if __name__ == "__main__":
    main()
