"""The user's path: `qwenkit serve` beside `llama-server` through HTTP, same client, same GGUF, one run.

Each server runs alone (the other is stopped) on the embedded default, with 2 threads. The same
asyncio client streams `/v1/chat/completions` (greedy, `ignore_eos`, 128 tokens) with 1 client,
then 16 concurrent clients, each with its own prompt; it reads time to first token, each stream's
decode rate (tokens after the first over the time after the first) and the aggregate rate
(all tokens over the wall time). Engine-direct rows (`AsyncLLM` in this process, no HTTP) and a
read-bandwidth probe with the batch-1 bound it implies are printed beside them.

    # llama-server, from the llama.cpp that llama-cpp-python vendors (see --help of this script):
    cmake -S vendor/llama.cpp -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-server -j2
    python benchmarks/serving.py --llama-server build/bin/llama-server [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

THREADS = 2
TOKENS = 128
CLIENTS = 16
TOPICS = ["the sea", "a lighthouse", "a robot", "a city at night", "a dragon", "a forest", "a train", "a desert",
          "the moon", "a chess game", "a storm", "a library", "a garden", "a mountain", "a river", "a market"]


@dataclass
class Stream:
    ttft: float  # seconds from request to first token
    decode_rate: float  # tokens/s after the first
    tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]


async def chat_chunks(client, url: str, body: dict):
    """The parsed chunks of one streamed /v1/chat/completions."""
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def one_stream(client, url: str, i: int, model: str) -> Stream:
    body = {"model": model, "messages": messages(i), "max_tokens": TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}
    start = time.monotonic()
    stamps: list[float] = []
    async for chunk in chat_chunks(client, url, body):
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            stamps.append(time.monotonic())
    # Both servers send one token per chunk while streaming (checked: len(stamps) == TOKENS below).
    return Stream(stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps))


async def load(url: str, clients: int) -> tuple[list[Stream], float]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]  # each server names its model
        start = time.monotonic()
        streams = await asyncio.gather(*(one_stream(client, url, i, model) for i in range(clients)))
        return list(streams), time.monotonic() - start


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def measure_server(cmd: list[str], port: int, rounds: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        asyncio.run(load(url, 1))  # warm-up: first-call costs (kernel threads, caches) are not the steady state
        return measure(lambda clients: asyncio.run(load(url, clients)), rounds)
    finally:
        proc.terminate()
        proc.wait(30)


def measure(run, rounds: int) -> dict:
    one, many = [], []
    for _ in range(rounds):
        streams, _ = run(1)
        assert streams[0].tokens == TOKENS, streams[0].tokens
        one.append(streams[0].decode_rate)
        streams, wall = run(CLIENTS)
        assert all(s.tokens == TOKENS for s in streams), [s.tokens for s in streams]
        ttfts = sorted(s.ttft for s in streams)
        many.append((CLIENTS * TOKENS / wall, ttfts[len(ttfts) // 2], ttfts[-1]))
    return {
        "one": statistics.median(one), "one_all": one,
        "many": statistics.median(m[0] for m in many), "many_all": [m[0] for m in many],
        "ttft_p50": statistics.median(m[1] for m in many), "ttft_max": statistics.median(m[2] for m in many),
    }


def measure_engine(rounds: int) -> dict:
    """AsyncLLM in this process, no HTTP: the same requests through the engine's Python API."""
    from qwenkit.engine import AsyncLLM, SamplingParams

    llm = AsyncLLM(None)
    tok = llm.tokenizer
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)

    async def stream(i: int) -> Stream:
        prompt = tok.encode_chat(messages(i))  # the server's own encoding of the same messages
        start, stamps = time.monotonic(), []
        async for out in llm.generate(prompt, params):
            stamps.extend([time.monotonic()] * len(out.outputs[0].delta_token_ids))
        return Stream(stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps))

    async def run(clients: int):
        start = time.monotonic()
        streams = await asyncio.gather(*(stream(i) for i in range(clients)))
        return list(streams), time.monotonic() - start

    async def main():
        await run(1)
        results = []
        for _ in range(rounds):
            results.append(await run(1))
            results.append(await run(CLIENTS))
        return results

    results = asyncio.run(main())
    it = iter(results)
    out = measure(lambda clients: next(it), rounds)
    llm.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", help="path of a llama-server binary (see the module docstring)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    from qwenkit.weights.default_model import ensure_assembled

    gguf = ensure_assembled()
    rows: dict[str, dict] = {}
    if args.llama_server:
        port = free_port()
        rows["llama-server"] = measure_server(
            [args.llama_server, "-m", str(gguf), "-t", str(THREADS), "-tb", str(THREADS), "-np", str(CLIENTS),
             "-c", str(CLIENTS * 512), "--port", str(port), "--host", "127.0.0.1"], port, args.rounds)
    port = free_port()
    env_cmd = [sys.executable, "-c", "from qwenkit.cli.main import main; main()", "serve", "--port", str(port)]
    rows["qwenkit serve"] = measure_server(env_cmd, port, args.rounds)
    if not args.skip_engine:
        rows["qwenkit engine (AsyncLLM)"] = measure_engine(args.rounds)
    from bounds import describe  # benchmarks/bounds.py, beside this script

    size = gguf.stat().st_size
    anchor = rows.get("llama-server")
    print(f"\nembedded default ({size / 2**20:.0f} MiB GGUF), {THREADS} threads, {TOKENS} tokens per stream, "
          f"median of {args.rounds} rounds; ratios to llama-server")
    print(describe())
    print(f"{'path':28}{'1 client tok/s':>22}{f'{CLIENTS} clients agg tok/s':>26}{'TTFT p50 s':>12}{'TTFT max s':>12}")
    for name, r in rows.items():
        ratio = (lambda key: f" ({r[key] / anchor[key]:4.2f}x)") if anchor else (lambda key: "")
        print(f"{name:28}{r['one']:>15.1f}{ratio('one'):>7}{r['many']:>19.1f}{ratio('many'):>7}"
              f"{r['ttft_p50']:>12.2f}{r['ttft_max']:>12.2f}")
    for name, r in rows.items():
        print(f"  {name}: 1 client {', '.join(f'{x:.1f}' for x in r['one_all'])}; "
              f"{CLIENTS} clients {', '.join(f'{x:.1f}' for x in r['many_all'])}")


if __name__ == "__main__":
    main()
