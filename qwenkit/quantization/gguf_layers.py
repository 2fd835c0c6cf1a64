"""Quantized layers built straight from a GGUF file's blocks: in place (GGUFLinear, GGUFEmbedding)
or, for Q4_K, as exact int4 layers."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from qwenkit.config import ModelConfig
from qwenkit.distributed import Cut, ShardPlan
from qwenkit.errors import QwenkitError
from qwenkit.formats.gguf_blocks import q4_k_codes, uint8_tensor
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.formats.gguf_tensors import expert_weights, projection_weights
from qwenkit.quantization.gguf_experts import GGUFExperts
from qwenkit.quantization.gguf_linear import (
    KERNEL_TYPES, GGUFEmbedding, GGUFLinear, column_unit, narrow_columns, native_kernels, packs,
)
from qwenkit.quantization.linear import Int4Linear
from qwenkit.quantization.quantize import int4_group_size, keeps_float


def int4_layers_from_q4_k(gguf: GGUFFile, config: ModelConfig) -> dict[str, torch.nn.Module]:
    """Every Q4_K projection as an Int4Linear (groups of 32), without going through float: exact.

    Q4_K stores value = scale * q - min per 32 values, q in 0..15; the kernel computes
    (q - 8) * scale + zero, so zero = 8 * scale - min.
    """
    layers = {}
    for name, tensor, bias in projection_weights(gguf, config):
        out_features, in_features = tensor.shape
        if tensor.kind != GGMLQuantizationType.Q4_K or name == "model.embed_tokens":
            continue
        if int4_group_size(out_features, in_features, 32) != 32:
            continue
        codes, scale, minimum = q4_k_codes(gguf.raw(tensor))
        scale, minimum = scale.reshape(out_features, -1), minimum.reshape(out_features, -1)
        layers[name] = Int4Linear(codes.reshape(out_features, in_features), scale, 8 * scale - minimum, 32, bias)
    return layers


def _expert_stack(gguf: GGUFFile, tensor, in_features: int, cut: Cut | None = None) -> tuple[torch.Tensor, bool]:
    """An expert tensor as the kernels read it: the file's mapped bytes, or a packed copy made one
    expert at a time with each expert's file pages let go once copied, so that packing never holds
    the file's bytes and the copy of a whole stack at once (a MoE's expert stacks are most of it).
    `cut`: a tensor-parallel process's run of the intermediate features, gate/up's output rows
    (dim 0) or down's input columns (dim 1); only that run is copied."""
    blocks = uint8_tensor(gguf.raw(tensor))
    if cut is not None:
        blocks, in_features = _cut_blocks(blocks, tensor.kind, in_features, cut)
    if not packs(tensor.kind, in_features):
        if cut is not None:  # its own copy of the run: the file's pages can go
            blocks = blocks.contiguous()
            gguf.release(tensor)
        return blocks, False
    kernels, out = native_kernels(), torch.empty(blocks.shape, dtype=torch.uint8)
    per_expert = tensor.n_bytes // blocks.shape[0]
    for e in range(blocks.shape[0]):
        out[e] = kernels.pack(blocks[e], int(tensor.kind), in_features)
        gguf.release(tensor, e * per_expert, (e + 1) * per_expert)
    return out, True


def _cut_blocks(blocks: torch.Tensor, kind, in_features: int, cut: Cut) -> tuple[torch.Tensor, int]:
    """(a tensor-parallel process's run of a weight's file bytes [..., rows, bytes per row], its
    input features): output rows (a view of the file), or input columns on whole blocks (a copy)."""
    if cut.dim == 0:
        return blocks.narrow(-2, cut.start, cut.length), in_features
    try:
        return narrow_columns(blocks, kind, in_features, False, cut.start, cut.length), cut.length
    except ValueError as exc:  # the plan checks the blocks first; this says which weight if it did not
        raise QwenkitError(f"tensor parallelism cannot split a GGUF weight so: {exc}") from exc


def _block_projections(gguf: GGUFFile, config: ModelConfig):
    """(module name, tensor, bias) of the projections the native kernels run from their blocks."""
    for name, tensor, bias in projection_weights(gguf, config):
        if tensor.kind in KERNEL_TYPES and not keeps_float(name):
            yield name, tensor, bias


def _block_experts(gguf: GGUFFile):
    """(experts module name, gate, up and down tensors) of the MoE layers the kernels run from their blocks."""
    for name, tensors in expert_weights(gguf):
        if all(t.kind in KERNEL_TYPES for t in tensors):  # else decoded to float with the rest
            yield name, tensors


def gguf_column_units(gguf: GGUFFile, config: ModelConfig) -> dict[str, int]:
    """The runs of input columns (whole blocks; a packed 32-value type's 64) that each layer
    gguf_block_layers builds splits into, by module name (an experts module: its intermediate
    features): what a tensor-parallel plan needs before any block is read."""
    units = {name: column_unit(t.kind, packs(t.kind, t.shape[1])) for name, t, _ in _block_projections(gguf, config)}
    for name, (_, _, down) in _block_experts(gguf):
        units[name] = column_unit(down.kind, packs(down.kind, down.shape[-1]))
    return units


def gguf_block_layers(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype, plan: ShardPlan | None = None) -> dict[str, torch.nn.Module]:
    """Every projection, every MoE layer's experts and the embedding whose types the native kernels
    run, as layers over the file's own (memory-mapped) bytes, or same-size copies where the kernels
    repack the type (pack_if_packable; the file's pages are then let go). A tied output projection
    reads the embedding's bytes, or its own packed copy of them. With a tensor-parallel `plan`, a
    sharded layer is built from this process's run of the file's bytes only."""
    layers: dict[str, torch.nn.Module] = {}
    for name, tensor, bias in _block_projections(gguf, config):
        blocks = uint8_tensor(gguf.raw(tensor))  # [rows, bytes per row], sharing the file's memory map
        cut = plan.cuts.get(name) if plan is not None else None
        if name == "model.embed_tokens":  # stays mapped: only the rows looked up are ever read
            head = None
            if config.tie_word_embeddings:  # with a tensor-parallel plan, this process's vocabulary rows
                head_cut = plan.cuts.get("lm_head") if plan is not None else None
                head = GGUFLinear(blocks if head_cut is None else _cut_blocks(blocks, tensor.kind, tensor.shape[1], head_cut)[0],
                                  tensor.kind, tensor.shape[1])
            # The pages a lookup maps are let go, unless an output projection reads the same mapped bytes.
            drop = gguf.page_dropper(tensor) if head is None or head.packed else None
            layers[name] = GGUFEmbedding(blocks, tensor.kind, tensor.shape[1], dtype, drop)
            if head is not None:
                layers["lm_head"] = head
        elif cut is None:
            layers[name] = GGUFLinear(blocks, tensor.kind, tensor.shape[1], bias)
        else:
            if bias is not None:
                bias = plan.take(f"{name}.bias", bias, tuple(bias.shape)) if plan.keeps(f"{name}.bias") else None
            run, in_features = _cut_blocks(blocks, tensor.kind, tensor.shape[1], cut)
            layers[name] = GGUFLinear(run, tensor.kind, in_features, bias)
        if name == "model.embed_tokens" or layers[name].packed or (cut is not None and cut.dim == 1):
            gguf.release(tensor)  # now a packed copy, a copy of some columns, or looked up row by row
    for name, tensors in _block_experts(gguf):
        in_features = (config.hidden_size, config.hidden_size, tensors[2].shape[-1])
        cut = plan.cuts.get(name) if plan is not None else None
        cuts = (None, None, None) if cut is None else (cut, cut, Cut(1, cut.start, cut.length))
        stacks = [_expert_stack(gguf, t, n, c) for t, n, c in zip(tensors, in_features, cuts)]  # [experts, rows, bytes per row]
        kinds = (tensors[0].kind, tensors[1].kind, tensors[2].kind)
        layers[name] = GGUFExperts(*(blocks for blocks, _ in stacks), kinds, config.hidden_size,
                                   prepacked=tuple(packed for _, packed in stacks))
    return layers
