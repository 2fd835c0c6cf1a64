"""AWQ (GEMM) and GPTQ (v1, act-order on and off) checkpoints, packed here by hand from the published layouts.

The test quantizes a tiny transformers model's projections to 4-bit codes, packs them the way
AutoAWQ / AutoGPTQ write them, and compares qwenkit's logits with transformers running the same
dequantized weights, (q - z) * s, in float.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from qwenkit.model.attention import NoCache
from qwenkit.quantization.awq_gptq import AWQ_PACK_ORDER, unpack_int32
from qwenkit.quantization.linear import Int4Linear
from qwenkit.weights.loader import load_model
from tiny_models import reference_model, tiny_config, tiny_tokenizer

GROUP = 32
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = torch.tensor([3, 17, 250, 9, 42, 120, 7, 88])


def quantize(weight: torch.Tensor, groups: torch.Tensor, zero_range=(0, 15)):
    """Asymmetric codes for W [out, in] where input i belongs to group groups[i]: q, z, s with W ≈ (q - z) * s."""
    out_features, n_groups = weight.shape[0], int(groups.max()) + 1
    s = torch.empty(out_features, n_groups)
    z = torch.empty(out_features, n_groups)
    for g in range(n_groups):
        w = weight[:, groups == g]
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s[:, g] = ((hi - lo) / 15).clamp(min=1e-6).half().float()  # fp16 on disk: the reference uses the same value
        z[:, g] = (-lo / s[:, g]).round().clamp(*zero_range)
    q = (weight / s[:, groups] + z[:, groups]).round().clamp(0, 15)
    return q.int(), z.int(), s


def pack_along_columns(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int32 words [rows, cols / 8]: word j of a row holds columns 8j..8j+7, column 8j + order[i] at bits 4i."""
    rows, cols = codes.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        words |= (codes[:, [8 * j + order[i] for j in range(cols // 8)]].long() & 0xF) << (4 * i)
    return words.to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)


def awq_tensors(q, z, s):
    return {"qweight": pack_along_columns(q.t(), AWQ_PACK_ORDER), "qzeros": pack_along_columns(z.t(), AWQ_PACK_ORDER),
            "scales": s.t().half().contiguous()}


def gptq_tensors(q, z, s, g_idx):
    return {"qweight": pack_along_columns(q.contiguous()).t().contiguous(),  # packed along the input dim: [in/8, out]
            "qzeros": pack_along_columns((z.t() - 1).contiguous()), "scales": s.t().half().contiguous(),
            "g_idx": g_idx.int()}


def build_checkpoint(tmp_path, method: str, act_order: bool = False):
    """A quantized checkpoint directory plus the transformers model running its dequantized weights."""
    config = tiny_config("qwen2")
    model = reference_model(config)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        for proj in PROJECTIONS:
            name = f"model.layers.{layer}.{proj}"
            weight = tensors.pop(f"{name}.weight")
            in_features = weight.shape[1]
            order = torch.randperm(in_features, generator=gen) if act_order else torch.arange(in_features)
            groups = torch.empty(in_features, dtype=torch.long)
            groups[order] = torch.arange(in_features) // GROUP  # act-order: the group follows the processing order
            q, z, s = quantize(weight, groups, (1, 15) if method == "gptq" else (0, 15))
            dequantized = (q - z[:, groups]).float() * s[:, groups]
            model.get_submodule(name).weight.data.copy_(dequantized)
            packed = awq_tensors(q, z, s) if method == "awq" else gptq_tensors(q, z, s, groups)
            tensors.update({f"{name}.{k}": v for k, v in packed.items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_config = config.to_dict()
    quant = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    if method == "gptq":
        quant = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": False,
                 "checkpoint_format": "gptq"}
    hf_config["quantization_config"] = quant
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    tiny_tokenizer().save_pretrained(tmp_path)
    return model


def test_unpacking_inverts_the_published_packing():
    codes = torch.randint(0, 16, (6, 32), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    assert torch.equal(unpack_int32(pack_along_columns(codes, AWQ_PACK_ORDER), AWQ_PACK_ORDER), codes)
    assert torch.equal(unpack_int32(pack_along_columns(codes)), codes)
    # Spot checks of the layouts themselves: AWQ puts column 1 in bits 16..19, GPTQ in bits 4..7.
    one = torch.zeros(1, 8, dtype=torch.int32)
    one[0, 1] = 0xA
    assert pack_along_columns(one, AWQ_PACK_ORDER).item() == 0xA << 16
    assert pack_along_columns(one).item() == 0xA << 4


@pytest.mark.parametrize("method,act_order", [("awq", False), ("gptq", False), ("gptq", True)])
def test_checkpoint_matches_its_dequantized_weights(tmp_path, method, act_order):
    reference = build_checkpoint(tmp_path, method, act_order)
    loaded = load_model(str(tmp_path))
    layers = [m for m in loaded.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 3 * len(PROJECTIONS)  # every projection stays int4
    assert all((m.input_permutation is not None) == act_order for m in layers)
    positions = torch.arange(len(IDS))
    with torch.no_grad():
        ours = loaded.model.compute_logits(loaded.model(IDS, positions, NoCache(positions)))
        expected = reference(IDS[None]).logits[0]
    # The int4 kernel takes bf16 activations and bf16 scales: about 3 significant digits.
    error = (ours - expected).abs().max().item()
    assert error < 0.02 * expected.abs().max().item(), error
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.85
