"""Write a small random-weight Hugging Face model folder (engine/random_model.py).

    python scripts/make_tiny_model.py OUT_DIR [--arch llama|mistral|qwen2|qwen3] [--shape tiny]
                                      [--seed 0] [--dtype float32]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.random_model import ARCHITECTURES, SHAPES, make_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the model into")
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES))
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    print(make_tiny_model(args.out_dir, args.arch, args.shape, args.seed, args.dtype))


if __name__ == "__main__":
    main()
