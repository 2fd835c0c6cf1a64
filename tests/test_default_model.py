"""The embedded default (Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF) against transformers' fp32 reference.

The reference outputs come from tests/fixtures/make_default_model_reference.py (transformers
loading the same GGUF takes over a minute, too slow to repeat on every run).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenkit.engine.generate import Generator
from qwenkit.engine.sampling_params import SamplingParams
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
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert tok.encode(text) == REF[f"chat{i}_prompt_ids"].tolist()
    assert tok.encode(META["raw_prompt"]) == REF["raw_prompt_ids"].tolist()


@pytest.mark.parametrize("key", ["chat0", "raw"])
def test_last_position_logits_match_transformers(default_model, key):
    ids = REF[f"{key}_prompt_ids"].tolist()
    expected = torch.from_numpy(REF[f"{key}_last_logits"])
    got = last_logits(default_model.model, ids)
    assert (got - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("i", [0, 1, 2])
def test_greedy_tokens_match_transformers(default_model, i):
    expected = REF[f"chat{i}_greedy_ids"].tolist()
    gen = Generator(default_model)
    params = SamplingParams(max_tokens=META["greedy_tokens"], temperature=0)
    got = [step.token_id for step in gen.stream(REF[f"chat{i}_prompt_ids"].tolist(), params)]
    assert got == expected


def test_streamed_text_equals_full_decode(default_model):
    """Chinese output streamed piece by piece reassembles into exactly the decoded text."""
    gen = Generator(default_model)
    steps = list(gen.stream(REF["chat1_prompt_ids"].tolist(), SamplingParams(max_tokens=32, temperature=0)))
    streamed = "".join(s.text for s in steps)
    assert "\ufffd" not in streamed
    ids = [s.token_id for s in steps if s.finish_reason != "stop"]
    assert streamed == default_model.tokenizer.decode(ids, skip_special_tokens=True)
    assert steps[-1].finish_reason == "stop"


def test_chat_turn_reuses_cached_prefix(default_model):
    """A second turn that extends the first gives the same tokens as a cold start."""
    tok = default_model.tokenizer
    history = [{"role": "user", "content": "Name a prime number."}]
    warm = Generator(default_model)
    params = SamplingParams(max_tokens=8, temperature=0)
    answer = "".join(s.text for s in warm.stream(tok.encode(tok.apply_chat_template(history)), params))
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]
    ids = tok.encode(tok.apply_chat_template(history))
    warm_tokens = [s.token_id for s in warm.stream(ids, params)]
    assert warm.cache.length > len(ids) // 2  # most of the prompt came from the cache
    cold_tokens = [s.token_id for s in Generator(default_model).stream(ids, params)]
    assert warm_tokens == cold_tokens


def test_seeded_sampling_is_reproducible(default_model):
    ids = REF["chat0_prompt_ids"].tolist()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    a = [s.token_id for s in Generator(default_model).stream(ids, params)]
    b = [s.token_id for s in Generator(default_model).stream(ids, params)]
    assert a == b
