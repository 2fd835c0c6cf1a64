"""What the engine hands back for a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenkit.engine.sampler import TokenLogprobs
from qwenkit.tokenizer.reasoning import split_reasoning


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far (stop strings excluded)
    token_ids: list[int]
    delta_text: str = ""  # what this step added (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None
    thinking_open: bool = False  # the prompt ended inside <think> (the template opened it)
    reasoning: bool = True  # the model writes <think> blocks (its vocabulary has the token): parse them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def reasoning_content(self) -> str | None:
        return split_reasoning(self.text, self.thinking_open, self.reasoning)[0]

    @property
    def content(self) -> str:
        return split_reasoning(self.text, self.thinking_open, self.reasoning)[1]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    token_times: list[list[float]] = field(default_factory=list)  # per sample, when each token arrived
    error: str | None = None  # set (with finish_reason "error") when generation failed for this request

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for times in self.token_times for a, b in zip(times, times[1:])]
