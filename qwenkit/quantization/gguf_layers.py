"""Quantized layers built straight from a GGUF file's blocks: in place (GGUFLinear, GGUFEmbedding)
or, for Q4_K, as exact int4 layers."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from qwenkit.config import ModelConfig
from qwenkit.formats.gguf_blocks import q4_k_codes, uint8_tensor
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.formats.gguf_tensors import expert_weights, projection_weights
from qwenkit.quantization.gguf_experts import GGUFExperts
from qwenkit.quantization.gguf_linear import KERNEL_TYPES, GGUFEmbedding, GGUFLinear, native_kernels, packs
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


def _expert_stack(gguf: GGUFFile, tensor, in_features: int) -> tuple[torch.Tensor, bool]:
    """An expert tensor as the kernels read it: the file's mapped bytes, or a packed copy made one
    expert at a time with each expert's file pages let go once copied, so that packing never holds
    the file's bytes and the copy of a whole stack at once (a MoE's expert stacks are most of it)."""
    blocks = uint8_tensor(gguf.raw(tensor))
    if not packs(tensor.kind, in_features):
        return blocks, False
    kernels, out = native_kernels(), torch.empty_like(blocks)
    per_expert = blocks[0].numel()
    for e in range(blocks.shape[0]):
        out[e] = kernels.pack(blocks[e], int(tensor.kind), in_features)
        gguf.release(tensor, e * per_expert, (e + 1) * per_expert)
    return out, True


def gguf_block_layers(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Every projection, every MoE layer's experts and the embedding whose types the native kernels
    run, as layers over the file's own (memory-mapped) bytes, or same-size copies where the kernels
    repack the type (pack_if_packable; the file's pages are then let go). A tied output projection
    reads the embedding's bytes, or its own packed copy of them."""
    layers: dict[str, torch.nn.Module] = {}
    for name, tensor, bias in projection_weights(gguf, config):
        if tensor.kind not in KERNEL_TYPES or keeps_float(name):
            continue
        blocks = uint8_tensor(gguf.raw(tensor))  # [rows, bytes per row], sharing the file's memory map
        if name == "model.embed_tokens":  # stays mapped: only the rows looked up are ever read
            head = GGUFLinear(blocks, tensor.kind, tensor.shape[1]) if config.tie_word_embeddings else None
            # The pages a lookup maps are let go, unless an output projection reads the same mapped bytes.
            drop = gguf.page_dropper(tensor) if head is None or head.packed else None
            layers[name] = GGUFEmbedding(blocks, tensor.kind, tensor.shape[1], dtype, drop)
            if head is not None:
                layers["lm_head"] = head
        else:
            layers[name] = GGUFLinear(blocks, tensor.kind, tensor.shape[1], bias)
        if name == "model.embed_tokens" or layers[name].packed:
            gguf.release(tensor)  # now a packed copy (or looked up row by row)
    for name, tensors in expert_weights(gguf):
        if any(t.kind not in KERNEL_TYPES for t in tensors):
            continue  # decoded to float with the rest
        in_features = (config.hidden_size, config.hidden_size, tensors[2].shape[-1])
        stacks = [_expert_stack(gguf, t, n) for t, n in zip(tensors, in_features)]  # [experts, rows, bytes per row]
        kinds = (tensors[0].kind, tensors[1].kind, tensors[2].kind)
        layers[name] = GGUFExperts(*(blocks for blocks, _ in stacks), kinds, config.hidden_size,
                                   prepacked=tuple(packed for _, packed in stacks))
    return layers
