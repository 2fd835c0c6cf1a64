"""A decoder's layers (dense or MoE) for one decode step in one native call (kernels/decode_layers.cpp).

At one token per sequence the 0.5B model's layer does ~0.5 ms of arithmetic, and its Python
forward (module calls, views, residual adds) added ~0.2 ms on a 2.4 GHz core: a fifth of the
step. Where every layer would run exactly what the native stack runs (the stock Attention, MLP
or SparseMoeBlock and RMSNorm modules, GGUF block projections and experts through the kernels,
float routers, no LoRA, no hooks, every row decoding from a CPU paged cache), the stack runs the
same kernels and ops in the same order, so the hidden states are the same bits; anywhere else
`native_decode_layers` answers None and the layers run one by one. A tensor-parallel shard's
layers qualify too when its group sums through shared memory: the stack makes each half-layer's
sum where the Python forward's hook would, so the same bits again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from qwenkit.distributed import ProcessGroup
from qwenkit.kernels import cpu_kernels
from qwenkit.kernels.shared_memory import SharedMemoryGroup, collectives
from qwenkit.model.adapters import active_routing
from qwenkit.model.attention import AttentionBackend
from qwenkit.model.layers import MLP, Attention, RMSNorm
from qwenkit.model.moe import SparseMoeBlock

_NONE = torch.empty(0)
_NO_BLOCKS = (_NONE, 0, False, _NONE)  # (blocks, kind, packed, bias) of a weight a layer lacks


@dataclass
class _StackInputs:
    """decode_layers' per-layer lists (kernels/decode_layers.cpp: the Weight and Block orders)."""

    tokens: int
    eps: float
    heads: tuple | None = None  # (num_heads, num_kv_heads, scale), which every layer must share
    weights: list[torch.Tensor] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    packed: list[bool] = field(default_factory=list)
    moe: list[int] = field(default_factory=list)  # (top_k, norm_topk_prob) per layer; top_k 0: dense
    windows: list[int] = field(default_factory=list)
    group: ProcessGroup | None = None  # the tensor-parallel group whose sums every half-layer makes (None: none)


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
    inputs = _StackInputs(x.shape[0], eps)
    for layer in layers:
        if not _add_layer(layer, inputs):
            return None
    if inputs.heads is None:
        return None
    shared = (_NONE, 0, 1, 0, 0)
    if inputs.group is not None:  # a shard's layers: their sums through shared memory, in the stack
        ops = collectives(inputs.group)
        if not isinstance(ops, SharedMemoryGroup) or x.nbytes > ops.slot_bytes:
            return None
        shared = (ops.shared, inputs.group.rank, inputs.group.world_size, ops.slot_bytes, ops.reserve_calls(2 * len(inputs.windows)))
    heads, kv_heads, scale = inputs.heads
    return kernels.decode_layers(
        x, cos, sin, inputs.weights, inputs.kinds, inputs.packed, inputs.moe, step.k_cache, step.v_cache, inputs.windows,
        step.slot_mapping, step.slots, step.lengths, heads, kv_heads, eps, scale, *shared,
    )


def _add_layer(layer: nn.Module, inputs: _StackInputs) -> bool:
    """Appends the layer's tensors if it is a decoder layer whose every part the native stack runs
    as its forward would; False (and the lists are to be dropped) if not. Submodules are read from
    `_modules` (nn.Module's __getattr__ costs ~1 us a lookup, and a step makes ~400)."""
    parts = layer._modules
    attn, mlp = parts.get("self_attn"), parts.get("mlp")
    if type(attn) is not Attention or mlp is None or _hooked(layer) or "forward" in vars(layer):
        return False
    group = _summed_over(attn)  # tensor parallel: both halves' outputs summed across one group, by a hook the stack replaces
    if group is False or _summed_over(mlp) != group or (inputs.windows and group != inputs.group):
        return False
    inputs.group = group
    # the stack reads layer l's cache at l, and one head layout for all layers
    heads = (attn.num_heads, attn.num_kv_heads, attn.scale)
    if attn.layer != len(inputs.windows) or inputs.heads not in (None, heads):
        return False
    inputs.heads = heads
    linears = attn._modules
    norms = [parts.get("input_layernorm"), parts.get("post_attention_layernorm")]
    if linears.get("q_norm") is not None:
        norms += [linears["q_norm"], linears["k_norm"]]
    norm_weights = [None if type(n) is not RMSNorm else n._parameters.get("weight") for n in norms]  # None: not a plain RMSNorm
    if any(w is None or w.dtype != torch.float32 or _hooked(n) or n.eps != inputs.eps for n, w in zip(norms, norm_weights)):
        return False
    attention = [_gguf(linears[name], inputs.tokens) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if type(mlp) is MLP:
        swiglu, moe = _swiglu(mlp, inputs.tokens, hooks_checked=True), (None, None, 0, False, None)
    elif type(mlp) is SparseMoeBlock:
        moe = _sparse_moe(mlp, inputs.tokens)
        shared = mlp._modules.get("shared_expert")
        swiglu = (_NO_BLOCKS,) * 3 if shared is None else _swiglu(shared, inputs.tokens)
    else:
        return False
    if None in attention or swiglu is None or moe is None or attention[3][3].numel():  # o_proj's bias: the stack has none
        return False
    router, experts, top_k, norm_topk_prob, shared_gate = moe
    q, k, v, o = attention
    norm_weights += [_NONE, _NONE][: 4 - len(norms)]
    expert_blocks = experts[:3] if experts else (_NONE,) * 3
    inputs.weights += [norm_weights[0], q[0], k[0], v[0], o[0], norm_weights[1], *(part[0] for part in swiglu), q[3], k[3], v[3],
                       norm_weights[2], norm_weights[3], _NONE if router is None else router, *expert_blocks,
                       _NONE if shared_gate is None else shared_gate]
    inputs.kinds += [part[1] for part in (*attention, *swiglu)] + (list(experts[3]) if experts else [0, 0, 0])
    inputs.packed += [part[2] for part in (*attention, *swiglu)] + (list(experts[4]) if experts else [False, False, False])
    inputs.moe += [top_k, int(norm_topk_prob)]
    inputs.windows.append(attn.window or 0)
    return True


def _gguf(linear: nn.Module, tokens: int) -> tuple | None:
    """(blocks, kind, packed, bias) of a GGUF block layer the kernel runs on `tokens` rows, else None."""
    native = getattr(type(linear), "native_decode_weight", None)
    return native(linear, tokens) if native is not None else None


def _swiglu(mlp: nn.Module, tokens: int, hooks_checked: bool = False) -> tuple | None:
    """gate's, up's and down's (blocks, kind, packed, bias) of a SwiGLU MLP of GGUF layers without
    biases (`hooks_checked`: a layer's MLP, whose one allowed hook _add_layer has checked)."""
    if type(mlp) is not MLP or (_hooked(mlp) and not hooks_checked):
        return None
    parts = tuple(_gguf(mlp._modules[name], tokens) for name in ("gate_proj", "up_proj", "down_proj"))
    if None in parts or any(part[3].numel() for part in parts):
        return None
    return parts


def _float_linear(linear: nn.Module | None) -> torch.Tensor | None:
    """The weight of a plain float32 nn.Linear without bias (a router, a shared expert's gate)."""
    if type(linear) is not nn.Linear or _hooked(linear) or linear._parameters["bias"] is not None:
        return None
    weight = linear._parameters["weight"]
    return weight if weight.dtype == torch.float32 else None


def _sparse_moe(block: SparseMoeBlock, tokens: int) -> tuple | None:
    """(router weight, experts' (gate, up, down, kinds, packed), top_k, norm_topk_prob, shared gate
    weight or None) of a MoE block with GGUF experts, else None."""
    parts = block._modules
    router, experts = _float_linear(parts["gate"]), parts["experts"]
    native = getattr(type(experts), "native_decode_experts", None)
    stacked = native(experts, tokens) if native is not None else None
    shared_gate = _float_linear(parts.get("shared_expert_gate")) if parts.get("shared_expert") is not None else None
    if router is None or stacked is None or (parts.get("shared_expert") is not None and shared_gate is None):
        return None
    return router, stacked, block.top_k, block.norm_topk_prob, shared_gate


def _summed_over(module: nn.Module) -> ProcessGroup | None | bool:
    """The group whose sum is `module`'s only hook (model/tensor_parallel.py), None if it has no
    hook, False if it has any other."""
    if module._forward_pre_hooks:
        return False
    hooks = list(module._forward_hooks.values())
    if not hooks:
        return None
    return getattr(hooks[0], "sums_over", False) if len(hooks) == 1 else False


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
