"""Weight-only int8 / int4 layers against their dequantized float reference."""

import pytest
import torch
from torch import nn

from qwenkit.engine import LLM, SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.quantization.linear import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8
from qwenkit.quantization.quantize import quantize_model
from qwenkit.weights.loader import load_model
from tiny_models import save_tiny


def test_int4_codes_reconstruct_within_half_a_step():
    w = torch.randn(64, 256)
    q, scale, zero = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, scale, zero, 32) - w).abs().reshape(64, 8, 32).amax(-1)
    assert (err <= scale / 2 + 1e-6).all()  # round to nearest: never more than half a quantization step


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_dequantized_reference(group):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 256)
    q, scale, zero = quantize_int4(linear.weight.detach(), group)
    # Reference: the dequantized weight, and the activations rounded to bf16 as the kernel takes them.
    expected = x.to(torch.bfloat16).float() @ dequantize_int4(q, scale, zero, group).T + linear.bias.detach()
    got = Int4Linear.from_linear(linear, group)(x)
    assert got.dtype == torch.float32
    # bf16 scales/zeros and bf16 output rounding: about 3 significant digits.
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_int8_linear_matches_dequantized_reference():
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=False)
    x = torch.randn(3, 128)
    q, scale = quantize_int8(linear.weight.detach())
    expected = x.to(torch.bfloat16).float() @ (q.float() * scale[:, None]).T
    got = Int8Linear.from_linear(linear)(x)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_stays_close_to_float(mode, tmp_path):
    save_tiny("qwen2_moe", tmp_path)
    ref = load_model(str(tmp_path))
    quant = load_model(str(tmp_path), quantize=mode, group_size=32)
    linears = [m for m in quant.model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert len(linears) >= 3 * 4  # the projections and experts of 3 layers
    assert isinstance(quant.model.model.layers[0].mlp.gate, nn.Linear)  # the router stays float
    ids = torch.randint(0, 290, (24,))
    from qwenkit.model.attention import NoCache

    pos = torch.arange(24)
    with torch.inference_mode():
        a = ref.model.compute_logits(ref.model(ids, pos, NoCache(pos)))
        b = quant.model.compute_logits(quant.model(ids, pos, NoCache(pos)))
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree
    out = LLM(quant).generate(ids.tolist(), SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.outputs[0].token_ids) >= 1


def test_bad_quantization_options():
    with pytest.raises(QwenkitError, match="int2"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), "int2")
    with pytest.raises(QwenkitError, match="group size"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), "int4", group_size=48)
