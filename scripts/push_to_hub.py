"""Thin wrapper: `python scripts/push_to_hub.py [args]` is `balancing-act push [args]`."""

import sys
from pathlib import Path


# Run from a checkout without installing: the repository root holds pipeline_balancing_act.py and h_classifiers/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from h_classifiers.commands.push import main  # noqa: E402


if __name__ == "__main__":
    main()
