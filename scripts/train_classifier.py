"""Thin wrapper: `python scripts/train_classifier.py [args]` is `balancing-act train [args]`."""

import sys
from pathlib import Path


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h_classifiers.commands.train import main  # noqa: E402


if __name__ == "__main__":
    main()
