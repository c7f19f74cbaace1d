"""`balancing-act <command> [args]`: one entry point for the companion tools.

Each command is a module `h_classifiers.commands.<command>` (dashes become underscores) with `main(argv)`. The research
tools (benchmark, reproduction table, toy model training and report) are not commands of the installed package: they
live in `lab/` of a checkout (`python lab/<name>.py`).
"""

from __future__ import annotations

import importlib
import sys


COMMANDS: dict[str, str] = {
    "generate": "vanilla vs balanced images from the same seeds, side by side, with measured fractions",
    "extract": "record h-vectors (from labelled image folders, or while generating with pseudo-labels)",
    "train": "train an h-classifier from extracted h-vector shards",
    "evaluate": "measure class fractions, FD, valid rate and time for vanilla / sample / distribution / prompt",
    "push": "push a saved h-classifier to the Hugging Face Hub",
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: balancing-act <command> [args]   (balancing-act <command> --help for its arguments)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def load_command(name: str):
    """The `main` function of a command; a clear error for an unknown command or one whose module is missing."""
    if name not in COMMANDS:
        raise SystemExit(f"balancing-act: unknown command {name!r}; commands: {', '.join(COMMANDS)}.")
    module_name = f"h_classifiers.commands.{name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the command's own module missing means "not available"; a missing dependency inside it is a real error.
        if error.name != module_name:
            raise
        raise SystemExit(
            f"balancing-act: the command {name!r} is not available in this installation ({module_name} is missing)."
        ) from None
    return module.main


def main(argv: list[str] | None = None) -> None:
    from h_classifiers.commands._parser import silence_known_notices

    silence_known_notices()  # every command, also those that do not call it themselves
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command = load_command(argv[0])
    command(argv[1:])
    end_process_group()


def end_process_group() -> None:
    """Under `accelerate launch`: take the process group down once the command is done, before the interpreter exits
    (left to interpreter shutdown, gloo's threads can abort a process that finished its work)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
