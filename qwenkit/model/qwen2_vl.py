"""Qwen2-VL and Qwen2.5-VL: the Qwen2 decoder with M-RoPE, fed by the vision tower.

Each image or video is a run of placeholder tokens in the prompt (one per merged 2x2 patch block);
their embeddings are replaced by the vision tower's outputs, in order, and the decoder runs on the
result at M-RoPE positions ([3, T], see qwenkit.model.mrope). Everything else is the text model
(qwenkit.model.qwen), so K/V caching, batching and sampling work unchanged.
"""

from __future__ import annotations

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.media import MediaCausalLM
from qwenkit.model.rope import MultimodalRotaryEmbedding
from qwenkit.model.vision import Grid, VisionTransformer


class Qwen2VLForConditionalGeneration(MediaCausalLM):
    """HF architectures Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration.

    forward(input_ids, positions [3, T], attention, lora, media) with media = the rows of
    `encode_vision` outputs for this step's image/video placeholder tokens.
    """

    def __init__(self, config: ModelConfig):
        if config.vision is None:
            raise QwenkitError(f"{config.model_type} has no vision_config")
        super().__init__(config, (config.vision.image_token_id, config.vision.video_token_id))
        self.visual = VisionTransformer(config.vision)
        self.rotary = MultimodalRotaryEmbedding(config.rope, config.head_dim, config.mrope_section)

    def encode_vision(self, pixel_values: torch.Tensor, grids: list[Grid]) -> list[torch.Tensor]:
        """Per image/video, its language-model embeddings [tokens, hidden] (one per placeholder token)."""
        merged = self.visual(pixel_values, grids)
        unit = self.config.vision.spatial_merge_size**2
        return list(merged.split([t * h * w // unit for t, h, w in grids]))
