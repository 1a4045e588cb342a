"""Write a GPTQ checkpoint of a float model with GPTQModel, for `LLM(model=OUT_DIR)`.

    python scripts/quantize.py MODEL_DIR OUT_DIR --bits 4 --group-size 128 [--desc-act] \\
        --calibration data.parquet --column text [--samples 256] [--max-length 512]

The output is a standard GPTQ folder (format "gptq", int32 packing, config.json with its
quantization_config, and the tokenizer), so the engine and other GPTQ loaders read it.
Calibration: the first --samples non-empty texts of --column, each cut to --max-length
tokens. GPTQModel is an optional extra: `pip install 'batchinfer[quantize]'`. On a CPU
with few cores set GPTQMODEL_CPU_WORKERS (this script defaults it to the cores present).

A mistake (missing extra, bad path or column, bad numbers) is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SUPPORTED_BITS = (4, 8)


class UsageError(Exception):
    """A user mistake: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, exit 2 (argparse's default also prints the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="quantize.py", description="Quantize a float model to a GPTQ checkpoint.")
    p.add_argument("model_dir", help="float Hugging Face model folder (safetensors)")
    p.add_argument("out_dir", help="folder to write the GPTQ checkpoint to (new or empty)")
    p.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    p.add_argument("--group-size", type=int, default=128,
                   help="input features per scale (-1: one per output channel)")
    p.add_argument("--desc-act", action="store_true",
                   help="act-order: quantize columns by decreasing activation size")
    p.add_argument("--asym", action="store_true", help="asymmetric (default: symmetric)")
    p.add_argument("--calibration", required=True, help="Parquet file of calibration texts")
    p.add_argument("--column", default="text", help="text column of --calibration")
    p.add_argument("--samples", type=int, default=256, help="calibration texts to use")
    p.add_argument("--max-length", type=int, default=512, help="tokens per calibration text")
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{args.model_dir!r} is not a model folder (no config.json)")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config") or (model_dir / "quantize_config.json").exists():
        raise UsageError(f"{args.model_dir!r} is already quantized")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"output {args.out_dir!r} exists and is not an empty folder")
    if out_dir.resolve() == model_dir.resolve():
        raise UsageError("the output folder must differ from the model folder")
    if args.group_size != -1 and args.group_size <= 0:
        raise UsageError(f"--group-size must be -1 or positive, got {args.group_size}")
    for name in ("samples", "max_length", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if not Path(args.calibration).is_file():
        raise UsageError(f"calibration file {args.calibration!r} does not exist")


def read_calibration(path: str, column: str, samples: int) -> list[str]:
    """The first `samples` non-empty strings of `column`; UsageError explains a bad file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UsageError(f"calibration file {path!r} is not a Parquet file ({error})") from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise UsageError(
            f"calibration file {path!r} has no column {column!r} "
            f"(columns: {', '.join(schema.names)})"
        )
    if not pa.types.is_string(schema.field(column).type) and not pa.types.is_large_string(
        schema.field(column).type
    ):
        raise UsageError(f"column {column!r} holds {schema.field(column).type}, not text")
    texts: list[str] = []
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        texts.extend(t for t in batch.column(0).to_pylist() if t and t.strip())
        if len(texts) >= samples:
            break
    if not texts:
        raise UsageError(f"column {column!r} of {path!r} has no non-empty text")
    return texts[:samples]


def import_gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))
    try:
        import gptqmodel
    except ImportError:
        raise UsageError(
            "GPTQModel is not installed: pip install 'batchinfer[quantize]'"
        ) from None
    return gptqmodel


def quantize(args: argparse.Namespace) -> Path:
    check_args(args)
    texts = read_calibration(args.calibration, args.column, args.samples)
    gptqmodel = import_gptqmodel()
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    calibration = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=args.max_length)["input_ids"]
        calibration.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    options = dict(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                   sym=not args.asym, format="gptq")
    if args.group_size == -1:
        # GPTQModel's default act_group_aware ordering needs groups.
        options["act_group_aware"] = False
    config = gptqmodel.QuantizeConfig(**options)
    model = gptqmodel.GPTQModel.load(args.model_dir, config, dtype=torch.float16)
    model.quantize(calibration, batch_size=args.batch_size, calibration_data_min_length=1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out_dir = quantize(args)
    except UsageError as error:
        print(f"quantize.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote GPTQ int{args.bits} checkpoint to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
