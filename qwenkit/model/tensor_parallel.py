"""Tensor parallelism, gpt-fast style: each process keeps a slice of every decoder layer.

Attention: q/k/v column-sharded by heads (rank r keeps query heads [r H/N, (r+1) H/N) and the
key/value heads they read, which GQA's grouping makes a contiguous run too), o_proj row-sharded.
MLP: gate/up column-sharded, down row-sharded, at the same split of the intermediate features,
as even as whole blocks of down_proj's GGUF rows allow (uneven when the blocks do not divide);
a MoE block shards each expert (and the shared expert) the same way, GGUF experts all at once on
whole blocks, the router stays whole. Each half-layer's output is then a partial sum,
made whole by one all-reduce (a forward hook on the half-layer), so activations between layers
are complete and identical on every process. Embeddings, norms, routers and the output head are
replicated: every process computes the full logits, and only rank 0 samples from them.

Layers shard in place after loading (each process first loads the whole model). Float `Linear`s
and GGUF block layers (anything with `narrow(dim, start, length)`, quantization/gguf_linear.py)
shard; other quantized layers are refused with a clear error. gloo on CPU; NCCL on GPUs (that
path cannot be tested on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.distributed import ProcessGroup
from qwenkit.errors import QwenkitError
from qwenkit.model.moe import SparseMoeBlock
from qwenkit.model.qwen import DecoderLayer


@dataclass(frozen=True)
class LocalHeads:
    """How many attention heads one process holds."""

    query: int
    key_value: int


def local_heads(config: ModelConfig, world_size: int) -> LocalHeads:
    """Each process's share of the heads; the KV cache of a process holds `key_value` heads."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world_size or kv_heads % world_size:
        raise QwenkitError(
            f"tensor parallel size {world_size} must divide the model's {heads} attention heads and "
            f"{kv_heads} key/value heads"
        )
    return LocalHeads(heads // world_size, kv_heads // world_size)


def shard_model(model: nn.Module, group: ProcessGroup) -> None:
    """Keep this process's slice of every decoder layer of `model` (in place) and sum the halves'
    partial outputs across `group` after each. Nothing changes for a group of one, nor for a model
    already sharded for `group`. A refusal (a layer that cannot split) leaves the model partly
    sharded: load it again."""
    if group.world_size == 1 or getattr(model, "tensor_parallel", None) == group:  # once per model
        return
    if getattr(model, "tensor_parallel", None) is not None:
        raise QwenkitError(f"the model is already sharded for {model.tensor_parallel}")
    model.tensor_parallel = group
    heads = local_heads(model.config, group.world_size)
    for name, layer in model.named_modules():
        if not isinstance(layer, DecoderLayer):
            continue
        shard_attention(layer.self_attn, heads, group, f"{name}.self_attn")
        if isinstance(layer.mlp, SparseMoeBlock):
            shard_moe(layer.mlp, group, f"{name}.mlp")
        else:
            shard_mlp(layer.mlp, group, f"{name}.mlp")
        for half in (layer.self_attn, layer.mlp):
            half.register_forward_hook(_summed_over(group))


def shard_attention(attention: nn.Module, heads: LocalHeads, group: ProcessGroup, name: str) -> None:
    d, r = attention.head_dim, group.rank
    layers = {
        "q_proj": narrow(attention.q_proj, 0, r * heads.query * d, heads.query * d, f"{name}.q_proj"),
        "k_proj": narrow(attention.k_proj, 0, r * heads.key_value * d, heads.key_value * d, f"{name}.k_proj"),
        "v_proj": narrow(attention.v_proj, 0, r * heads.key_value * d, heads.key_value * d, f"{name}.v_proj"),
        "o_proj": row_parallel(attention.o_proj, r * heads.query * d, heads.query * d, group, f"{name}.o_proj"),
    }
    for child, layer in layers.items():  # all cut before any is replaced: a refusal leaves the layer whole
        setattr(attention, child, layer)
    attention.num_heads, attention.num_kv_heads = heads.query, heads.key_value


def shard_mlp(mlp: nn.Module, group: ProcessGroup, name: str) -> None:
    """A SwiGLU MLP's slice: gate/up by output rows, down by input columns (its output a partial
    sum the caller reduces). Any module with gate_proj/up_proj/down_proj (a MoE expert) shards so."""
    for child, layer in mlp_shards(mlp, group, name).items():
        setattr(mlp, child, layer)


def shard_moe(block: SparseMoeBlock, group: ProcessGroup, name: str) -> None:
    """Every expert and the shared expert sharded as an MLP; the router and the shared expert's
    gate stay whole (every process routes identically, from identical activations). Experts kept
    in their GGUF blocks (one stacked tensor per projection) shard all together, on whole blocks."""
    experts = None
    if hasattr(block.experts, "narrow_intermediate"):  # quantization/gguf_experts.py
        start, length = _share_of(block.experts.intermediate_size, block.experts.column_unit, group, f"{name}.experts")
        try:
            experts = block.experts.narrow_intermediate(start, length)
        except ValueError as exc:
            raise QwenkitError(f"{name}.experts cannot be split for tensor parallelism: {exc}") from exc
    elif not isinstance(block.experts, nn.ModuleList):
        raise QwenkitError(f"{name}.experts: tensor parallelism shards experts held as MLPs or GGUF blocks, not a {type(block.experts).__name__}")
    mlps = {} if experts is not None else {f"experts.{i}": expert for i, expert in enumerate(block.experts)}
    if block.shared_expert is not None:
        mlps["shared_expert"] = block.shared_expert
    shards = {key: mlp_shards(mlp, group, f"{name}.{key}") for key, mlp in mlps.items()}
    for key, layers in shards.items():
        for child, layer in layers.items():
            setattr(mlps[key], child, layer)
    if experts is not None:
        block.experts = experts


def mlp_shards(mlp: nn.Module, group: ProcessGroup, name: str) -> dict[str, nn.Module]:
    start, length = _share(mlp.down_proj, group, f"{name}.down_proj")
    return {
        "gate_proj": narrow(mlp.gate_proj, 0, start, length, f"{name}.gate_proj"),
        "up_proj": narrow(mlp.up_proj, 0, start, length, f"{name}.up_proj"),
        "down_proj": row_parallel(mlp.down_proj, start, length, group, f"{name}.down_proj"),
    }


def row_parallel(layer: nn.Module, start: int, length: int, group: ProcessGroup, name: str) -> nn.Module:
    """Input columns [start, start + length) of `layer`; its bias (added once to the sum) on rank 0 only."""
    shard = narrow(layer, 1, start, length, name)
    if not group.is_main:
        shard.bias = None
    return shard


def _share(layer: nn.Module, group: ProcessGroup, name: str) -> tuple[int, int]:
    """This process's run of `layer`'s input columns: as even a split as whole blocks allow (a GGUF
    row's blocks keep their scale; a Q6_K down_proj of 4864 = 19 x 256 values splits 9 + 10 blocks)."""
    return _share_of(layer.in_features, getattr(layer, "column_unit", 1), group, name)  # float: any column


def _share_of(features: int, unit: int, group: ProcessGroup, name: str) -> tuple[int, int]:
    blocks = features // unit
    if blocks < group.world_size:
        raise QwenkitError(f"{name}: {blocks} blocks of {unit} input values cannot be shared by {group.world_size} processes")
    first, last = group.rank * blocks // group.world_size, (group.rank + 1) * blocks // group.world_size
    return first * unit, (last - first) * unit


def narrow(layer: nn.Module, dim: int, start: int, length: int, name: str) -> nn.Module:
    """`layer` keeping output rows (dim 0) or input columns (dim 1) [start, start + length) of its weight."""
    if type(layer) is nn.Linear:
        weight = layer.weight.detach().narrow(dim, start, length).clone()  # a copy: the whole weight is freed
        bias = layer.bias
        if bias is not None and dim == 0:
            bias = bias.detach()[start : start + length].clone()
        out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        out.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return out
    if hasattr(layer, "narrow"):
        try:
            return layer.narrow(dim, start, length)
        except ValueError as exc:
            raise QwenkitError(f"{name} cannot be split for tensor parallelism: {exc}") from exc
    raise QwenkitError(f"tensor parallelism shards float and GGUF block layers; {name} is a {type(layer).__name__}")


def _summed_over(group: ProcessGroup):
    """A forward hook that sums a half-layer's partial output across the group, in place."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        group.sum_([output])
        return output

    return hook

