"""Submit a Parquet file of prompts: the same arguments as `batchinfer submit`.

    python scripts/submit.py prompts.parquet --model M --wait
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["submit", *sys.argv[1:]])
