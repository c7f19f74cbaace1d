"""The lab: research tools run from a checkout's root (`python -m lab.<tool>` or `python lab/<tool>`): the
benchmark, the reproduction table and its sweeps, the toy models' training and reports, and the image-space guidance
peer. Not part of the installed package: the wheel holds none of it."""

from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent  # the checkout's root: pipeline_balancing_act.py and h_classifiers/
# The lab's record: every page and result file the lab writes goes under here (the user docs are docs/*.md).
LAB_DOCS = ROOT / "docs" / "lab"
