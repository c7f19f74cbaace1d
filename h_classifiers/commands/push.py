"""`balancing-act push`: push a saved h-classifier folder to the Hugging Face Hub.

    balancing-act push classifiers/skin user/skin-h-classifier [--private]

The token comes from `--token`, else `HF_TOKEN` or a cached `hf auth login`.
"""

from __future__ import annotations

import argparse

from h_classifiers.commands._parser import CommandParser


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="balancing-act push", description="Push a saved h-classifier folder to a Hugging Face Hub model repo."
    )
    parser.add_argument("folder", help="A folder written by `balancing-act train` (HClassifier.save_pretrained).")
    parser.add_argument("repo_id", help="Hub repo id, e.g. 'user/skin-h-classifier' (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
    parser.add_argument(
        "--commit-message", default=None, help="Commit message (default: 'Upload Balancing Act h-classifier')."
    )
    parser.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    return parser


def main(argv: list[str] | None = None) -> None:
    from h_classifiers.hub import HubUnreachableError, push_classifier

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        url = push_classifier(
            args.folder,
            args.repo_id,
            token=args.token,
            private=args.private or None,
            commit_message=args.commit_message,
            revision=args.revision,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    except HubUnreachableError as error:
        raise SystemExit(f"{parser.prog}: {error}") from None
    print(f"Pushed {args.folder} to {url}")


if __name__ == "__main__":
    main()
