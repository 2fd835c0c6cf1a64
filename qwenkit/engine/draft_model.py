"""Draft-model speculation: a smaller checkpoint sharing the target's tokenizer guesses greedily.

The draft model keeps its own paged KV cache, with a mirror `Sequence` per target sequence. Each
step the mirror catches up with the tokens the target accepted since (one chunk, batched over
sequences), then guesses k tokens one batched decode at a time. Its guesses are its argmax: a
point mass, so the target's verification keeps the output exact (see engine/speculative.py).
A draft pool that runs out only means no guesses for that sequence; nothing waits on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.paged_attention import PagedKVCache
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.engine.sequence import Sequence
from qwenkit.engine.speculative import Drafter
from qwenkit.errors import QwenkitError
from qwenkit.weights.loader import LoadedModel

@dataclass
class DraftMirror:
    """A target sequence as the draft model's cache holds it."""

    seq: Sequence  # in the draft model's block manager
    synced: int = 0  # its first `synced` tokens are the target's; any after them were guesses


TOKENIZER_PROBE = "def main():\n    print('Hello, 世界!')  # Qwen drafts for Qwen\n"


class DraftModelDrafter(Drafter):
    def __init__(self, draft: LoadedModel, target: LoadedModel, kv_cache_memory: int, block_size: int, kv_dtype: torch.dtype):
        if draft.tokenizer.encode(TOKENIZER_PROBE) != target.tokenizer.encode(TOKENIZER_PROBE):
            raise QwenkitError("the draft model's tokenizer differs from the target model's; speculation needs the same one")
        cfg = draft.config
        per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv_dtype)
        num_blocks = max(2, kv_cache_memory // (per_token * block_size))
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, kv_dtype)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(draft.model, self.cache)
        self.vocab_size = target.config.vocab_size  # a draft's padded vocabulary may be larger

    def propose(self, seqs, num_tokens):
        drafts: list[list[int]] = [[] for _ in seqs]
        active: list[tuple[int, Sequence]] = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            mirror = self._mirror(seq)
            if self.block_manager.room_after(mirror) < k:  # the draft pool is full: no guess this time
                continue
            self.block_manager.ensure_capacity(mirror, len(mirror) + k)
            active.append((i, mirror))
        for _ in range(max(num_tokens, default=0)):
            active = [(i, m) for i, m in active if len(drafts[i]) < num_tokens[i]]
            if not active:
                break
            batch = [self._schedule(m) for _, m in active]
            logits = self.runner.run(batch)
            last = torch.tensor([len(item.draft_token_ids) for item in batch]).add(1).cumsum(0) - 1
            guesses = logits[last, : self.vocab_size].argmax(-1).tolist()
            for (i, mirror), item, token in zip(active, batch, guesses):
                mirror.token_ids.extend(item.draft_token_ids)  # the catch-up's tokens, back in place
                mirror.num_computed_tokens = len(mirror)
                mirror.token_ids.append(token)
                drafts[i].append(token)
        return drafts

    @staticmethod
    def _schedule(mirror: Sequence) -> ScheduledSequence:
        """The mirror's uncomputed tokens: a fresh one's prompt as a prefill chunk; after that, the
        tokens it lags behind as decode rows, as the target computed them, so that a model drafting
        for itself computes the very same numbers (and the runner's verification path does it).
        Those tokens leave token_ids for the forward, and the caller puts them back."""
        start = mirror.num_computed_tokens
        if start == 0:
            return ScheduledSequence(mirror, len(mirror))
        rest = mirror.token_ids[start + 1 :]
        del mirror.token_ids[start + 1 :]
        return ScheduledSequence(mirror, 1, rest)

    def _mirror(self, seq: Sequence) -> Sequence:
        """The sequence's mirror, its tokens now the target's, its cache kept up to the first
        difference (a guess the target rejected)."""
        state = seq.speculation
        if not isinstance(state.drafter_state, DraftMirror):
            state.drafter_state = DraftMirror(Sequence(seq.seq_id, seq.request_id, 0, [], 0, seq.params))
        mirror = state.drafter_state
        m = mirror.seq
        same = min(mirror.synced, m.num_computed_tokens)  # the target only appends: its old tokens stand
        limit = min(m.num_computed_tokens, len(seq) - 1)  # the last token runs again: its logits guess
        while same < limit and m.token_ids[same] == seq.token_ids[same]:
            same += 1
        m.token_ids = list(seq.token_ids)
        m.num_computed_tokens = same
        mirror.synced = len(seq)
        return m

    def release(self, seq: Sequence) -> None:
        mirror = seq.speculation.drafter_state
        if isinstance(mirror, DraftMirror):
            self.block_manager.free_sequence(mirror.seq)
            seq.speculation.drafter_state = None
