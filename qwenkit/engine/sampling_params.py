"""What a request asks of generation."""

from __future__ import annotations

from dataclasses import dataclass

from qwenkit.errors import QwenkitError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.8
    top_k: int = 20  # 0 or negative means no limit
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise QwenkitError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise QwenkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QwenkitError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
