"""Run the model once over a scheduled batch and return logits for the rows that sample."""

from __future__ import annotations

import torch

from qwenkit.engine.media_inputs import EncoderCache
from qwenkit.engine.paged_attention import BatchAttention, PagedKVCache, PrefillSlice, slots_for
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.model.adapters import LoraRouting


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, encoder_cache: EncoderCache | None = None):
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.encoder_cache = encoder_cache or EncoderCache()
        # M-RoPE models take [3, T] positions for every row, text-only sequences included.
        self.mrope = bool(getattr(model.config, "mrope_section", ()))

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        """fp32 logits, in batch order: a row for each entry with completes_prompt, then one for each
        of its drafted tokens."""
        input_ids: list[int] = []
        slot_mapping: list[torch.Tensor] = []
        decode_rows, decode_slots, decode_lengths = [], [], []
        prefills: list[PrefillSlice] = []
        rope_positions: list[torch.Tensor] = []
        media: list[torch.Tensor] = []  # encoder output rows for this step's media placeholders, in row order
        media_rows: list[int] = []
        sample_rows: list[int] = []
        adapter_rows: dict[str, list[int]] = {}  # rows of the forward's tokens
        adapter_samples: dict[str, list[int]] = {}  # rows of the sampled tokens (for the output head)
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            tokens = seq.token_ids[start : start + item.num_tokens] + item.draft_token_ids
            end = start + len(tokens)
            row = len(input_ids)
            input_ids.extend(tokens)
            if seq.lora_name is not None:
                adapter_rows.setdefault(seq.lora_name, []).extend(range(row, row + len(tokens)))
            pos = torch.arange(start, end)
            if seq.media is not None:
                rope_positions.append(seq.media.positions(start, end))
                for placed, lo, hi in seq.media.overlapping(start, end):
                    media.append(self.encoder_cache.get(self.model, placed.item)[lo:hi])
                    first = row + placed.start + lo - start
                    media_rows.extend(range(first, first + hi - lo))
            else:
                rope_positions.append(pos.expand(3, -1) if self.mrope else pos)
            context = slots_for(seq.block_table, 0, end, self.block_size)
            slot_mapping.append(context[start:end])  # where this step's new K/V go
            if item.num_tokens == 1:
                # A decode, and each drafted token after it as a decode row of its own: verification
                # computes every position exactly as decoding it alone would (same kernel, same sums),
                # which keeps greedy speculation token-identical to plain decoding.
                for j in range(len(tokens)):
                    decode_rows.append(row + j)
                    decode_slots.append(context[: start + j + 1])
                    decode_lengths.append(start + j + 1)
            else:
                prefills.append(PrefillSlice(slice(row, row + len(tokens)), pos, context))
            if item.completes_prompt:  # the last token's logits, and each draft's
                rows = range(row + item.num_tokens - 1, row + len(tokens))
                if seq.lora_name is not None:
                    adapter_samples.setdefault(seq.lora_name, []).extend(range(len(sample_rows), len(sample_rows) + len(rows)))
                sample_rows.extend(rows)
        padded = torch.zeros(len(decode_slots), max(decode_lengths, default=0), dtype=torch.long)
        for i, slots in enumerate(decode_slots):
            padded[i, : len(slots)] = slots
        attention = BatchAttention(
            self.cache,
            torch.cat(slot_mapping),
            torch.tensor(decode_rows, dtype=torch.long),
            padded,
            torch.tensor(decode_lengths, dtype=torch.long),
            prefills,
        )
        ids = torch.tensor(input_ids)
        extra = {}
        if media:
            mask = torch.zeros(len(input_ids), dtype=torch.bool)
            mask[torch.tensor(media_rows)] = True
            extra = {"media": torch.cat(media), "media_mask": mask}
        hidden = self.model(ids, torch.cat(rope_positions, dim=-1), attention, _routing(adapter_rows), **extra)
        if not sample_rows:
            return hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.tensor(sample_rows)], _routing(adapter_samples))


def _routing(rows_by_adapter: dict[str, list[int]]) -> LoraRouting | None:
    """Each adapter's rows; base-model rows take no LoRA path."""
    if not rows_by_adapter:
        return None
    return LoraRouting(tuple((name, torch.tensor(rows)) for name, rows in rows_by_adapter.items()))
