"""`python -m lab.reproduce ...` from a checkout's root, or `python lab/reproduce ...` from anywhere."""

import sys
from pathlib import Path


if __package__ in (None, ""):  # run as a folder (`python lab/reproduce`): the checkout's root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from lab.reproduce.cli import main  # noqa: E402


main()
