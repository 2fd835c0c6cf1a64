"""Qwen2-Audio: a Whisper-style audio encoder whose outputs replace the <|AUDIO|> placeholder tokens.

The encoder reads 128-bin log-mel features of 30 s (3000 frames, see qwenkit.multimodal.audio):
two convolutions (the second halves the frames), a table of position embeddings, pre-norm
transformer layers, average pooling by 2 and a final LayerNorm; a linear projector maps each
pooled frame to one language-model token. Parameter names match the HF checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import AudioConfig, ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.media import MediaCausalLM


def audio_token_count(num_frames: int) -> int:
    """Placeholder tokens for `num_frames` valid mel frames: conv stride 2, then pooling by 2."""
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class AudioAttention(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        dim = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        # Whisper scales q before the product (not the scores), which the reference keeps for exactness.
        q = (self.q_proj(x) * self.head_dim**-0.5).view(t, self.num_heads, -1).transpose(0, 1)
        k = self.k_proj(x).view(t, self.num_heads, -1).transpose(0, 1)
        v = self.v_proj(x).view(t, self.num_heads, -1).transpose(0, 1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.out_proj(out.transpose(0, 1).reshape(t, -1))


class AudioEncoderLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.self_attn = AudioAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = nn.Linear(config.d_model, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, config.d_model)
        self.final_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        if config.activation_function != "gelu":
            raise QwenkitError(f"unsupported audio encoder activation {config.activation_function!r}; expected 'gelu'")
        self.config = config
        self.conv1 = nn.Conv1d(config.num_mel_bins, config.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.d_model, config.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, config.d_model)
        self.layers = nn.ModuleList(AudioEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, features: torch.Tensor, num_frames: int) -> torch.Tensor:
        """features [mel bins, 3000] of which the first `num_frames` are audio -> [tokens, d_model].

        The reference encodes all 3000 frames and masks the padding out of attention; the valid
        outputs depend only on the valid frames plus one frame of padding (the convolutions' reach),
        so only those are encoded: a 5 s clip costs a sixth of a 30 s one.
        """
        total = 2 * self.config.max_source_positions
        if features.shape != (self.config.num_mel_bins, total):
            raise QwenkitError(f"audio features must be [{self.config.num_mel_bins}, {total}], got {list(features.shape)}")
        if not 0 < num_frames <= total:
            raise QwenkitError(f"audio must have between 1 and {total} mel frames, got {num_frames}")
        after_conv = (num_frames - 1) // 2 + 1
        x = features[:, : min(2 * after_conv + 1, total)].to(self.conv1.weight.dtype)[None]
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))[0, :, :after_conv].T
        x = x + self.embed_positions.weight[:after_conv]
        for layer in self.layers:
            x = layer(x)
        tokens = audio_token_count(num_frames)
        x = x[: 2 * tokens].view(tokens, 2, -1).mean(dim=1)  # AvgPool1d(2, stride=2)
        return self.layer_norm(x)


class AudioProjector(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.linear = nn.Linear(config.audio.d_model, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Qwen2AudioForConditionalGeneration(MediaCausalLM):
    """HF architecture Qwen2AudioForConditionalGeneration (plain 1-D rotary positions)."""

    def __init__(self, config: ModelConfig):
        if config.audio is None:
            raise QwenkitError(f"{config.model_type} has no audio_config")
        super().__init__(config, (config.audio.audio_token_id,))
        self.audio_tower = AudioEncoder(config.audio)
        self.multi_modal_projector = AudioProjector(config)

    def encode_audio(self, features: torch.Tensor, num_frames: int) -> torch.Tensor:
        """One clip's language-model embeddings [audio_token_count(num_frames), hidden]."""
        return self.multi_modal_projector(self.audio_tower(features, num_frames))
