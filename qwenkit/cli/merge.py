"""`qwenkit merge BASE ADAPTER OUT`: fold a LoRA adapter into its base, write a safetensors checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("base", help="base checkpoint directory, .gguf or hub id ('default' for the embedded model)")
    p.add_argument("adapter", help="PEFT-format adapter directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwenkit.lora.attach import load_adapter, merge_adapter
    from qwenkit.weights.loader import load_model
    from qwenkit.weights.save import model_tensors, save_hf_checkpoint

    loaded = load_model(None if args.base == "default" else args.base, args.dtype)
    load_adapter(loaded.model, "merge", args.adapter)
    merge_adapter(loaded.model, "merge")
    save_hf_checkpoint(loaded, Path(args.out), model_tensors(loaded))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
