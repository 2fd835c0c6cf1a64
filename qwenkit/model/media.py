"""Decoders whose placeholder tokens take their embeddings from a media encoder (image, video, audio)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.adapters import LoraRouting
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.qwen import QwenForCausalLM


def place_media(x: torch.Tensor, is_placeholder: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """Embeddings x [T, hidden] with the placeholder rows replaced by `media` rows, in order."""
    count = int(is_placeholder.sum())
    if count != media.shape[0]:
        raise QwenkitError(f"{count} media placeholder tokens but {media.shape[0]} encoder outputs for them")
    x = x.clone()
    x[is_placeholder] = media.to(x.dtype)
    return x


class MediaCausalLM(QwenForCausalLM):
    """The text model plus `forward(..., media)`: encoder outputs for the placeholder tokens of this step.

    The encoders run apart from the decoder (once per media item, cacheable by content); a prefill
    step then passes the rows of their outputs that its placeholder tokens need, in order.
    """

    def __init__(self, config: ModelConfig, placeholder_token_ids: Sequence[int]):
        super().__init__(config)
        # Explicit CPU device: models are built under torch.device("meta"); this is no parameter.
        self.placeholder_ids = torch.tensor(list(placeholder_token_ids), device="cpu")

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBackend,
        lora: LoraRouting | None = None,
        media: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`media_mask` [T] (bool) says which rows take `media`; by default every placeholder token
        does. The engine passes it: a placeholder token the model generated is text, not media."""
        x = self.model.embed_tokens(input_ids)
        if media is not None:
            if media_mask is None:
                media_mask = torch.isin(input_ids, self.placeholder_ids.to(input_ids.device))
            x = place_media(x, media_mask, media)
        return self.forward_embeddings(x, positions, attention, lora)


# Checkpoint name prefixes -> qwenkit's. Released checkpoints (and transformers' save_pretrained)
# use the first layout of each; transformers 4.5x-era saves nest everything under "model.".
_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def checkpoint_name(name: str) -> str:
    """A multimodal checkpoint's tensor name as qwenkit's parameter name."""
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name
