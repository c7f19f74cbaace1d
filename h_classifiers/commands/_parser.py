"""The argument parser every command uses: both option spellings, every option's default in its help, values that
start with '-' (`--target -0.2,1.2`), and the third-party notices the commands silence."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings


# A value such as `-0.2,1.2` or `-.5`: argparse would take it for an option (it only knows plain negative numbers).
NEGATIVE_VALUE = re.compile(r"^-\.?\d")

# transformers logs this once per image-processor class when torchvision is missing (`utils/import_utils.py`,
# `logger.warning_once`); the commands never use the torchvision backend, so the notice only confuses.
TORCHVISION_NOTICE = re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to")
# numpy 2 warns about torch's `Tensor.__array__` from `np.array(tensor)` in diffusers' schedulers' `set_timesteps`.
NUMPY_ARRAY_COPY_MESSAGE = r"__array__ implementation doesn't accept a copy keyword"
NUMPY_ARRAY_COPY_MODULE = r"diffusers\.schedulers\."


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_NOTICE.search(record.getMessage())


_NOTICE_FILTER = _DropTorchvisionNotice()


def silence_known_notices() -> None:
    """Silence exactly the notices above, nothing else (idempotent). transformers' loggers are standard `logging`
    loggers, so the filter can be installed before transformers is imported."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if _NOTICE_FILTER not in logger.filters:
        logger.addFilter(_NOTICE_FILTER)
    warnings.filterwarnings(
        "ignore", message=NUMPY_ARRAY_COPY_MESSAGE, category=DeprecationWarning, module=NUMPY_ARRAY_COPY_MODULE
    )


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
    `--some-option[=value]` when that names (or abbreviates) a declared option. A value that starts with '-' followed
    by a digit (`--target -0.2,1.2`) is given to its option, so that the command's own check explains what is wrong
    with it. Help texts show their defaults.
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

    def _takes_one_value(self, token: str) -> bool:
        """Whether `token` names (or abbreviates, unambiguously) an option that takes exactly one value."""
        if not token.startswith("-") or "=" in token:
            return False
        action = self._option_string_actions.get(token)
        if action is None and token.startswith("--"):
            matches = {a for option, a in self._option_string_actions.items() if option.startswith(token)}
            action = matches.pop() if len(matches) == 1 else None
        return action is not None and action.nargs is None  # store / append; flags and --help take none

    def _attach_negative_values(self, tokens: list[str]) -> list[str]:
        joined, i = [], 0
        while i < len(tokens):
            token = tokens[i]
            if i + 1 < len(tokens) and self._takes_one_value(token) and NEGATIVE_VALUE.match(tokens[i + 1]):
                joined.append(f"{token}={tokens[i + 1]}")
                i += 2
                continue
            joined.append(token)
            i += 1
        return joined

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)  # after "--" everything is a positional value
        args = self._attach_negative_values([self._dashed(token) for token in args[:end]]) + args[end:]
        return super().parse_known_args(args, namespace)
