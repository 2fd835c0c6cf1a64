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
from qwenkit.quantization.gguf_linear import KERNEL_TYPES, PACKED_TYPES, GGUFEmbedding, GGUFLinear
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


def gguf_block_layers(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Every projection, every MoE layer's experts and the embedding whose types the native kernels
    run, as layers over the file's own (memory-mapped) bytes. A tied output projection shares the
    embedding's bytes."""
    layers: dict[str, torch.nn.Module] = {}
    for name, tensor, bias in projection_weights(gguf, config):
        if tensor.kind not in KERNEL_TYPES or keeps_float(name):
            continue
        blocks = uint8_tensor(gguf.raw(tensor))  # [rows, bytes per row], sharing the file's memory map
        if name == "model.embed_tokens":  # stays mapped: only the rows looked up are ever read
            layers[name] = GGUFEmbedding(blocks, tensor.kind, tensor.shape[1], dtype)
            if config.tie_word_embeddings:
                layers["lm_head"] = GGUFLinear(blocks, tensor.kind, tensor.shape[1])
        else:
            layers[name] = GGUFLinear(blocks, tensor.kind, tensor.shape[1], bias)
        if tensor.kind in PACKED_TYPES:
            gguf.release(tensor)  # now a packed copy (or looked up row by row)
    for name, tensors in expert_weights(gguf):
        if any(t.kind not in KERNEL_TYPES for t in tensors):
            continue  # decoded to float with the rest
        gate, up, down = (uint8_tensor(gguf.raw(t)) for t in tensors)  # [experts, rows, bytes per row]
        kinds = (tensors[0].kind, tensors[1].kind, tensors[2].kind)
        layers[name] = GGUFExperts(gate, up, down, kinds, config.hidden_size)
        for tensor in tensors:
            if tensor.kind in PACKED_TYPES:
                gguf.release(tensor)
    return layers
