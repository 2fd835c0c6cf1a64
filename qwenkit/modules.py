"""Helpers on torch modules shared by loading, quantization and LoRA (the lowest layer that needs them)."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
