"""Prompt tokens for media: each placeholder the chat template writes becomes one token per embedding.

Qwen's chat templates write one pad token per item ("<|vision_start|><|image_pad|><|vision_end|>",
"<|vision_start|><|video_pad|><|vision_end|>", "<|audio_bos|><|AUDIO|><|audio_eos|>"); the model
needs as many pad tokens as the encoder gives embeddings for that item, as transformers' processors
expand them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qwenkit.errors import QwenkitError


def expand_placeholders(token_ids: Sequence[int], counts: Mapping[int, Sequence[int]]) -> list[int]:
    """`counts[pad_id]` lists, in prompt order, how many tokens each `pad_id` occurrence becomes."""
    pending = {pad: list(n) for pad, n in counts.items()}
    out: list[int] = []
    for token in token_ids:
        if token not in pending:
            out.append(token)
            continue
        if not pending[token]:
            raise QwenkitError(f"the prompt has more placeholders (token {token}) than media items for them")
        out.extend([token] * pending[token].pop(0))
    left = {pad: len(n) for pad, n in pending.items() if n}
    if left:
        raise QwenkitError(f"{sum(left.values())} media item(s) have no placeholder in the prompt (tokens {sorted(left)})")
    return out
