"""qwenkit beside llama.cpp and transformers on the same GGUF (the embedded default), in one run.

For each runtime, in its own process (so peak RSS is its own): load time, decode tokens/s
(batch 1, 128 greedy tokens), prefill tokens/s (a 1000-token prompt), peak RSS, and perplexity on
benchmarks/data/perplexity.txt. Prints a table with ratios to llama.cpp. Peak RSS is read before
the perplexity pass, whose logits for every position ([tokens, 151936] floats) would dominate it.
Then batch-1 decode and prefill of llama.cpp and qwenkit default alternating in one process for a
few rounds (`--rounds`): the per-round ratio, which the machine's drift between separate runs does
not blur.

    pip install -e ".[bench]"          # llama-cpp-python compiles llama.cpp (~10 minutes)
    python benchmarks/vs_anchors.py [--skip-transformers] [--modes default,float32,int4]

Modes: default (what `qwenkit chat` loads: GGUF blocks in place), float32 (the exact reference),
int8 / int4 (weight-only quantization at load time).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import time
from pathlib import Path

THREADS = 2
DECODE_TOKENS = 128
PREFILL_TOKENS = 1000
TEXT = Path(__file__).parent / "data" / "perplexity.txt"
KV_CONTEXT = 2048  # llama.cpp's n_ctx below: both caches hold this many tokens


def token_ids():
    from qwenkit.tokenizer.tokenizer import Tokenizer
    from qwenkit.weights.default_model import ensure_assembled
    from qwenkit.formats.gguf_reader import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(ensure_assembled()))
    text_ids = tok.encode(TEXT.read_text())
    prefill = (text_ids * 4)[:PREFILL_TOKENS]
    chat = tok.encode(tok.chat_template.render([{"role": "user", "content": "Write a long story about the sea."}]))
    return text_ids, prefill, chat


def nll_to_ppl(logits, ids) -> float:
    import torch

    logp = torch.log_softmax(torch.as_tensor(logits[: len(ids) - 1]).float(), -1)
    nll = -logp.gather(1, torch.tensor(ids[1:]).view(-1, 1)).mean().item()
    return math.exp(nll)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_qwenkit(mode: str, ids) -> dict:
    import torch

    from qwenkit.engine import LLM, EngineConfig, SamplingParams
    from qwenkit.engine.paged_attention import PagedKVCache
    from qwenkit.model.attention import NoCache
    from qwenkit.weights.loader import load_model

    torch.set_num_threads(THREADS)
    text_ids, prefill, chat = ids
    start = time.monotonic()
    if mode == "default":
        loaded = load_model(None)
    else:
        loaded = load_model(None, "float32", quantize=None if mode == "float32" else mode)
    load = time.monotonic() - start
    # The KV cache holds llama.cpp's context (n_ctx=2048) rather than the engine's 1 GiB default.
    cfg = loaded.config
    kv_dtype = loaded.plan.kv_cache_dtype
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv_dtype)
    llm = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=KV_CONTEXT * per_token))
    out = llm.generate(chat, SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0, ignore_eos=True))[0]
    times = out.token_times[0]
    decode = DECODE_TOKENS / (times[-1] - times[0])
    out = llm.generate(prefill, SamplingParams(max_tokens=1, temperature=0))[0]
    prefill_rate = PREFILL_TOKENS / out.metrics.time_to_first_token
    rss = peak_rss()  # before the perplexity pass, whose [tokens, vocab] logits are the benchmark's own
    pos = torch.arange(len(text_ids))
    with torch.inference_mode():
        logits = loaded.model.compute_logits(loaded.model(torch.tensor(text_ids), pos, NoCache(pos)))
    result = {"load": load, "decode": decode, "prefill": prefill_rate, "rss": rss, "ppl": nll_to_ppl(logits, text_ids)}
    if mode == "default":  # a long text takes the exact float path; measure the decode kernel's numbers too
        from qwenkit.quantization import gguf_linear

        gguf_linear.KERNEL_MAX_TOKENS = len(text_ids)
        with torch.inference_mode():
            logits = loaded.model.compute_logits(loaded.model(torch.tensor(text_ids), pos, NoCache(pos)))
        result["kernel_ppl"] = nll_to_ppl(logits, text_ids)
    return result


def run_llama_cpp(ids) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from qwenkit.weights.default_model import ensure_assembled

    text_ids, prefill, chat = ids
    start = time.monotonic()
    settings = dict(n_ctx=KV_CONTEXT, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)
    llm = Llama(str(ensure_assembled()), **settings)
    load = time.monotonic() - start
    stamps = []
    for _ in llm.generate(chat, temp=0.0, top_k=1, reset=True):
        stamps.append(time.monotonic())
        if len(stamps) > DECODE_TOKENS:
            break
    decode = DECODE_TOKENS / (stamps[-1] - stamps[0])
    llm.reset()
    start = time.monotonic()
    llm.eval(prefill)
    prefill_rate = PREFILL_TOKENS / (time.monotonic() - start)
    rss = peak_rss()
    del llm  # perplexity needs every position's logits: a second instance that keeps them all
    llm = Llama(str(ensure_assembled()), logits_all=True, **settings)
    llm.eval(text_ids)
    logits = np.array(llm.scores[: len(text_ids)])
    return {"load": load, "decode": decode, "prefill": prefill_rate, "rss": rss, "ppl": nll_to_ppl(logits, text_ids)}


def run_transformers(ids) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from qwenkit.weights.default_model import ensure_assembled

    torch.set_num_threads(THREADS)
    text_ids, prefill, chat = ids
    gguf = ensure_assembled()
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load = time.monotonic() - start
    with torch.inference_mode():
        start = time.monotonic()
        model(torch.tensor([prefill]), logits_to_keep=1)
        prefill_rate = PREFILL_TOKENS / (time.monotonic() - start)
        ids = torch.tensor([chat])
        start = time.monotonic()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.monotonic() - start
        start = time.monotonic()
        model.generate(ids, max_new_tokens=DECODE_TOKENS + 1, min_new_tokens=DECODE_TOKENS + 1, do_sample=False)
        decode = DECODE_TOKENS / (time.monotonic() - start - first)
        rss = peak_rss()
        logits = model(torch.tensor([text_ids])).logits[0]
    return {"load": load, "decode": decode, "prefill": prefill_rate, "rss": rss, "ppl": nll_to_ppl(logits, text_ids)}


def alternating(ids, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(llama.cpp, qwenkit default) batch-1 decode and prefill tok/s, `rounds` times, the two
    alternating in one process: on a shared machine whose speed drifts 10-30% within minutes, the
    ratio of neighbouring runs is what compares the two; runs minutes apart in separate processes
    do not."""
    import torch
    from llama_cpp import Llama

    from qwenkit.engine import LLM, EngineConfig, SamplingParams
    from qwenkit.engine.paged_attention import PagedKVCache
    from qwenkit.weights.default_model import ensure_assembled
    from qwenkit.weights.loader import load_model

    torch.set_num_threads(THREADS)
    _, prefill, chat = ids
    llama = Llama(str(ensure_assembled()), n_ctx=KV_CONTEXT, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)
    loaded = load_model(None)
    cfg = loaded.config
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, loaded.plan.kv_cache_dtype)
    # no prefix cache: each prefill round computes the whole prompt again, as llama.cpp's after reset()
    llm = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=KV_CONTEXT * per_token, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0, ignore_eos=True)

    def llama_cpp() -> float:
        stamps = []
        for _ in llama.generate(chat, temp=0.0, top_k=1, reset=True):
            stamps.append(time.monotonic())
            if len(stamps) > DECODE_TOKENS:
                break
        return DECODE_TOKENS / (stamps[-1] - stamps[0])

    def qwenkit() -> float:
        times = llm.generate(chat, params)[0].token_times[0]
        return DECODE_TOKENS / (times[-1] - times[0])

    def llama_cpp_prefill() -> float:
        llama.reset()
        start = time.monotonic()
        llama.eval(prefill)
        return PREFILL_TOKENS / (time.monotonic() - start)

    def qwenkit_prefill() -> float:  # as run_qwenkit measures it
        out = llm.generate(prefill, SamplingParams(max_tokens=1, temperature=0))[0]
        return PREFILL_TOKENS / out.metrics.time_to_first_token

    results: dict[str, list[tuple[float, float]]] = {"decode": [], "prefill": []}
    for kind, runs in (("decode", (llama_cpp, qwenkit)), ("prefill", (llama_cpp_prefill, qwenkit_prefill))):
        for run in runs:
            run()  # warm both
        for _ in range(rounds):
            pair = []
            for run in runs:
                time.sleep(0.2)  # the other runtime's worker threads stop spinning
                pair.append(run())
            results[kind].append((pair[0], pair[1]))
    return results


def isolated(fn, *args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="default,float32,int4", help="qwenkit modes: default, float32, int8, int4")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--rounds", type=int, default=5,
                    help="decode and prefill of llama.cpp and qwenkit default alternating in one process, this many rounds (0: none)")
    args = ap.parse_args()
    ids = token_ids()  # here, so that no runtime's peak RSS holds the benchmark's tokenizer
    rows = {"llama.cpp": isolated(run_llama_cpp, ids)}
    for mode in args.modes.split(","):
        rows[f"qwenkit {mode}"] = isolated(run_qwenkit, mode, ids)
    if not args.skip_transformers:
        rows["transformers fp32"] = isolated(run_transformers, ids)
    anchor = rows["llama.cpp"]
    gguf_size = Path(__import__("qwenkit.weights.default_model", fromlist=["x"]).ensure_assembled()).stat().st_size
    print(f"\nembedded default ({gguf_size / 2**20:.0f} MiB GGUF), {THREADS} threads; ratios are to llama.cpp\n")
    print(f"{'runtime':20}{'decode tok/s':>18}{'prefill tok/s':>19}{'load s':>9}{'peak RSS GiB':>14}{'RSS/GGUF':>10}{'perplexity':>12}")
    for name, r in rows.items():
        print(f"{name:20}{r['decode']:>9.1f} ({r['decode'] / anchor['decode']:4.2f}x){r['prefill']:>10.1f} ({r['prefill'] / anchor['prefill']:4.2f}x)"
              f"{r['load']:>9.1f}{r['rss'] / 2**30:>14.2f}{r['rss'] / gguf_size:>10.2f}{r['ppl']:>8.2f} ({(r['ppl'] / anchor['ppl'] - 1) * 100:+.1f}%)")
    if args.rounds:
        for kind, pairs in isolated(alternating, ids, args.rounds).items():
            ratios = sorted(q / l for l, q in pairs)
            what = f"batch-1 decode of {DECODE_TOKENS} tokens" if kind == "decode" else f"prefill of {PREFILL_TOKENS} tokens"
            print(f"\n{what}, llama.cpp and qwenkit default alternating in one process ({len(pairs)} rounds):")
            print("  llama.cpp tok/s " + " ".join(f"{l:6.1f}" for l, _ in pairs))
            print("  qwenkit   tok/s " + " ".join(f"{q:6.1f}" for _, q in pairs))
            print(f"  qwenkit / llama.cpp per round: median {ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    for name, r in rows.items():
        if "kernel_ppl" in r:
            print(f"\n{name}: perplexity with every token through the int8-activation decode kernel: "
                  f"{r['kernel_ppl']:.2f} ({(r['kernel_ppl'] / anchor['ppl'] - 1) * 100:+.1f}% vs llama.cpp)")


if __name__ == "__main__":
    main()
