"""The argument parser every command uses: both option spellings, and every option's default in its help."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to an option's help unless the help already speaks of its default (or it is required)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.required or not action.option_strings:
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose options accept underscores for dashes (`--num_images` is `--num-images`).

    Options are declared once, with dashes; a command-line token `--some_option[=value]` is read as
    `--some-option[=value]` when that names (or abbreviates) a declared option. Help texts show their defaults.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("epilog", "Options also accept underscores: --num_images is --num-images.")
        super().__init__(**kwargs)

    def _dashed(self, token: str) -> str:
        if not token.startswith("--") or "_" not in token:
            return token
        name, sep, value = token.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        if any(option.startswith(dashed) for option in self._option_string_actions):
            return dashed + sep + value
        return token

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)  # after "--" everything is a positional value
        args = [self._dashed(token) for token in args[:end]] + args[end:]
        return super().parse_known_args(args, namespace)
