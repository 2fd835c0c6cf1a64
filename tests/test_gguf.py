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
    assert loaded.config.architecture == arch
    assert loaded.config.tie_word_embeddings == (arch == "qwen2")
    assert (qwenkit_logits_full(loaded.model, PROMPT) - expected).abs().max().item() < TOL
    assert (qwenkit_logits_stepwise(loaded.model, PROMPT, 9) - expected[8:]).abs().max().item() < TOL
