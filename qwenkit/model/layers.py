"""The building blocks shared by every Qwen architecture: RMSNorm, SwiGLU MLP, attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.kernels import cpu_kernels
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            kernels = cpu_kernels()
            if kernels is not None and not torch.is_grad_enabled():  # one pass instead of six dispatched ops
                return kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 whatever the model dtype, then scale in the model dtype (as the reference).
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def project(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Each of `linears` applied to x: in one call when they share a class that can run several
    on one input (`forward_group`, as GGUF block layers: x quantized once, one pass of the
    threads; a decode step's q, k and v are three small products, and the hook answers None
    where it does not apply), else one by one."""
    kind = type(linears[0])
    group = getattr(kind, "forward_group", None)
    if group is not None and not torch.is_grad_enabled() and all(type(linear) is kind for linear in linears):
        outputs = group(x, list(linears))
        if outputs is not None:
            return outputs
    return [linear(x) for linear in linears]


class MLP(nn.Module):
    """SwiGLU feed-forward; also each expert of a MoE block, and Qwen2.5-VL's vision MLP (with biases)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        kind = type(self.gate_proj)
        fused = getattr(kind, "forward_silu_mul", None)  # GGUF block layers: gate, up and the product in one call
        hidden = fused(x, self.gate_proj, self.up_proj) if fused is not None and type(self.up_proj) is kind else None
        if hidden is not None:
            return self.down_proj(hidden)
        # Inference: in place, so a long prompt holds two [tokens, intermediate] tensors, not four.
        hidden = F.silu(self.gate_proj(x), inplace=True)
        return self.down_proj(hidden.mul_(self.up_proj(x)))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.sliding_window if config.uses_sliding_window(layer) else None
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionBackend
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention.attend(self.layer, q, k, v, self.scale, self.window)
        return self.o_proj(out)
