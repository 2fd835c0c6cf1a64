"""Single-sequence generation with a contiguous KV cache, token by token."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwenkit.engine.sampler import sample_token
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.model.attention import ContiguousKVCache
from qwenkit.tokenizer.detokenizer import IncrementalDetokenizer
from qwenkit.weights.loader import LoadedModel


@dataclass(frozen=True)
class GenerationStep:
    token_id: int
    text: str  # the text this token completes (may be empty while a character is incomplete)
    finish_reason: str | None = None  # "stop" | "length" on the last step


class Generator:
    """Keeps one KV cache; a new prompt that extends the previous one (a chat turn) reuses it."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.cache: ContiguousKVCache | None = None
        self.cached_ids: list[int] = []

    def _prepare_cache(self, prompt_ids: list[int], capacity: int) -> int:
        """Make room for `capacity` tokens; return how many prompt tokens are already cached."""
        if self.cache is None or self.cache.max_len < capacity:
            cfg = self.config
            self.cache = ContiguousKVCache(
                cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, cfg.head_dim, self.model.dtype
            )
            self.cached_ids = []
        reused = 0
        for a, b in zip(self.cached_ids, prompt_ids[:-1]):  # the last prompt token always runs, for its logits
            if a != b:
                break
            reused += 1
        self.cache.truncate(reused)
        self.cached_ids = self.cached_ids[:reused]
        return reused

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationStep]:
        if not prompt_ids:
            raise QwenkitError("the prompt is empty")
        context = self.config.max_position_embeddings
        if len(prompt_ids) >= context:
            raise QwenkitError(f"the prompt has {len(prompt_ids)} tokens; the model's context holds {context}")
        max_new = min(params.max_tokens, context - len(prompt_ids))
        reused = self._prepare_cache(prompt_ids, _round_up(len(prompt_ids) + max_new, 256))
        cache = self.cache
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        detok = IncrementalDetokenizer(self.tokenizer)

        pending = prompt_ids[reused:]
        for step in range(max_new):
            positions = torch.arange(cache.length, cache.length + len(pending))
            hidden = self.model(torch.tensor(pending), positions, cache)
            cache.advance(len(pending))
            self.cached_ids.extend(pending)
            token = sample_token(self.model.compute_logits(hidden[-1]), params, generator)
            finish = None
            if token in self.tokenizer.stop_token_ids and not params.ignore_eos:
                finish = "stop"
            elif step == max_new - 1:
                finish = "length"
            text = detok.add(token) if finish != "stop" else ""
            if finish is not None:
                text += detok.flush()
            yield GenerationStep(token, text, finish)
            if finish is not None:
                return
            pending = [token]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
