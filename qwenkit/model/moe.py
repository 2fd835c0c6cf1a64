"""Sparse mixture-of-experts block: Qwen2-MoE (with a gated shared expert) and Qwen3-MoE.

The routed tokens are grouped by expert (one argsort of the flattened top-k choices) and each
active expert runs once on its rows, so a step costs one call per active expert, never one per
token. Whatever holds the experts answers `grouped(x, counts)`: `ExpertMLPs` here (float, LoRA),
or a quantized replacement swapped in by name (GGUF blocks in place: quantization/gguf_experts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.model.layers import MLP


class ExpertMLPs(nn.ModuleList):
    """One Linear-based MLP per expert (state dict `experts.{e}.gate_proj.weight`, ...), so
    quantization and LoRA swap Linear modules here as everywhere else."""

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert's MLP of its rows: x [N, hidden] holds counts[0] rows for expert 0, then
        counts[1] for expert 1, ..."""
        out = torch.empty_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n:
                out[start : start + n] = self[expert](x[start : start + n])
                start += n
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = ExpertMLPs(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)

        choices = experts.reshape(-1)  # token t's k-th choice at t * top_k + k
        order = choices.argsort(stable=True)
        rows = order // self.top_k
        counts = torch.bincount(choices, minlength=self.num_experts).tolist()
        y = self.experts.grouped(x[rows], counts)
        out = torch.zeros_like(x).index_add_(0, rows, y.mul_(weights.reshape(-1)[order, None]))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
