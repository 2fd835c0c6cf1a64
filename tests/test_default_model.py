"""The embedded default (Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF) against transformers' fp32 reference.

The reference outputs come from tests/fixtures/make_default_model_reference.py (transformers
loading the same GGUF takes over a minute, too slow to repeat on every run).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenkit.engine import LLM, EngineConfig, SamplingParams
from qwenkit.model.attention import NoCache

REF = np.load(Path(__file__).parent / "fixtures" / "default_model_reference.npz")
META = json.loads(str(REF["meta"]))

pytestmark = pytest.mark.real_model


def last_logits(model, ids):
    ids = torch.tensor(ids)
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, NoCache(pos))[-1])


def test_tensor_types_are_the_quantized_ones(default_model):
    from gguf import GGUFReader

    kinds = {t.tensor_type.name for t in GGUFReader(default_model.path).tensors}
    assert kinds == {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"}


def test_chat_prompt_tokens_match_transformers(default_model):
    tok = default_model.tokenizer
    for i, prompt in enumerate(META["chat_prompts"]):
        text = tok.chat_template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert tok.encode(text) == REF[f"chat{i}_prompt_ids"].tolist()
    assert tok.encode(META["raw_prompt"]) == REF["raw_prompt_ids"].tolist()


@pytest.mark.parametrize("key", ["chat0", "raw"])
def test_last_position_logits_match_transformers(default_model, key):
    ids = REF[f"{key}_prompt_ids"].tolist()
    expected = torch.from_numpy(REF[f"{key}_last_logits"])
    got = last_logits(default_model.model, ids)
    assert (got - expected).abs().max().item() < 1e-3


@pytest.fixture(scope="module")
def llm(default_model):
    return LLM(default_model)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_greedy_tokens_match_transformers(llm, i):
    expected = REF[f"chat{i}_greedy_ids"].tolist()
    params = SamplingParams(max_tokens=META["greedy_tokens"], temperature=0)
    out = llm.generate(REF[f"chat{i}_prompt_ids"].tolist(), params)[0].outputs[0]
    assert out.token_ids == expected


def test_streamed_text_equals_full_decode(llm):
    """Chinese output streamed piece by piece reassembles into exactly the decoded text."""
    params = SamplingParams(max_tokens=32, temperature=0)
    steps = list(llm.stream(REF["chat1_prompt_ids"].tolist(), params))
    deltas = [s.outputs[0].delta_text for s in steps]
    streamed = "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)
    final = steps[-1].outputs[0]
    assert final.finish_reason == "stop"
    assert streamed == final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_chat_turn_reuses_cached_prefix(llm):
    """A second turn that extends the first is served mostly from the prefix cache, with the same tokens."""
    history = [{"role": "user", "content": "Name a prime number, then explain in two sentences why it is prime."}]
    params = SamplingParams(max_tokens=24, temperature=0)
    answer = llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
    warm = llm.chat(history, params)[0]
    assert warm.metrics.num_cached_tokens >= 48
    cold = LLM(llm.engine.loaded, engine_config=EngineConfig(enable_prefix_caching=False)).chat(history, params)[0]
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_seeded_sampling_is_reproducible(llm):
    ids = REF["chat0_prompt_ids"].tolist()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    a = llm.generate(ids, params)[0].outputs[0].token_ids
    b = llm.generate(ids, params)[0].outputs[0].token_ids
    assert a == b


SIXTEEN = [
    "What is the capital of France?", "Write a Python function that adds two numbers.", "2+2=?",
    "用中文说你好。", "Name three colors.", "What does HTTP stand for?", "Translate 'cat' to Spanish.",
    "Give me a prime number.", "What is recursion?", "Say hi in Japanese.", "List two sorting algorithms.",
    "What is 7 times 8?", "Write a SQL query selecting all rows from users.", "What language is Rust?",
    "Explain a linked list in one sentence.", "What is the boiling point of water in Celsius?",
]


def test_sixteen_prompts_together_equal_each_alone(llm):
    """Continuous batching in fp32 does not change any greedy token (checked on half of the prompts,
    the Chinese one and the shortest among them, against a run alone: the batch's rows all take the
    same path)."""
    params = SamplingParams(max_tokens=10, temperature=0)
    conversations = [[{"role": "user", "content": p}] for p in SIXTEEN]
    together = llm.chat(conversations, params)
    alone = LLM(llm.engine.loaded, engine_config=EngineConfig(enable_prefix_caching=False))  # nothing shared
    for i in (0, 2, 3, 5, 7, 10, 12, 15):
        conversation, out = conversations[i], together[i]
        assert out.outputs[0].token_ids == alone.chat(conversation, params)[0].outputs[0].token_ids
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


# The default mode (blocks in place, int8 activations as in llama.cpp) against the same reference.
@pytest.mark.parametrize("key", ["chat0", "raw"])
def test_gguf_mode_last_logits_near_transformers(gguf_model, key):
    from qwenkit.quantization.gguf_linear import GGUFLinear

    assert isinstance(gguf_model.model.lm_head, GGUFLinear)
    ids = REF[f"{key}_prompt_ids"].tolist()
    expected = torch.from_numpy(REF[f"{key}_last_logits"])
    got = last_logits(gguf_model.model, ids)
    assert got.argmax() == expected.argmax()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # measured: 0.019


@pytest.mark.parametrize("i", [0, 1, 2])
def test_gguf_mode_greedy_tokens_start_as_transformers(gguf_model, i):
    expected = REF[f"chat{i}_greedy_ids"].tolist()[:16]
    params = SamplingParams(max_tokens=16, temperature=0)
    out = LLM(gguf_model).generate(REF[f"chat{i}_prompt_ids"].tolist(), params)[0].outputs[0]
    assert out.token_ids == expected
