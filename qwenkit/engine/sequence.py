"""A sequence being generated: its tokens, its KV blocks, and where it stands."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from qwenkit.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from qwenkit.engine.logits_process import LogitsProcessor
    from qwenkit.engine.media_inputs import MultimodalInputs
    from qwenkit.engine.sampler import TokenLogprobs
    from qwenkit.engine.speculative import SpeculationState


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingState:
    """What sampling keeps per sequence between steps."""

    generator: torch.Generator | None = None  # the request's seed + the sample's index
    processors: list[LogitsProcessor] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    lora_name: str | None = None  # the adapter this sequence runs with, None for the base model
    sampling: SamplingState = field(default_factory=SamplingState)
    speculation: SpeculationState | None = None  # None: decodes one token per step
    media: MultimodalInputs | None = None  # the prompt's images/videos/audio and M-RoPE positions
    # scheduling
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    # outcome
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token arrived

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def cache_salt(self) -> bytes | None:
        """Seeds the prefix-cache hash chain: K/V computed under an adapter differ from the base model's."""
        return None if self.lora_name is None else b"lora:" + self.lora_name.encode()

    def block_media_keys(self, start: int, end: int) -> bytes:
        """Content keys of the media among tokens [start, end): part of that KV block's cache hash,
        so blocks with equal placeholder tokens but different images never match."""
        return b"" if self.media is None else self.media.keys_in(start, end)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token: int, now: float) -> None:
        self.token_ids.append(token)
        self.token_times.append(now)
