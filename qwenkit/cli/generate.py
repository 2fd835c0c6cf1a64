"""`qwenkit generate`: raw completion of a prompt, no chat template."""

from __future__ import annotations

import argparse
import sys

from qwenkit.cli.common import add_model_flags, add_sampling_flags, load, sampling_params
from qwenkit.engine.generate import Generator


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a raw prompt (no chat template)")
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    loaded = load(args)
    for step in Generator(loaded).stream(loaded.tokenizer.encode(prompt), params):
        sys.stdout.write(step.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
