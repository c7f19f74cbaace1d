"""The lab: research tools run from a checkout's root (`python -m lab.<tool>` or `python lab/<tool>`): the
benchmark, the reproduction table and its sweeps, the toy models' training and reports, and the image-space guidance
peer. Not part of the installed package: the wheel holds none of it."""

from collections.abc import Callable
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent  # the checkout's root: pipeline_balancing_act.py and h_classifiers/
# The lab's record: every page and result file the lab writes goes under here (the user docs are docs/*.md).
LAB_DOCS = ROOT / "docs" / "lab"


def write_record(output: Path, results: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> str:
    """Write a lab tool's results as `output` with a `.json` suffix and its page, `render(results)`, beside it as
    `.md` (each atomically); returns the page."""
    from h_classifiers.io_utils import atomic_write_json, atomic_write_text

    page = render(results)
    atomic_write_json(output.with_suffix(".json"), results)
    atomic_write_text(output.with_suffix(".md"), page)
    return page
