"""qwenkit's four architectures give transformers' logits (fp32, eager) to 1e-4."""

import pytest
import torch

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.model_runner import ModelRunner
from qwenkit.engine.paged_attention import PagedKVCache
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.scheduler import ScheduledSequence
from qwenkit.engine.sequence import Sequence
from qwenkit.model.attention import NoCache
from qwenkit.weights.loader import load_model
from tiny_models import ARCHITECTURES, save_tiny

TOL = 1e-4
PROMPT = torch.tensor([5, 17, 250, 3, 99, 42, 7, 180, 64, 11, 299, 0, 128, 77, 31, 2, 260, 45, 90, 13, 8, 150, 201, 6, 33, 72, 140, 19, 222, 58, 3, 101, 17, 44, 9, 280, 12, 66, 190, 25])


def qwenkit_logits_full(model, ids):
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, NoCache(pos)))


def qwenkit_logits_stepwise(model, ids, prefill: int, block_size: int = 4):
    """Logits of positions prefill-1 .. T-1: one prefill chunk, then a token at a time through the paged cache.

    Small blocks make the sequence span many of them, and a second sequence (the prompt reversed)
    shares every batch, so paging and batching must not change the numbers.
    """
    cfg = model.config
    cache = PagedKVCache(cfg.num_hidden_layers, 64, block_size, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    blocks = BlockManager(64, block_size, enable_prefix_caching=False)
    runner = ModelRunner(model, cache)
    full = [ids.tolist(), ids.flip(0).tolist()]
    seqs = [Sequence(i, str(i), 0, list(tokens), len(tokens), SamplingParams()) for i, tokens in enumerate(full)]
    for seq in seqs:
        blocks.allocate(seq)
    rows = []
    for end in range(prefill, len(ids) + 1):
        batch = []
        for seq, tokens in zip(seqs, full):
            seq.token_ids = tokens[:end]  # so that this step's last token is the one sampled from
            batch.append(ScheduledSequence(seq, end - seq.num_computed_tokens))
        rows.append(runner.run(batch)[0])
        for seq in seqs:
            seq.num_computed_tokens = end
    return torch.stack(rows)


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
    assert (stepwise - expected[6:]).abs().max().item() < TOL


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
    assert (qwenkit_logits_stepwise(loaded.model, PROMPT, 5) - expected[4:]).abs().max().item() < TOL
