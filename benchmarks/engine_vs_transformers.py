"""16 concurrent requests x 128 output tokens on the embedded default: qwenkit's engine beside
transformers' batched generate, same model (the same GGUF, fp32), same prompts, same run.

    python benchmarks/engine_vs_transformers.py [--num-requests 16] [--prompt-len 128] [--output-len 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from qwenkit.engine.benchmark import random_prompts, run_concurrent
from qwenkit.engine.llm_engine import EngineConfig, LLMEngine
from qwenkit.weights.default_model import ensure_assembled
from qwenkit.weights.loader import load_model


def transformers_batched(prompts: list[list[int]], output_len: int) -> tuple[float, int, float]:
    from transformers import AutoModelForCausalLM

    gguf = ensure_assembled()
    t = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load = time.monotonic() - t
    width = max(len(p) for p in prompts)
    pad = 151643
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.monotonic()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, pad_token_id=pad,
        )
    seconds = time.monotonic() - start
    return seconds, int((out.shape[1] - width) * len(prompts)), load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    loaded = load_model(None, "float32")
    prompts = random_prompts(args.num_requests, args.prompt_len, loaded.config.vocab_size)
    ours = run_concurrent(LLMEngine(loaded, EngineConfig()), prompts, args.output_len)
    print("qwenkit engine (fp32)")
    print(ours.report())
    del loaded

    seconds, tokens, load = transformers_batched(prompts, args.output_len)
    theirs = tokens / seconds
    print(f"\ntransformers generate (fp32, batch {args.num_requests}): {tokens} tokens in {seconds:.1f} s, load {load:.0f} s")
    print(f"\n{'':24}{'output tok/s':>14}")
    print(f"{'qwenkit':24}{ours.output_tokens_per_second:>14.1f}")
    print(f"{'transformers':24}{theirs:>14.1f}")
    print(f"{'ratio qwenkit/transformers':24}{ours.output_tokens_per_second / theirs:>10.2f}x")


if __name__ == "__main__":
    main()
