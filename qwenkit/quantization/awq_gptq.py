"""AWQ (GEMM) and GPTQ (v1) int4 checkpoints, unpacked into the same Int4Linear layers.

Both store 4-bit codes in int32 words, 8 per word, low bits first, with per-group scales and
zero points, and dequantize as W = (q - z) * s:
- AWQ GEMM: qweight [in, out/8] and qzeros [in/group, out/8] packed along the output dim in the
  interleaved order 0, 2, 4, 6, 1, 3, 5, 7; scales [in/group, out] fp16.
- GPTQ v1: qweight [in/8, out] packed along the input dim in order; qzeros [groups, out/8] packed
  along the output dim and stored minus one; scales [groups, out]; g_idx [in] gives each input's
  group. With act-order (desc_act) the groups are not contiguous: the inputs are permuted so that
  they are, and the layer permutes its activations the same way.
Int4Linear computes (q - 8) * scale + zero, so zero = (8 - z) * s: exact.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.quantization.linear import Int4Linear, dequantize_int4
from qwenkit.quantization.quantize import int4_group_size

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_PACK_ORDER[i] of its 8


def unpack_int32(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Codes [rows, cols * 8] from int32 words [rows, cols]: word nibble i goes to column order[i]."""
    rows, cols = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32)[..., None] >> shifts) & 0xF  # [rows, cols, 8] by nibble
    out = torch.empty_like(nibbles)
    out[..., list(order)] = nibbles
    return out.reshape(rows, cols * 8)


def int4_module(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int, bias: torch.Tensor | None,
                input_permutation: torch.Tensor | None = None) -> nn.Module:
    """q [out, in] codes, s and z [out, in/group] scales and zero codes: W = (q - z) * s."""
    out_features, in_features = q.shape
    scale, zero = s.float(), (8 - z.float()) * s.float()
    kernel_group = int4_group_size(out_features, in_features, min(group, 256))
    if kernel_group is not None and group % kernel_group == 0:
        # A group larger than the kernel supports (or per-channel, -1) is split into equal smaller ones.
        repeat = group // kernel_group
        scale, zero = scale.repeat_interleave(repeat, 1), zero.repeat_interleave(repeat, 1)
        return Int4Linear(q, scale, zero, kernel_group, bias, input_permutation)
    # A shape the int4 kernel cannot tile: dequantize exactly into a float layer.
    weight = dequantize_int4(q, scale, zero, group)
    if input_permutation is not None:
        weight = weight[:, torch.argsort(input_permutation)]
    linear = nn.Linear(in_features, out_features, bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.float(), requires_grad=False)
    return linear


def _group_size(config: dict, in_features: int) -> int:
    """The checkpoint's int4 group size (-1 means one group per row); refuses other bit widths."""
    if config.get("bits", 4) != 4:
        raise QwenkitError(f"only 4-bit {config.get('quant_method')} checkpoints are supported, this one has {config['bits']} bits")
    group = int(config.get("group_size", 128))
    return in_features if group == -1 else group


def awq_module(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, config: dict) -> nn.Module:
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise QwenkitError(f"AWQ version {version!r} is not supported; qwenkit reads the GEMM layout")
    if not config.get("zero_point", True):
        raise QwenkitError("AWQ checkpoints without zero points are not supported")
    q = unpack_int32(parts["qweight"], AWQ_PACK_ORDER).t()  # [out, in]
    z = unpack_int32(parts["qzeros"], AWQ_PACK_ORDER).t()  # [out, groups]
    s = parts["scales"].t()
    group = _group_size(config, q.shape[1])
    if s.shape != z.shape or q.shape[1] != s.shape[1] * group:
        raise QwenkitError(f"AWQ layer shapes do not agree: qweight {tuple(parts['qweight'].shape)}, scales {tuple(parts['scales'].shape)}")
    return int4_module(q.contiguous(), s, z, group, bias)


def gptq_module(parts: dict[str, torch.Tensor], bias: torch.Tensor | None, config: dict) -> nn.Module:
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise QwenkitError(f"GPTQ checkpoint format {config['checkpoint_format']!r} is not supported; qwenkit reads v1 ('gptq')")
    q = unpack_int32(parts["qweight"].t()).t()  # packed along the input dim: unpack the transpose -> [in, out]
    z = unpack_int32(parts["qzeros"]) + 1  # [groups, out]; v1 stores zero - 1
    s = parts["scales"]
    in_features = q.shape[0]
    group = _group_size(config, in_features)
    g_idx = parts.get("g_idx")
    g_idx = torch.arange(in_features) // group if g_idx is None else g_idx.long()
    permutation = None
    if not torch.equal(g_idx, torch.arange(in_features) // group):
        # Act-order: sort the inputs by group so each group is contiguous again.
        permutation = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[permutation], torch.arange(in_features) // group):
            raise QwenkitError("GPTQ g_idx does not give every group the same number of inputs")
        q = q[permutation]
    return int4_module(q.t().contiguous(), s.t(), z.t(), group, bias, permutation)


BUILDERS = {"awq": awq_module, "gptq": gptq_module}
