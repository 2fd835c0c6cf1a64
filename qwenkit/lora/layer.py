"""LoraLinear: a frozen base projection plus low-rank updates, several adapters side by side.

PEFT's naming is kept in memory too (`lora_A.<adapter>`, `lora_B.<adapter>`), so an adapter's
tensors map to its file one to one. Which rows of a forward pass use which adapter is decided
outside the model and passed to its forward (see qwenkit/model/adapters.py): the training loop
routes all rows to one adapter, the engine each sequence's rows to the adapter its request named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit.model.adapters import ALL_ROWS, active_routing


@dataclass(frozen=True)
class AdapterWeights:
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with rsLoRA)
    dropout: float


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, AdapterWeights] = {}

    def add_adapter(self, name: str, rank: int, scaling: float, dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        """A new adapter initialised as PEFT does: A Kaiming-uniform, B zero (so it starts as a no-op)."""
        a = nn.Linear(self.in_features, rank, bias=False)
        b = nn.Linear(rank, self.out_features, bias=False)
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
            a.weight.uniform_(-bound, bound, generator=generator)
            b.weight.zero_()
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)  # an adapter added to a model in eval mode must not drop out
        self.adapters[name] = AdapterWeights(rank, scaling, dropout)

    def remove_adapter(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.adapters[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The adapter's update to the base weight, [out, in]: scaling * B @ A."""
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.adapters[name].scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routing = active_routing()
        for name, rows in routing.groups if routing is not None else ():
            if name not in self.adapters:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = x if rows is ALL_ROWS else x[rows]
            delta = b(a(self.lora_dropout[name](h.to(a.weight.dtype)))) * self.adapters[name].scaling
            if rows is ALL_ROWS:
                y = y + delta.to(y.dtype)
            else:
                y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={w.rank} scaling={w.scaling:g}" for n, w in self.adapters.items())
