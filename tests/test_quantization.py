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


def test_nibble_packing_round_trip():
    from qwenkit.quantization.checkpoint import pack_nibbles, unpack_nibbles

    q = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    packed = pack_nibbles(q)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(q[0, 0]) + 16 * int(q[0, 1])  # low nibble first
    assert torch.equal(unpack_nibbles(packed), q)


def test_config_round_trips_through_hf_dict(tmp_path):
    from qwenkit.config import ModelConfig

    for arch, yarn in (("qwen2_moe", False), ("qwen3", True)):
        save_tiny(arch, tmp_path / arch, yarn=yarn)
        cfg = load_model(str(tmp_path / arch)).config
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("bits, arch", [(4, "qwen2"), (8, "qwen3_moe")])
def test_quantized_checkpoint_saves_and_loads_with_identical_logits(bits, arch, tmp_path):
    from test_errors import run_cli

    from qwenkit.model.attention import NoCache

    save_tiny(arch, tmp_path / "src", tied=(arch == "qwen2"))
    result = run_cli("quantize", str(tmp_path / "src"), str(tmp_path / "dst"), "--bits", str(bits), "--group-size", "32")
    assert result.returncode == 0, result.stderr
    in_memory = load_model(str(tmp_path / "src"), quantize=f"int{bits}", group_size=32)
    from_disk = load_model(str(tmp_path / "dst"))
    assert type(from_disk.model.model.layers[0].self_attn.q_proj) is (Int4Linear if bits == 4 else Int8Linear)
    ids = torch.randint(0, 290, (20,))
    pos = torch.arange(20)
    with torch.inference_mode():
        a = in_memory.model.compute_logits(in_memory.model(ids, pos, NoCache(pos)))
        b = from_disk.model.compute_logits(from_disk.model(ids, pos, NoCache(pos)))
    assert torch.equal(a, b)
    text = "the cat sat on the mat"
    assert from_disk.tokenizer.encode(text) == in_memory.tokenizer.encode(text)
    assert from_disk.tokenizer.chat_template.source == in_memory.tokenizer.chat_template.source
