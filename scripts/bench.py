"""Throughput benchmark: the command. The code is the scripts/bench/ package (its
docstring describes the systems and the JSON); `python scripts/bench.py --help`."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a file: make `scripts` and `engine` importable
    sys.path.insert(0, str(REPO_ROOT))

from scripts.bench.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
