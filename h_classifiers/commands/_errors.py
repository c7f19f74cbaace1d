"""How the commands report a bad argument: an error raised by the library or the pipeline, whose message names a
Python argument in backquotes (`h_classifier`), becomes one argparse line (exit 2) naming the option that sets it
(`--classifier`); any other error keeps its traceback."""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator


# The pipeline's (and the library's) argument names in their messages -> the options that set them.
OPTION_OF_ARGUMENT = {
    "h_classifier": "--classifier",
    "target_distribution": "--target",
    "target": "--target",
    "guidance_strength": "--strength",
    "distribution_solver": "--solver",
    "classifier_temperature": "--temperature",
    "guided_branches": "--guided-branches",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "eta": "--eta",
    "model": "--model",
    "scheduler": "--scheduler",
    "device": "--device",
    "dtype": "--dtype",
    "labeller": "--labeller",
}
# The start of the pipeline's input errors that name no argument: a scheduler on another timestep scale than the
# classifier's heads.
INPUT_ERROR_PREFIXES = ("The scheduler ",)


def option_wording(message: str, names: dict[str, str] = OPTION_OF_ARGUMENT) -> str:
    """`message` with the Python argument names in backquotes (`h_classifier`) replaced by the options that set them
    (`--classifier`)."""
    return re.sub(r"`(\w+)`", lambda m: f"`{names[m[1]]}`" if m[1] in names else m[0], message)


def parser_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """`OPTION_OF_ARGUMENT` and, for each option of `parser`, its argparse dest -> its long form (`features_dir` ->
    `--features-dir`): the library names its arguments as the options are named."""
    names = dict(OPTION_OF_ARGUMENT)
    for action in parser._actions:
        long = [option for option in action.option_strings if option.startswith("--")]
        if long and action.dest != "help":
            names.setdefault(action.dest, long[0])
    return names


@contextlib.contextmanager
def argument_errors(
    parser: argparse.ArgumentParser, errors: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, OSError)
) -> Iterator[None]:
    """Any of `errors` raised inside becomes one argparse error (exit 2) in the options' words (`option_wording`
    with `parser_options`)."""
    try:
        yield
    except errors as error:
        parser.error(option_wording(str(error), parser_options(parser)))


def is_input_error(error: BaseException, names: dict[str, str] = OPTION_OF_ARGUMENT) -> bool:
    """Whether a `ValueError` is one of the pipeline's input checks on an argument the command line sets: its message
    starts with that argument's name in backquotes (or is one of `INPUT_ERROR_PREFIXES`)."""
    if not isinstance(error, ValueError):
        return False
    text = str(error)
    named = re.match(r"`(\w+)", text)
    return (named is not None and named[1] in names) or text.startswith(INPUT_ERROR_PREFIXES)


@contextlib.contextmanager
def pipeline_input_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Around the pipeline's calls: an input check's `ValueError` (`is_input_error`: a classifier of another h shape
    than the model's, a scheduler on another timestep scale, ...) becomes one argparse error naming the option; any
    other error propagates with its traceback."""
    try:
        yield
    except ValueError as error:
        if not is_input_error(error):
            raise
        parser.error(option_wording(str(error), parser_options(parser)))
