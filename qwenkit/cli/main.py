"""The `qwenkit` command."""

from __future__ import annotations

import argparse
import sys
import warnings

from qwenkit import __version__
from qwenkit.cli import batch, bench, chat, generate, merge, models, pull, quantize, serve, tune
from qwenkit.errors import QwenkitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenkit", description="Run the Qwen model family on your own machine.")
    parser.add_argument("--version", action="version", version=f"qwenkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (chat, generate, serve, batch, bench, quantize, tune, merge, pull, models):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
    try:
        return args.func(args)
    except QwenkitError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
