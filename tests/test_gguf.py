"""GGUF files: llama.cpp's tensor layout for all four architectures, dequantized exactly."""

import pytest
import torch

from qwenkit.weights.loader import load_model
from test_models_vs_transformers import PROMPT, TOL, qwenkit_logits_full, qwenkit_logits_stepwise
from tiny_gguf import write_tiny_gguf
from tiny_models import ARCHITECTURES, reference_model, tiny_config, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_gguf_matches_transformers(arch, tmp_path):
    ref = reference_model(tiny_config(arch, yarn=(arch == "qwen3"), tied=(arch == "qwen2")))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path, tiny_tokenizer())
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    loaded = load_model(str(path), "float32")
    assert loaded.config.model_type == arch
    assert loaded.config.tie_word_embeddings == (arch == "qwen2")
    assert (qwenkit_logits_full(loaded.model, PROMPT) - expected).abs().max().item() < TOL
    assert (qwenkit_logits_stepwise(loaded.model, PROMPT, 9) - expected[8:]).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_gguf_blocks_in_place(arch, tmp_path, monkeypatch):
    """--quantize gguf: the blocks run in place. Through the float path (many tokens) the model is
    exact; through the kernel (few tokens: decoding) activations are int8, as in llama.cpp."""
    from gguf import GGMLQuantizationType

    from qwenkit.kernels import cpu_kernels
    from qwenkit.quantization import gguf_linear

    if cpu_kernels() is None:
        pytest.skip("native GGUF kernels need x86-64 AVX-512 VNNI and a compiler")
    tied = arch == "qwen2"
    ref = reference_model(tiny_config(arch, tied=tied))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path, tiny_tokenizer(), embedding_type=GGMLQuantizationType.Q8_0)
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    loaded = load_model(str(path), quantize="gguf")
    model = loaded.model
    assert isinstance(model.model.embed_tokens, gguf_linear.GGUFEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, gguf_linear.GGUFLinear)
    assert isinstance(model.lm_head, gguf_linear.GGUFLinear) == tied  # untied: a BF16 output stays float
    stepwise = qwenkit_logits_stepwise(model, PROMPT, 9)
    errors = (stepwise - expected[8:]).abs().amax(-1) / expected.abs().max()
    # int8 activations cost ~1% here. In a MoE a router's near-tie may flip one expert at some
    # position, which moves that position's logits more: there only most positions are checked.
    assert errors.median() < 0.02
    if not arch.endswith("moe"):
        assert errors.max() < 0.03
    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 0)
    monkeypatch.setattr(gguf_linear, "dense_dtype", lambda: torch.float32)
    assert (qwenkit_logits_full(model, PROMPT) - expected).abs().max().item() < TOL
    monkeypatch.setattr(gguf_linear, "dense_dtype", lambda: torch.bfloat16)  # what AVX512-BF16 CPUs take
    assert (qwenkit_logits_full(model, PROMPT) - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_native_decode_stack_gives_the_layers_bits(arch, tmp_path, monkeypatch):
    """A decode step's layers in one native call (model/native_decode.py) give the logits of the
    layers run one by one, bit for bit: Qwen2's q/k/v biases, Qwen3's q/k norms, the MoE blocks'
    routing, experts and Qwen2-MoE's gated shared expert, a paged cache of many small blocks and a
    second sequence in every step. A hook on a layer's module sends the
    step down the layer-by-layer path, where the hook runs."""
    from gguf import GGMLQuantizationType

    from qwenkit.kernels import cpu_kernels
    from qwenkit.model import qwen

    if cpu_kernels() is None:
        pytest.skip("native GGUF kernels need a compiler")
    ref = reference_model(tiny_config(arch))
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path, tiny_tokenizer(), embedding_type=GGMLQuantizationType.Q8_0)
    model = load_model(str(path), quantize="gguf").model
    native, taken = qwen.native_decode_layers, []

    def spy(*args):
        out = native(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(qwen, "native_decode_layers", spy)
    stacked = qwenkit_logits_stepwise(model, PROMPT, 9)
    assert taken == [False] + [True] * (len(PROMPT) - 9)  # the prefill goes layer by layer
    # and both are transformers' logits (on the file's dequantized weights) within what int8
    # activations cost, as test_tiny_gguf_blocks_in_place checks the layer-by-layer path
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    errors = (stacked - expected[8:]).abs().amax(-1) / expected.abs().max()
    assert errors.median() < 0.02
    monkeypatch.setattr(qwen, "native_decode_layers", lambda *args: None)
    assert torch.equal(stacked, qwenkit_logits_stepwise(model, PROMPT, 9))

    monkeypatch.setattr(qwen, "native_decode_layers", spy)
    taken.clear()
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    try:
        hooked = qwenkit_logits_stepwise(model, PROMPT, 9)
    finally:
        handle.remove()
    assert not any(taken) and len(seen) == len(taken)
    assert torch.equal(hooked, stacked)
