"""Put adapters on a model, take their weights off it, merge them into it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.lora.layer import LoraLinear
from qwenkit.lora.peft_format import LoraConfig, read_adapter
from qwenkit.modules import replace_module


def _projections(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module (float, quantized or already wrapped), by name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            found[name] = module
        elif hasattr(module, "in_features") and hasattr(module, "out_features") and not name.endswith(".base"):
            found[name] = module
    return found


def _wrapped(model: nn.Module, name: str, module: nn.Module) -> LoraLinear:
    if isinstance(module, LoraLinear):
        return module
    wrapper = LoraLinear(module).train(module.training)
    replace_module(model, name, wrapper)
    return wrapper


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_new_adapter(model: nn.Module, name: str, config: LoraConfig, seed: int = 0) -> list[str]:
    """A freshly initialised (no-op) adapter on every targeted projection; returns their names."""
    generator = torch.Generator().manual_seed(seed)
    targets = [(n, m) for n, m in _projections(model).items() if config.targets(n, n == "lm_head")]
    if not targets:
        raise QwenkitError(f"no module of the model matches the LoRA targets {config.target_modules!r}")
    for module_name, module in targets:
        rank, scaling = config.rank_and_scaling(module_name)
        _wrapped(model, module_name, module).add_adapter(name, rank, scaling, config.lora_dropout, generator)
    return [n for n, _ in targets]


def load_adapter(model: nn.Module, name: str, directory: Path | str) -> LoraConfig:
    """Load a PEFT-format adapter from `directory` onto `model` under `name`."""
    adapter = read_adapter(Path(directory))
    projections = _projections(model)
    for module_name, (a, b) in adapter.weights.items():
        module = projections.get(module_name)
        if module is None:
            raise QwenkitError(f"the adapter targets {module_name}, which this model does not have")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise QwenkitError(
                f"the adapter's {module_name} is {b.shape[0]}x{a.shape[1]}, the model's is "
                f"{module.out_features}x{module.in_features}: it was trained for another base model"
            )
    for module_name, (a, b) in adapter.weights.items():
        rank, scaling = adapter.config.rank_and_scaling(module_name, rank=a.shape[0])
        layer = _wrapped(model, module_name, projections[module_name])
        layer.add_adapter(name, rank, scaling, adapter.config.lora_dropout)
        layer.lora_A[name].weight.data = a  # fp32 (LoRA runs in fp32 whatever the base dtype)
        layer.lora_B[name].weight.data = b
        layer.lora_A[name].requires_grad_(False)
        layer.lora_B[name].requires_grad_(False)
    return adapter.config


def adapter_weights(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.lora_A[name].weight, m.lora_B[name].weight) for n, m in lora_layers(model).items() if name in m.adapters}


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    params = []
    for a, b in adapter_weights(model, name).values():
        params += [a, b]
    return params


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold the adapter into its float base weights (W += scaling * B @ A) and unwrap the layers."""
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    for module_name, layer in lora_layers(model).items():
        if name not in layer.adapters:
            continue
        if not isinstance(layer.base, nn.Linear):
            raise QwenkitError(f"cannot merge into {module_name}: its base is quantized; load the base in float")
        if module_name == "lm_head" and tied:
            raise QwenkitError("cannot merge an adapter on lm_head into a model whose lm_head is tied to the embedding")
        with torch.no_grad():
            layer.base.weight += layer.delta_weight(name).to(layer.base.weight.dtype)
        layer.remove_adapter(name)
        if not layer.adapters:
            replace_module(model, module_name, layer.base)
