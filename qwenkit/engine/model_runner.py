"""Run the model once over a scheduled batch and return logits for the rows that sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenkit.engine.media_inputs import EncoderCache
from qwenkit.engine.paged_attention import BatchAttention, PagedKVCache, PrefillSlice, slots_for
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.model.adapters import LoraRouting


@dataclass
class StepInputs:
    """Everything one forward needs besides the model and its cache: what rank 0 sends the other
    processes of a tensor-parallel group each step (plain tensors, so it pickles)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T], or [3, T] with M-RoPE
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor
    decode_slots: torch.Tensor
    decode_lengths: torch.Tensor
    prefills: list[PrefillSlice]
    sample_rows: list[int]
    adapter_rows: dict[str, list[int]]  # rows of the forward's tokens, per LoRA adapter
    adapter_samples: dict[str, list[int]]  # rows of the sampled tokens (for the output head)
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # forward's media / media_mask, if any


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, encoder_cache: EncoderCache | None = None):
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.encoder_cache = encoder_cache or EncoderCache()
        # M-RoPE models take [3, T] positions for every row, text-only sequences included.
        self.mrope = bool(getattr(model.config, "mrope_section", ()))

    def run(self, batch: list[ScheduledSequence]) -> torch.Tensor:
        """fp32 logits, in batch order: a row for each entry with completes_prompt, then one for each
        of its drafted tokens."""
        return self.execute(self.prepare(batch))

    def copy_block(self, src: int, dst: int) -> None:
        """A forked sample's copy of its parent's partial last KV block."""
        self.cache.copy_block(src, dst)

    @torch.inference_mode()
    def prepare(self, batch: list[ScheduledSequence]) -> StepInputs:
        """The forward's inputs for `batch`; the encoder outputs its media placeholders need are
        computed here."""
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
        extra = {}
        if media:
            mask = torch.zeros(len(input_ids), dtype=torch.bool)
            mask[torch.tensor(media_rows)] = True
            extra = {"media": torch.cat(media), "media_mask": mask}
        return StepInputs(
            torch.tensor(input_ids), torch.cat(rope_positions, dim=-1), torch.cat(slot_mapping),
            torch.tensor(decode_rows, dtype=torch.long), padded, torch.tensor(decode_lengths, dtype=torch.long),
            prefills, sample_rows, adapter_rows, adapter_samples, extra,
        )

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        """The forward over `step`'s tokens, then fp32 logits of its sample rows."""
        attention = BatchAttention(
            self.cache, step.slot_mapping, step.decode_rows, step.decode_slots, step.decode_lengths, step.prefills
        )
        hidden = self.model(step.input_ids, step.positions, attention, _routing(step.adapter_rows), **step.media)
        if not step.sample_rows:
            return hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.tensor(step.sample_rows)], _routing(step.adapter_samples))


def _routing(rows_by_adapter: dict[str, list[int]]) -> LoraRouting | None:
    """Each adapter's rows; base-model rows take no LoRA path."""
    if not rows_by_adapter:
        return None
    return LoraRouting(tuple((name, torch.tensor(rows)) for name, rows in rows_by_adapter.items()))
