"""The `qwenkit` command end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from qwenkit.weights.default_model import ensure_assembled
from test_errors import run_cli
from tiny_models import save_tiny

REF = np.load(Path(__file__).parent / "fixtures" / "default_model_reference.npz")


@pytest.mark.real_model
def test_chat_one_shot_on_default_prints_transformers_greedy_reply():
    """README's first command, greedy: stdout is exactly the reply transformers decodes."""
    gguf = ensure_assembled()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    expected = reference.decode(REF["chat0_greedy_ids"], skip_special_tokens=True)
    prompt = json.loads(str(REF["meta"]))["chat_prompts"][0]
    result = run_cli("chat", "-p", prompt, "--temperature", "0", "--max-tokens", "32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_interactive_chat_commands(tmp_path):
    save_tiny("qwen3", tmp_path)
    result = subprocess_chat(tmp_path, "hello\n/reset\nagain\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stderr
    assert result.stdout.count(">>> ") == 4  # prompts for: hello, /reset, again, /exit


def subprocess_chat(model: Path, stdin: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "qwenkit.cli.main", "chat", "--model", str(model), "--max-tokens", "3", "--system", "Be brief."],
        input=stdin, capture_output=True, text=True, timeout=120,
    )


def test_generate_raw_completion_equals_transformers_greedy(tmp_path):
    import torch

    ref = save_tiny("qwen2", tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("the cat sat on")["input_ids"]
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    result = run_cli("generate", "the cat sat on", "--model", str(tmp_path), "--max-tokens", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_bench_reports_throughput_and_latency(tmp_path):
    save_tiny("qwen3", tmp_path)
    result = run_cli("bench", "--model", str(tmp_path), "--num-requests", "4", "--prompt-len", "16", "--output-len", "8")
    assert result.returncode == 0, result.stderr
    assert "(64 prompt tokens, 32 generated)" in result.stdout
    for label in ("output tokens/s", "TTFT p50 / p99", "inter-token p50/p99", "peak memory (RSS)"):
        assert label in result.stdout
