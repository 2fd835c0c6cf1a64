"""What a request asks of generation (the OpenAI / vLLM sampling vocabulary)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qwenkit.errors import QwenkitError


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, on prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI-style, on generated tokens
    frequency_penalty: float = 0.0  # OpenAI-style, on generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    skip_special_tokens: bool = True
    thinking_budget: int | None = None  # end the <think> section after this many tokens
    speculative: bool = True  # False: decode this request without speculation even when the engine has it on
    # Factories of the request's own logits processors (see engine/logits_process.py), each called
    # with a ProcessorContext per sample; the built-in ones (thinking budget, ...) come on top.
    logits_processors: tuple[Callable[..., Any], ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.thinking_budget is None or self.thinking_budget >= 0, "thinking_budget must be >= 0"),
            # Sample i of a request draws from a generator seeded with seed + i: all must fit torch's 64 bits.
            (self.seed is None or SEED_MIN <= self.seed and self.seed + self.n - 1 <= SEED_MAX,
             f"seed must be in [{SEED_MIN}, {SEED_MAX} - (n - 1)], got {self.seed}"),
            (all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (all(t >= 0 for t in (*self.logit_bias, *self.stop_token_ids)),
             "token ids in logit_bias and stop_token_ids must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise QwenkitError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def with_changes(self, **changes: Any) -> "SamplingParams":
        return replace(self, **changes)

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """Defaults from a checkpoint's generation_config.json, then the caller's explicit values."""
        names = {f.name for f in fields(cls)}
        defaults: dict[str, Any] = {}
        if generation_config.get("do_sample") is False:
            defaults["temperature"] = 0.0
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if generation_config.get(key) is not None and not (key == "temperature" and "temperature" in defaults):
                defaults[key] = generation_config[key]
        defaults.update({k: v for k, v in overrides.items() if v is not None and k in names})
        return cls(**defaults)
