"""Speculation through the user's path: `qwenkit serve` with `--speculative ngram` and without, 16
concurrent streaming clients, same prompts, same client, one run (each server alone, 2 threads).

Two workloads: 16 free-form stories (nothing to copy: speculation must not slow them down), and a
code-edit mix (8 code edits of this repository's smallest files from benchmarks/speculative.py, 8
stories), greedy, `ignore_eos`, 128 tokens each. Tokens are counted from each stream's usage (a
speculating server may send several tokens per chunk). Prints the aggregate (all tokens over the
wall time, prefill included), the median per-stream decode rate (tokens after the first over the
time after the first) and TTFT p50, for each server, and the ratios.

    python benchmarks/serving_speculative.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import TOPICS, chat_chunks, free_port, wait_ready  # noqa: E402
from speculative import ROOT, code_edit_messages  # noqa: E402

CLIENTS = 16
TOKENS = 128


def workloads() -> dict[str, list[str]]:
    stories = [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(CLIENTS)]
    edits = sorted(code_edit_messages(11), key=len)[: CLIENTS // 2]  # the shortest files: prefill stays moderate
    return {"stories": stories, "code-edit mix": edits + stories[: CLIENTS - len(edits)]}


async def one_stream(client, url: str, text: str) -> tuple[float, float, int]:
    """(TTFT, decode tok/s after the first token, completion tokens) of one streamed request."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first = last = None
    tokens = 0
    async for chunk in chat_chunks(client, url, body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        delta = ((chunk.get("choices") or [{}])[0]).get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):  # an edit of reasoning.py may start with "<think>"
            last = time.monotonic()
            first = first or last
    return first - start, (tokens - 1) / (last - first), tokens


async def load(url: str, prompts: list[str]) -> tuple[list[tuple[float, float, int]], float]:
    import httpx

    async with httpx.AsyncClient(timeout=1200) as client:
        start = time.monotonic()
        streams = await asyncio.gather(*(one_stream(client, url, p) for p in prompts))
        return list(streams), time.monotonic() - start


def measure(extra: list[str], rounds: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qwenkit.cli.main", "serve", "--port", str(port), "--served-model-name", "m", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_ready(url, proc)
        asyncio.run(load(url, ["Say hello."]))  # warm-up
        result = {}
        for name, prompts in workloads().items():
            runs = []
            for _ in range(rounds):
                streams, wall = asyncio.run(load(url, prompts))
                assert all(n == TOKENS for _, _, n in streams), [n for _, _, n in streams]
                runs.append((CLIENTS * TOKENS / wall, statistics.median(r for _, r, _ in streams),
                             statistics.median(t for t, _, _ in streams)))
            result[name] = [statistics.median(r[i] for r in runs) for i in range(3)] + [[round(r[0], 1) for r in runs]]
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    off = measure([], args.rounds)
    on = measure(["--speculative", "ngram"], args.rounds)
    print(f"qwenkit serve, {CLIENTS} concurrent streaming clients x {TOKENS} tokens, greedy, median of {args.rounds} rounds\n")
    print(f"{'workload':16}{'speculation':13}{'aggregate tok/s':>17}{'per-stream tok/s':>18}{'TTFT p50 s':>12}   rounds")
    for name in off:
        for label, r in (("off", off[name]), ("ngram", on[name])):
            print(f"{name:16}{label:13}{r[0]:>17.1f}{r[1]:>18.1f}{r[2]:>12.2f}   {r[3]}")
        print(f"{'':16}{'on / off':13}{on[name][0] / off[name][0]:>16.2f}x{on[name][1] / off[name][1]:>17.2f}x")


if __name__ == "__main__":
    main()
