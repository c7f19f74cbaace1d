"""Thin wrapper: `python scripts/extract_h.py [args]` is `balancing-act extract [args]`."""

import sys
from pathlib import Path


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h_classifiers.commands.extract import main  # noqa: E402


if __name__ == "__main__":
    main()
