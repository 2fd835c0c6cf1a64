"""`qwenkit quantize SRC DST`: write a weight-only int4 / int8 checkpoint that loads back with --model DST."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int4 / int8 safetensors checkpoint")
    p.add_argument("src", help="checkpoint directory, .gguf file or hub id ('default' for the embedded model)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128, 256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwenkit.weights.save import save_quantized
    from qwenkit.weights.loader import load_model

    loaded = load_model(None if args.src == "default" else args.src, "float32")
    save_quantized(loaded, Path(args.dst), args.bits, args.group_size)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0
