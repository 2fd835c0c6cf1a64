"""Prometheus metrics: request counters and latency histograms, engine gauges from its published stats."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qwenkit.engine.llm import EngineStats
from qwenkit.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]):
        """`stats`: the snapshot the engine thread published after its last step (never the live scheduler)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwenkit_requests", "Finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("qwenkit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwenkit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qwenkit_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("qwenkit_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qwenkit_e2e_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("qwenkit_num_requests_running", "Sequences running", registry=r).set_function(lambda: stats().running)
        Gauge("qwenkit_num_requests_waiting", "Sequences waiting", registry=r).set_function(lambda: stats().waiting)
        Gauge("qwenkit_kv_cache_usage_perc", "Fraction of KV blocks in use", registry=r).set_function(lambda: stats().kv_cache_usage)
        Gauge("qwenkit_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache", registry=r).set_function(
            lambda: stats().prefix_cache_hit_rate)
        # Speculative decoding, as vLLM's spec_decode metrics (all zero when the engine does not speculate).
        def speculation(attribute: str) -> Callable[[], float]:
            return lambda: getattr(stats().speculation, attribute, 0.0)

        for name, attribute, what in (
            ("num_drafts", "num_verifications", "Sequence-steps that verified drafted tokens (total)"),
            ("num_draft_tokens", "num_draft_tokens", "Drafted tokens verified (total)"),
            ("num_accepted_tokens", "num_accepted_tokens", "Drafted tokens accepted (total)"),
            ("draft_acceptance_rate", "acceptance_rate", "Accepted / drafted tokens"),
            ("mean_accepted_length", "mean_accepted_length", "Tokens emitted per verification (accepted drafts + 1)"),
        ):
            Gauge(f"qwenkit_spec_decode_{name}", what, registry=r).set_function(speculation(attribute))

    def record(self, out: RequestOutput, end_time: float) -> None:
        for completion in out.outputs:
            self.requests.labels(completion.finish_reason or "abort").inc()
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.generation_tokens.inc(out.num_generated_tokens)
        m = out.metrics
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for latency in out.inter_token_latencies:
            self.tpot.observe(latency)
        self.e2e.observe(end_time - m.arrival_time)
