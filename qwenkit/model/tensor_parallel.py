"""Tensor parallelism, gpt-fast style: each process keeps a slice of every decoder layer.

Attention: q/k/v column-sharded by heads (rank r keeps query heads [r H/N, (r+1) H/N) and the
key/value heads they read, which GQA's grouping makes a contiguous run too), o_proj row-sharded.
MLP: gate/up column-sharded, down row-sharded, at the same split of the intermediate features,
as even as whole blocks of down_proj's GGUF rows allow (uneven when the blocks do not divide);
a MoE block shards each expert (and the shared expert) the same way, GGUF experts all at once on
whole blocks, the router stays whole. Each half-layer's output is then a partial sum,
made whole by one all-reduce (a forward hook on the half-layer), so activations between layers
are complete and identical on every process. Embeddings, norms and routers are replicated. The
output projection is split by vocabulary rows (unless it is the float embedding
itself, tied), and its logits gathered: every process has the full logits, only rank 0 samples.
On one machine the sums and the gather go through shared memory (kernels/shared_memory.py).

The plan (`plan_shards`: which run of each layer a process keeps) is made before any weight is
read, on a skeleton of the model on the meta device; the loader then reads only those runs
(weights/loader.py), so no process ever holds the whole model. A model already loaded whole
shards in place (`shard_model`). Float `Linear`s and GGUF block layers (anything with
`narrow(dim, start, length)`, quantization/gguf_linear.py) shard; other quantized layers are
refused with a clear error. gloo on CPU; NCCL on GPUs (that
path cannot be tested on this machine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.distributed import Cut, ProcessGroup, ShardPlan
from qwenkit.errors import QwenkitError
from qwenkit.kernels.shared_memory import collectives
from qwenkit.model.moe import SparseMoeBlock
from qwenkit.model.qwen import DecoderLayer


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


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
    """Keep this process's slice of every decoder layer of an already loaded `model` (in place) and
    sum the halves' partial outputs across `group` after each. Nothing changes for a group of one,
    nor for a model already sharded for `group` (as the loader builds it when given the group:
    then no process ever holds the whole model). A refusal (a layer that cannot split) leaves the
    model partly sharded: load it again."""
    if group.world_size == 1 or getattr(model, "tensor_parallel", None) == group:  # once per model
        return
    if getattr(model, "tensor_parallel", None) is not None:
        raise QwenkitError(f"the model is already sharded for {model.tensor_parallel}")
    apply_shards(model, plan_shards(model, group))


def plan_shards(model: nn.Module, group: ProcessGroup, units: Mapping[str, int] | None = None, head: bool | None = None) -> ShardPlan:
    """What this process keeps of every decoder layer of `model`, a loaded model or a skeleton on
    the meta device, and of its output projection. `units`: the input-column runs (whole blocks)
    of layers not built yet (GGUF blocks, by module name; an experts module for its stacked
    experts); a built layer says its own (`column_unit`), and a float one splits anywhere.
    `head`: whether the output projection splits by vocabulary rows (default: unless it is the
    float embedding itself, tied, which a split would copy)."""
    units = dict(units or {})
    heads = local_heads(model.config, group.world_size)
    cuts: dict[str, Cut] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, DecoderLayer):
            continue
        d, r, attention = layer.self_attn.head_dim, group.rank, f"{name}.self_attn"
        q, kv = Cut(0, r * heads.query * d, heads.query * d), Cut(0, r * heads.key_value * d, heads.key_value * d)
        unit = units.get(f"{attention}.o_proj", getattr(layer.self_attn.o_proj, "column_unit", 1))
        if q.length % unit:  # o_proj's input splits by heads, which must fall on its blocks
            raise QwenkitError(f"{attention}.o_proj: tensor parallel size {group.world_size} gives each process "
                               f"{q.length} of its input values, not whole blocks of {unit}")
        cuts |= {f"{attention}.q_proj": q, f"{attention}.k_proj": kv, f"{attention}.v_proj": kv,
                 f"{attention}.o_proj": Cut(1, q.start, q.length)}
        if isinstance(layer.mlp, SparseMoeBlock):
            cuts |= _moe_cuts(layer.mlp, group, f"{name}.mlp", units)
        else:
            cuts |= _mlp_cuts(layer.mlp, group, f"{name}.mlp", units)
    if head is None:
        head = not (model.config.tie_word_embeddings and type(model.lm_head) is nn.Linear)
    if head:
        start, length = _head_rows(model.config.vocab_size, group)[group.rank]
        cuts["lm_head"] = Cut(0, start, length)
    return ShardPlan(group, cuts)


def _head_rows(vocab: int, group: ProcessGroup) -> list[tuple[int, int]]:
    """(start, length) of each process's vocabulary rows of the output projection, in whole
    groups of 16 rows (a packed GGUF layout's tile group); the last process also takes the rows
    after the last whole group."""
    rows = [_share_of(vocab, 16, ProcessGroup(rank, group.world_size), "lm_head") for rank in range(group.world_size)]
    start, length = rows[-1]
    rows[-1] = (start, vocab - start)
    return rows


def _mlp_cuts(mlp: nn.Module, group: ProcessGroup, name: str, units: Mapping[str, int]) -> dict[str, Cut]:
    """A SwiGLU MLP's slice: gate/up by output rows, down by input columns (its output a partial
    sum), at as even a split of down's input as whole blocks allow (a GGUF row's blocks keep their
    scale: a Q6_K down_proj of 4864 = 19 x 256 values splits 9 + 10 blocks)."""
    down = mlp.down_proj
    unit = units.get(f"{name}.down_proj", getattr(down, "column_unit", 1))
    start, length = _share_of(down.in_features, unit, group, f"{name}.down_proj")
    return {f"{name}.gate_proj": Cut(0, start, length), f"{name}.up_proj": Cut(0, start, length),
            f"{name}.down_proj": Cut(1, start, length)}


def _moe_cuts(block: SparseMoeBlock, group: ProcessGroup, name: str, units: Mapping[str, int]) -> dict[str, Cut]:
    """Every expert and the shared expert sharded as an MLP; the router and the shared expert's
    gate stay whole (every process routes identically, from identical activations). Experts kept
    in their GGUF blocks (one stacked tensor per projection) shard all together, on whole blocks."""
    experts, cuts = f"{name}.experts", {}
    if experts in units or hasattr(block.experts, "narrow_intermediate"):  # quantization/gguf_experts.py
        size = getattr(block.experts, "intermediate_size", None) or block.experts[0].down_proj.in_features
        start, length = _share_of(size, units.get(experts) or block.experts.column_unit, group, experts)
        cuts[experts] = Cut(0, start, length)
    elif isinstance(block.experts, nn.ModuleList):
        for i, expert in enumerate(block.experts):
            cuts |= _mlp_cuts(expert, group, f"{experts}.{i}", units)
    else:
        raise QwenkitError(f"{experts}: tensor parallelism shards experts held as MLPs or GGUF blocks, not a {type(block.experts).__name__}")
    if block.shared_expert is not None:
        cuts |= _mlp_cuts(block.shared_expert, group, f"{name}.shared_expert", units)
    return cuts


def apply_shards(model: nn.Module, plan: ShardPlan, built: frozenset[str] = frozenset()) -> None:
    """Cut `model`'s layers as `plan` says, except the modules in `built` (in place already,
    built as this process's shard), sum each half-layer's partial output across the plan's group,
    and gather the output projection's logits. A layer's projections are all cut before any is
    replaced: a refusal leaves that layer whole."""
    group = plan.group
    heads = local_heads(model.config, group.world_size)
    model.tensor_parallel = group
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, DecoderLayer)]:
        attention = layer.self_attn
        _cut_children(attention, f"{name}.self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), plan, built)
        attention.num_heads, attention.num_kv_heads = heads.query, heads.key_value
        if isinstance(layer.mlp, SparseMoeBlock):
            _cut_moe(layer.mlp, f"{name}.mlp", plan, built)
        else:
            _cut_children(layer.mlp, f"{name}.mlp", MLP_PROJECTIONS, plan, built)
        for half in (layer.self_attn, layer.mlp):
            half.register_forward_hook(_summed_over(group))
    if "lm_head" in plan.cuts:  # every process's logits of its vocabulary rows, side by side
        if "lm_head" not in built:
            cut = plan.cuts["lm_head"]
            model.lm_head = narrow(model.lm_head, 0, cut.start, cut.length, "lm_head")
        widths = [length for _, length in _head_rows(model.config.vocab_size, group)]
        model.lm_head.register_forward_hook(_gathered_over(group, widths))


def _cut_children(parent: nn.Module, prefix: str, children: tuple[str, ...], plan: ShardPlan, built: frozenset[str]) -> None:
    layers = {}
    for child in children:
        name = f"{prefix}.{child}"
        if name not in built:
            cut = plan.cuts[name]
            layers[child] = narrow(getattr(parent, child), cut.dim, cut.start, cut.length, name)
            if not plan.keeps(f"{name}.bias"):  # a row-parallel layer's bias, added once to the sum (on rank 0)
                layers[child].bias = None
    for child, layer in layers.items():
        setattr(parent, child, layer)


def _cut_moe(block: SparseMoeBlock, name: str, plan: ShardPlan, built: frozenset[str]) -> None:
    experts, mlps = f"{name}.experts", {}
    if experts in plan.cuts:  # stacked GGUF experts: one cut of the intermediate features
        if experts not in built:
            try:
                block.experts = block.experts.narrow_intermediate(plan.cuts[experts].start, plan.cuts[experts].length)
            except ValueError as exc:
                raise QwenkitError(f"{experts} cannot be split for tensor parallelism: {exc}") from exc
    else:
        mlps = {f"{experts}.{i}": expert for i, expert in enumerate(block.experts)}
    if block.shared_expert is not None:
        mlps[f"{name}.shared_expert"] = block.shared_expert
    for prefix, mlp in mlps.items():
        _cut_children(mlp, prefix, MLP_PROJECTIONS, plan, built)


def shard_mlp(mlp: nn.Module, group: ProcessGroup, name: str) -> None:
    """One MLP (or MoE expert) of a loaded model, alone: its slice, as shard_model cuts it."""
    _cut_children(mlp, name, MLP_PROJECTIONS, ShardPlan(group, _mlp_cuts(mlp, group, name, {})), frozenset())


def shard_moe(block: SparseMoeBlock, group: ProcessGroup, name: str) -> None:
    """One MoE block of a loaded model, alone: its experts' slices, as shard_model cuts them."""
    _cut_moe(block, name, ShardPlan(group, _moe_cuts(block, group, name, {})), frozenset())


def _share_of(features: int, unit: int, group: ProcessGroup, name: str) -> tuple[int, int]:
    blocks = features // unit
    if blocks < group.world_size:
        raise QwenkitError(f"{name}: {blocks} blocks of {unit} input values cannot be shared by {group.world_size} processes")
    first, last = group.rank * blocks // group.world_size, (group.rank + 1) * blocks // group.world_size
    return first * unit, (last - first) * unit


def narrow(layer: nn.Module, dim: int, start: int, length: int, name: str) -> nn.Module:
    """`layer` keeping output rows (dim 0) or input columns (dim 1) [start, start + length) of its weight."""
    if type(layer) is nn.Linear and layer.weight.is_meta:  # a skeleton's: the loader reads the run
        shape = [layer.out_features, layer.in_features]
        shape[dim] = length
        return nn.Linear(shape[1], shape[0], bias=layer.bias is not None, device="meta")
    if type(layer) is nn.Linear:
        cut = Cut(dim, start, length)
        weight = cut.of(layer.weight.detach())  # a copy: the whole weight is freed
        bias = layer.bias
        if bias is not None and dim == 0:
            bias = cut.of(bias.detach(), 0)
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
    """A forward hook that sums a half-layer's partial output across the group, in place: through
    shared memory when the group is on one machine (kernels/shared_memory.py), chosen at the first
    forward (every process runs it together)."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        collectives(group).sum_([output])
        return output

    hook.sums_over = group  # the one-call decode stack (native_decode.py) makes this sum itself
    return hook


def _gathered_over(group: ProcessGroup, widths: list[int]):
    """A forward hook that puts the output projection's logits of each process's vocabulary rows
    side by side: the whole logits, on every process."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return collectives(group).gather_columns(output, widths)

    return hook
