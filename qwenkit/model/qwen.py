"""The Qwen decoder: Qwen2/2.5 (QKV bias), Qwen3 (QK-norm), Qwen2-MoE and Qwen3-MoE.

Parameter names match the HF checkpoints, so a safetensors state dict loads without renaming.
Tokens of a forward pass are flat ([T], not [B, T]): the attention backend knows which belong
to which sequence, so the same model serves one chat or a continuously batched engine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwenkit.config import ModelConfig
from qwenkit.model.adapters import LoraRouting, routing_scope
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.layers import MLP, Attention, RMSNorm
from qwenkit.model.moe import SparseMoeBlock
from qwenkit.model.native_decode import native_decode_layers
from qwenkit.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, attention: AttentionBackend, lora: LoraRouting | None = None):
        with routing_scope(lora):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
            return x + self.mlp(self.post_attention_layernorm(x))


class QwenBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # Given a weight, Embedding skips its random init (on the meta device, normal_ alone costs a second).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class QwenForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = QwenBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        # Training only: recompute each layer's activations in backward instead of keeping them.
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend, lora: LoraRouting | None = None
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] for flat token ids [T] at `positions` [T]; `lora` says
        which rows run through which adapter (None: the base model only)."""
        return self.forward_embeddings(self.model.embed_tokens(input_ids), positions, attention, lora)

    def forward_embeddings(
        self, x: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend, lora: LoraRouting | None = None
    ) -> torch.Tensor:
        """The decoder on input embeddings [T, hidden] (multimodal models put encoder outputs among them).

        `positions` are the rotary positions: [T], or [3, T] for M-RoPE models.
        """
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if lora is None:
            stacked = native_decode_layers(self.model.layers, x, cos, sin, attention, self.config.rms_norm_eps)
            if stacked is not None:
                return self.model.norm(stacked)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            x = checkpoint(layer, x, cos, sin, attention, lora, use_reentrant=False) if recompute else layer(x, cos, sin, attention, lora)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        """fp32 logits; call on the rows that need them only (the last of each sequence when
        decoding), with a routing whose rows index `hidden`."""
        with routing_scope(lora):
            return self.lm_head(hidden).float()
