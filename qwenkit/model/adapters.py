"""Which rows of a forward pass run through which LoRA adapter.

The routing is an argument of the model's forward, like the attention backend. Projections are
called as `proj(x)`, so each decoder layer (and the output head) opens a scope for its own
calls, and adapter layers read the routing from that scope only while the call runs: nothing
stays set on the model between forwards, and a gradient-checkpointed layer, recomputed during
backward with the same arguments, routes its rows the same way again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch

ALL_ROWS = slice(None)


@dataclass(frozen=True)
class LoraRouting:
    """(adapter name, rows) pairs; rows are ALL_ROWS or an index tensor into the forward's tokens."""

    groups: tuple[tuple[str, slice | torch.Tensor], ...] = ()

    @classmethod
    def all(cls, adapter: str) -> "LoraRouting":
        return cls(((adapter, ALL_ROWS),))


_ACTIVE: ContextVar[LoraRouting | None] = ContextVar("qwenkit_lora_routing", default=None)


def active_routing() -> LoraRouting | None:
    return _ACTIVE.get()


_UNCHANGED = nullcontext()


def routing_scope(routing: LoraRouting | None) -> AbstractContextManager[None]:
    """A scope in which `routing` is the active one. Without adapters (None inside None) nothing
    changes, and the scope costs nothing: a decode step opens one per layer."""
    if routing is None and _ACTIVE.get() is None:
        return _UNCHANGED
    return _scope(routing)


@contextmanager
def _scope(routing: LoraRouting | None) -> Iterator[None]:
    token = _ACTIVE.set(routing)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
