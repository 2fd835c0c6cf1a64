"""Long context: rope scaling given at load time (HF checkpoints and GGUF) gives transformers' logits
beyond the original context; the context limit follows the scaling; impossible contexts fail up front."""

import pytest
import torch
import transformers

from qwenkit.engine.llm_engine import EngineConfig, LLMEngine
from qwenkit.errors import QwenkitError
from qwenkit.weights.context import ContextDoesNotFit
from qwenkit.weights.loader import load_model
from test_models_vs_transformers import qwenkit_logits_full, qwenkit_logits_stepwise
from tiny_gguf import write_tiny_gguf
from tiny_models import save_tiny, tiny_config, tiny_tokenizer

ORIGINAL = 32  # the tiny model's own context
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
PROMPT = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(1))  # reaches 3x past the original
TOL = 1e-4


def yarn_reference(arch: str, trained: torch.nn.Module) -> torch.nn.Module:
    """transformers' model with the same weights and rope_scaling YaRN factor 4 over the original context."""
    config = tiny_config(arch, max_positions=ORIGINAL)
    config.rope_parameters = {"rope_theta": 10000.0, **YARN}
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(trained.state_dict())
    return model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_yarn_given_at_load_matches_transformers_beyond_the_original_context(arch, tmp_path):
    trained = save_tiny(arch, tmp_path, max_positions=ORIGINAL)
    with torch.inference_mode():
        expected = yarn_reference(arch, trained)(PROMPT[None]).logits[0]
        plain = trained(PROMPT[None]).logits[0]
    loaded = load_model(str(tmp_path), "float32", rope_scaling=YARN)
    assert loaded.config.rope.rope_type == "yarn" and loaded.plan.max_model_len == 4 * ORIGINAL
    full = qwenkit_logits_full(loaded.model, PROMPT)
    assert (full - expected).abs().max().item() < TOL
    assert (plain[ORIGINAL:] - expected[ORIGINAL:]).abs().max().item() > 1e-2  # the scaling matters there
    # paged and batched, one prefill chunk then token by token past position 32
    stepwise = qwenkit_logits_stepwise(loaded.model, PROMPT, prefill=20)
    assert (stepwise - expected[19:]).abs().max().item() < TOL


def test_yarn_given_for_a_gguf_matches_transformers(tmp_path):
    trained = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3", max_positions=ORIGINAL)).eval()
    from tiny_models import randomize

    randomize(trained)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(trained, path, tiny_tokenizer())  # the reference now holds the file's (quantized) values
    with torch.inference_mode():
        expected = yarn_reference("qwen3", trained)(PROMPT[None]).logits[0]
    assert load_model(str(path), "float32").plan.max_model_len == ORIGINAL
    loaded = load_model(str(path), "float32", rope_scaling=YARN)
    assert loaded.plan.max_model_len == 4 * ORIGINAL
    assert (qwenkit_logits_full(loaded.model, PROMPT) - expected).abs().max().item() < TOL


def test_context_limits_and_their_errors(tmp_path):
    save_tiny("qwen2", tmp_path, max_positions=ORIGINAL)
    assert load_model(str(tmp_path), "float32").plan.max_model_len == ORIGINAL
    assert load_model(str(tmp_path), "float32", max_model_len=20).plan.max_model_len == 20
    scaled = load_model(str(tmp_path), "float32", max_model_len=100, rope_scaling='{"rope_type":"yarn","factor":4.0}')
    assert scaled.plan.max_model_len == 100 and scaled.config.rope.original_max_position_embeddings == ORIGINAL
    with pytest.raises(QwenkitError, match=r"max_model_len 64 exceeds the model's context of 32 tokens"):
        load_model(str(tmp_path), "float32", max_model_len=64)
    with pytest.raises(QwenkitError, match=r"max_model_len 200 exceeds the model's context of 128 tokens \(32 x yarn factor 4\)"):
        load_model(str(tmp_path), "float32", max_model_len=200, rope_scaling=YARN)
    with pytest.raises(QwenkitError, match="not valid JSON"):
        load_model(str(tmp_path), "float32", rope_scaling="{yarn")
    with pytest.raises(QwenkitError, match="needs a factor"):
        load_model(str(tmp_path), "float32", rope_scaling={"rope_type": "yarn"})
    with pytest.raises(QwenkitError, match="unsupported rope type"):
        load_model(str(tmp_path), "float32", rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_a_context_the_kv_pool_cannot_hold_is_refused_with_the_numbers(tmp_path):
    save_tiny("qwen2", tmp_path, max_positions=ORIGINAL)
    loaded = load_model(str(tmp_path), "float32", rope_scaling=YARN)
    # 3 layers x 2 KV heads x head_dim 16 x K and V x 4 bytes = 768 bytes a token; 128 tokens need 96 KiB
    assert loaded.plan.kv_bytes_per_token == 768 and loaded.plan.context_kv_bytes == 128 * 768
    with pytest.raises(ContextDoesNotFit, match=r"max_model_len 128 needs 0\.00 GiB .*\(0\.75 KiB per token in float32\).* holds 64 tokens"):
        LLMEngine(loaded, EngineConfig(kv_cache_memory=64 * 768, block_size=16))
    LLMEngine(loaded, EngineConfig(kv_cache_memory=128 * 768, block_size=16))  # exactly enough
    plain = load_model(str(tmp_path), "float32")  # nothing asked for: a small pool stays allowed (requests are checked)
    LLMEngine(plain, EngineConfig(kv_cache_memory=16 * 768, block_size=16))


@pytest.mark.parametrize("rows", [7, 1])
@pytest.mark.parametrize("window", [None, 300])
def test_a_long_prompts_chunk_attends_in_row_blocks_with_the_same_bits(window, rows, monkeypatch):
    """A prompt chunk late in a long context attends in blocks of query rows (its mask, as SDPA's
    floats, would otherwise be [chunk, context]: 205 MB for 512 tokens at 100K): the same bits as
    one call, and the attention a float64 softmax gives."""
    from qwenkit.model import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(96, 4, 16, generator=g), torch.randn(1000, 2, 16, generator=g), torch.randn(1000, 2, 16, generator=g)
    q_positions, k_positions = torch.arange(904, 1000), torch.arange(1000)
    whole = attention.causal_attention(q, k, v, q_positions, k_positions, 0.25, window)
    monkeypatch.setattr(attention, "MASK_VALUES", rows * 1000)  # blocks of 7 rows (the last of 5), or of 1
    blocked = attention.causal_attention(q, k, v, q_positions, k_positions, 0.25, window)
    assert torch.equal(blocked, whole) if rows > 1 else torch.allclose(blocked, whole, atol=1e-6)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(2, 1)) * 0.25
    visible = k_positions[None, :] <= q_positions[:, None]
    if window is not None:
        visible &= k_positions[None, :] > q_positions[:, None] - window
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v.double().repeat_interleave(2, 1))
    assert torch.allclose(whole.double(), expected.reshape(96, -1), atol=1e-5)
    assert torch.allclose(blocked.double(), expected.reshape(96, -1), atol=1e-5)  # no row sees a later key
