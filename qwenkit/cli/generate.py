"""`qwenkit generate`: raw completion of a prompt, no chat template."""

from __future__ import annotations

import argparse
import sys

from qwenkit.cli.common import add_engine_flags, add_model_flags, add_sampling_flags, load_llm, sampling_params


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a raw prompt (no chat template)")
    p.add_argument("prompt", help="the text to continue ('-' reads standard input)")
    add_model_flags(p)
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args)
    params = sampling_params(args, llm)
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
