"""qwenkit's torch GGUF decoders against the `gguf` package (llama.cpp's own reference), on the real file."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from qwenkit.quantization.linear import Int4Linear, quantize_int4
from qwenkit.formats.gguf_blocks import FAST_TYPES, decode
from qwenkit.formats.gguf_config import config_from_gguf
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.quantization.gguf_layers import int4_layers_from_q4_k
from qwenkit.weights.resolve import resolve_model


@pytest.fixture(scope="module")
def default_gguf():
    return GGUFFile(resolve_model(None).path)


def first_of(gguf, kind):
    return next(t for t in gguf.tensors.values() if t.kind == kind)


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F32])
def test_decoders_equal_gguf_package_on_real_tensors(default_gguf, kind):
    tensor = first_of(default_gguf, kind)
    raw = default_gguf.raw(tensor)
    expected = torch.from_numpy(dequantize(raw, kind).reshape(tensor.shape).astype(np.float32))
    assert torch.equal(decode(raw, kind, tensor.shape), expected)


@pytest.mark.parametrize("kind", [T.F16, T.BF16, T.Q8_0])
def test_decoders_equal_gguf_package_on_quantized_random_values(kind):
    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = quantize(values, kind)
    assert kind in FAST_TYPES
    expected = torch.from_numpy(dequantize(raw, kind).reshape(8, 64).astype(np.float32))
    assert torch.equal(decode(raw, kind, (8, 64)), expected)


def test_q4_k_layers_stay_4_bit_and_match_their_blocks(default_gguf):
    config = config_from_gguf(default_gguf)
    layers = int4_layers_from_q4_k(default_gguf, config)
    q4_k = [t for t in default_gguf.tensors.values() if t.kind == T.Q4_K]
    assert len(layers) == len(q4_k) > 0
    tensor = q4_k[0]
    layer = layers[f"model.layers.{tensor.name.split('.')[1]}.mlp.down_proj"]
    assert isinstance(layer, Int4Linear) and layer.group_size == 32
    weight = torch.from_numpy(dequantize(default_gguf.raw(tensor), T.Q4_K).reshape(tensor.shape).astype(np.float32))
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0))
    reference = x @ weight.t()
    direct = (layer(x) - reference).abs().max().item()
    # Re-quantizing the decoded floats into int4 (the route for other types) loses more than the direct mapping.
    q, s, z = quantize_int4(weight, 32)
    requantized = (Int4Linear(q, s, z, 32, None)(x) - reference).abs().max().item()
    assert direct < 0.02 * reference.abs().max().item()
    assert direct < requantized
