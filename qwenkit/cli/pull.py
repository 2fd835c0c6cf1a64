"""`qwenkit pull ID`: download a hub model (GGUF by tag, split parts, safetensors) into the local cache."""

from __future__ import annotations

import argparse

from qwenkit.cli.common import add_hub_flags
from qwenkit.errors import QwenkitError


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="download a model from the Hugging Face hub or ModelScope")
    p.add_argument("model", help="hub id: owner/name, or owner/name:TAG for a GGUF repo (e.g. Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M)")
    add_hub_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qwenkit.weights.hub import fetch, parse_hub_id

    ref = parse_hub_id(args.model, args.revision, args.source)
    if ref is None:
        raise QwenkitError(f"{args.model!r} is not a hub id (owner/name or owner/name:TAG)")
    fetched = fetch(ref)
    print(fetched.path)
    return 0
