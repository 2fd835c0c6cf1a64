"""Measure the engine under N concurrent requests (used by `qwenkit bench` and benchmarks/)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace

import torch

from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.speculative import SpeculationStats


@dataclass
class BenchResult:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    ttft: list[float]
    itl: list[float]
    peak_rss_bytes: int
    speculation: SpeculationStats | None = None  # this run's, when the engine speculates

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    def report(self) -> str:
        return "\n".join(
            [
                f"requests            {self.num_requests}  ({self.prompt_tokens} prompt tokens, {self.output_tokens} generated)",
                f"wall time           {self.seconds:.2f} s",
                f"output tokens/s     {self.output_tokens_per_second:.1f}",
                f"TTFT p50 / p99      {percentile(self.ttft, 50) * 1e3:.0f} / {percentile(self.ttft, 99) * 1e3:.0f} ms",
                f"inter-token p50/p99 {percentile(self.itl, 50) * 1e3:.1f} / {percentile(self.itl, 99) * 1e3:.1f} ms",
                f"peak memory (RSS)   {self.peak_rss_bytes / 2**30:.2f} GiB",
            ]
            + ([f"speculation         {self.speculation.report()}"] if self.speculation is not None else [])
        )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100))


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ordinary tokens only: stay clear of the special tokens at the top of Qwen vocabularies.
    return [torch.randint(0, min(vocab, 150_000), (length,), generator=g).tolist() for _ in range(n)]


def run_concurrent(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> BenchResult:
    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0, ignore_eos=True)
    speculator = engine.speculator
    before = replace(speculator.stats) if speculator is not None else None
    start = time.monotonic()
    for p in prompts:
        engine.add_request(p, params)
    finished = []
    while engine.has_unfinished_requests():
        finished.extend(o for o in engine.step() if o.finished)
    seconds = time.monotonic() - start
    return BenchResult(
        num_requests=len(prompts),
        prompt_tokens=sum(len(p) for p in prompts),
        output_tokens=sum(o.num_generated_tokens for o in finished),
        seconds=seconds,
        ttft=[o.metrics.time_to_first_token for o in finished],
        itl=[x for o in finished for x in o.inter_token_latencies],
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        speculation=speculator.stats.since(before) if speculator is not None and speculator.drafter is not None else None,
    )
