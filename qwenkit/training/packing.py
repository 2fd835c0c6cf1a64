"""Pack examples into rows of at most `max_length` tokens without letting them see each other.

Each example keeps its own positions (restarting at 0) and the attention backend attends within
each example only, so a packed row computes exactly what the examples would compute alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwenkit.training.data import IGNORE_INDEX, Example


@dataclass
class PackedRow:
    token_ids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # the next token to predict, IGNORE_INDEX if not trained
    positions: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # the examples in this row, in order

    def add(self, example: Example) -> None:
        n = len(example.token_ids)
        self.token_ids += example.token_ids
        self.targets += example.labels[1:] + [IGNORE_INDEX]  # nothing past an example's end is predicted
        self.positions += range(n)
        self.lengths.append(n)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class Batch:
    """Rows concatenated into one flat forward pass (the model takes [T] tokens)."""

    token_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    lengths: list[int]

    @classmethod
    def of(cls, rows: list[PackedRow]) -> "Batch":
        return cls(
            torch.tensor([t for r in rows for t in r.token_ids]),
            torch.tensor([t for r in rows for t in r.targets]),
            torch.tensor([p for r in rows for p in r.positions]),
            [n for r in rows for n in r.lengths],
        )


def pack(examples: list[Example], max_length: int, packing: bool = True) -> list[PackedRow]:
    """First-fit packing in the given order; with packing off, one example per row."""
    rows: list[PackedRow] = []
    for example in examples:
        n = len(example.token_ids)
        target = None
        if packing:
            target = next((r for r in rows if len(r.token_ids) + n <= max_length), None)
        if target is None:
            target = PackedRow()
            rows.append(target)
        target.add(example)
    return rows
