"""qwenkit's four architectures give transformers' logits (fp32, eager) to 1e-4."""

import pytest
import torch

from qwenkit.model.attention import ContiguousKVCache, NoCache
from qwenkit.weights.loader import load_model
from tiny_models import ARCHITECTURES, save_tiny

TOL = 1e-4
PROMPT = torch.tensor([5, 17, 250, 3, 99, 42, 7, 180, 64, 11, 299, 0, 128, 77, 31, 2, 260, 45, 90, 13, 8, 150, 201, 6, 33, 72, 140, 19, 222, 58, 3, 101, 17, 44, 9, 280, 12, 66, 190, 25])


def qwenkit_logits_full(model, ids):
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, NoCache(pos)))


def qwenkit_logits_stepwise(model, ids, prefill: int):
    """Prefill `prefill` tokens, then decode the rest one at a time through the KV cache."""
    cfg = model.config
    cache = ContiguousKVCache(cfg.num_hidden_layers, len(ids), cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    rows = []
    with torch.inference_mode():
        for chunk in (ids[:prefill], *ids[prefill:].split(1)):
            pos = torch.arange(cache.length, cache.length + len(chunk))
            rows.append(model.compute_logits(model(chunk, pos, cache)))
            cache.advance(len(chunk))
    return torch.cat(rows)


@pytest.mark.parametrize("yarn", [False, True], ids=["default-rope", "yarn"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch, yarn, tmp_path):
    ref = save_tiny(arch, tmp_path, yarn=yarn, tied=(arch == "qwen2"))
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    loaded = load_model(str(tmp_path), "float32")
    assert loaded.config.rope.rope_type == ("yarn" if yarn else "default")

    full = qwenkit_logits_full(loaded.model, PROMPT)
    assert (full - expected).abs().max().item() < TOL

    stepwise = qwenkit_logits_stepwise(loaded.model, PROMPT, prefill=7)
    assert (stepwise - expected).abs().max().item() < TOL


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    ref = save_tiny("qwen2", tmp_path, tied=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = load_model(str(tmp_path), "float32")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    assert (qwenkit_logits_full(loaded.model, PROMPT) - expected).abs().max().item() < TOL


def test_yarn_changes_the_logits(tmp_path):
    """Guard against YaRN silently being ignored: the two rope settings must differ."""
    save_tiny("qwen3", tmp_path / "a", yarn=False)
    save_tiny("qwen3", tmp_path / "b", yarn=True)
    a = qwenkit_logits_full(load_model(str(tmp_path / "a")).model, PROMPT)
    b = qwenkit_logits_full(load_model(str(tmp_path / "b")).model, PROMPT)
    assert (a - b).abs().max().item() > 1e-2


def test_bfloat16_mode_is_close(tmp_path):
    ref = save_tiny("qwen3_moe", tmp_path)
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    loaded = load_model(str(tmp_path), "bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    got = qwenkit_logits_full(loaded.model, PROMPT)
    # bf16 keeps ~3 significant digits; the argmax must mostly agree.
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree > 0.8


def test_sliding_window_layers_match_transformers(tmp_path):
    """Qwen2 with use_sliding_window: layers from max_window_layers on see only the last 8 keys."""
    from tiny_models import reference_model, tiny_config, tiny_tokenizer

    cfg = tiny_config("qwen2")
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 8, 1
    cfg.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    ref = reference_model(cfg)
    ref.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    loaded = load_model(str(tmp_path))
    assert loaded.config.layer_types[1] == "sliding_attention" and loaded.config.sliding_window == 8
    assert (qwenkit_logits_full(loaded.model, PROMPT) - expected).abs().max().item() < TOL
    assert (qwenkit_logits_stepwise(loaded.model, PROMPT, 5) - expected).abs().max().item() < TOL
