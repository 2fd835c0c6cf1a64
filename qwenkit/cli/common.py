"""Flags shared by the CLI commands, and turning them into a model and sampling parameters."""

from __future__ import annotations

import argparse
import sys

from qwenkit.engine.sampling_params import SamplingParams


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="checkpoint directory, .gguf file or hub id (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="float32 is the exact reference mode")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def load(args: argparse.Namespace):
    from qwenkit.weights.loader import load_model

    if sys.stderr.isatty():
        print("loading model...", file=sys.stderr, flush=True)
    return load_model(args.model, args.dtype)
