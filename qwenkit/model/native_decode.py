"""A dense decoder's layers for one decode step in one native call (kernels/decode_layers.cpp).

At one token per sequence the 0.5B model's layer does ~0.5 ms of arithmetic, and its Python
forward (module calls, views, residual adds) added ~0.2 ms on a 2.4 GHz core: a fifth of the
step. Where every layer would run exactly the kernels the native stack runs (GGUF block
projections through the kernel, no LoRA, no hooks, no MoE, every row decoding from a CPU paged
cache), the stack runs them in the same order, so the hidden states are the same bits; anywhere
else `native_decode_layers` answers None and the layers run one by one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from qwenkit.kernels import cpu_kernels
from qwenkit.model.adapters import active_routing
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.layers import MLP

_NONE = torch.empty(0)


def native_decode_layers(
    layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionBackend, eps: float,
) -> torch.Tensor | None:
    """The hidden states after `layers` (before the final norm) for the decode step x [T, hidden],
    or None where the layers must run one by one."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or cos.dtype != torch.float32 or not x.is_cpu:
        return None
    paged = getattr(attention, "paged_decode", None)
    step = paged() if paged is not None else None
    kernels = cpu_kernels()
    if step is None or kernels is None or active_routing() is not None or _global_hooks():
        return None
    tokens = x.shape[0]
    weights: list[torch.Tensor] = []
    kinds: list[int] = []
    packed: list[bool] = []
    windows: list[int] = []
    for layer in layers:
        if not _plain(layer, tokens, eps, weights, kinds, packed, windows):
            return None
    attn = layers[0].self_attn
    return kernels.decode_layers(
        x, cos, sin, weights, kinds, packed, step.k_cache, step.v_cache, windows, step.slot_mapping, step.slots,
        step.lengths, attn.num_heads, attn.num_kv_heads, eps, attn.scale,
    )


def _plain(layer: nn.Module, tokens: int, eps: float, weights: list, kinds: list, packed: list, windows: list) -> bool:
    """Appends the layer's tensors (kernels/decode_layers.cpp's order) and window if it is a dense decoder
    layer whose every part the native stack runs as its forward would. Submodules are read from
    `_modules` (nn.Module's __getattr__ costs ~1 us a lookup, and a step makes ~400)."""
    parts = layer._modules
    attn, mlp = parts.get("self_attn"), parts.get("mlp")
    if type(mlp) is not MLP or attn is None or _hooked(layer) or _hooked(attn) or _hooked(mlp):
        return False
    linears, mlp_parts = attn._modules, mlp._modules
    norms = [parts["input_layernorm"], parts["post_attention_layernorm"]]
    if linears.get("q_norm") is not None:
        norms += [linears["q_norm"], linears["k_norm"]]
    if any(_hooked(n) or n.eps != eps or n._parameters["weight"].dtype != torch.float32 for n in norms):
        return False
    blocks = []
    for linear in (linears["q_proj"], linears["k_proj"], linears["v_proj"], linears["o_proj"],
                   mlp_parts["gate_proj"], mlp_parts["up_proj"], mlp_parts["down_proj"]):
        native = getattr(type(linear), "native_decode_weight", None)
        weight = native(linear, tokens) if native is not None else None
        if weight is None:
            return False
        blocks.append(weight)
    (q, k, v, o, gate, up, down) = blocks
    if any(part[3].numel() for part in (o, gate, up, down)):  # the stack adds biases to q, k and v only
        return False
    weights += [norms[0]._parameters["weight"], q[0], k[0], v[0], o[0], norms[1]._parameters["weight"], gate[0], up[0], down[0],
                q[3], k[3], v[3]]
    weights += [norms[2]._parameters["weight"], norms[3]._parameters["weight"]] if len(norms) == 4 else [_NONE, _NONE]
    kinds += [part[1] for part in blocks]
    packed += [part[2] for part in blocks]
    windows.append(attn.window or 0)
    return True


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
