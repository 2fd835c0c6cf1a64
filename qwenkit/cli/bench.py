"""`qwenkit bench`: N concurrent requests through the engine; throughput and latency percentiles."""

from __future__ import annotations

import argparse

from qwenkit.cli.common import add_engine_flags, add_model_flags, load_llm


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure throughput and latency under concurrent requests")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_model_flags(p)
    add_engine_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwenkit.engine.benchmark import random_prompts, run_concurrent  # here: the engine is slow to import

    llm = load_llm(args)
    prompts = random_prompts(args.num_requests, args.prompt_len, llm.engine.loaded.config.vocab_size, args.seed)
    print(run_concurrent(llm.engine, prompts, args.output_len).report())
    return 0
