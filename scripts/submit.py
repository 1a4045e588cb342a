"""Submit a Parquet file of prompts: the same arguments as `batchinfer submit`.

    python scripts/submit.py prompts.parquet --model M --wait
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
