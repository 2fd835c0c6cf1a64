"""MoE GGUFs with the experts in their blocks: GGUFExperts against transformers on the file's own
(dequantized) values, the grouped dispatch against a per-expert float reference, and the memory a
load + forward costs against the file's size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from qwenkit.kernels import cpu_kernels
from qwenkit.weights.loader import load_model
from test_models_vs_transformers import PROMPT, TOL, qwenkit_logits_full, qwenkit_logits_stepwise
from tiny_gguf import write_tiny_gguf
from tiny_models import reference_model, tiny_config, tiny_tokenizer

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="GGUF blocks in place need the native kernels")

EXPERT_TYPES = {"q8_0": (Q.Q8_0, Q.Q8_0, Q.Q8_0), "k_quants": (Q.Q4_K, Q.Q4_K, Q.Q6_K)}


def moe_config(arch: str, experts: int = 8, layers: int = 3, dense_layers: tuple[int, ...] = (1,)):
    """tiny_config's MoE with rows K-quants can hold (multiples of 256 values)."""
    cfg = tiny_config(arch)
    cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_hidden_layers = 256, 256, experts, layers
    cfg.mlp_only_layers = list(dense_layers)
    cfg.num_experts_per_tok = min(4, experts)
    return cfg


@pytest.mark.parametrize("types", EXPERT_TYPES)
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_experts_run_in_their_blocks(arch, types, tmp_path, monkeypatch):
    from qwenkit.model.moe import SparseMoeBlock
    from qwenkit.quantization import gguf_linear
    from qwenkit.quantization.gguf_experts import GGUFExperts

    ref = reference_model(moe_config(arch))
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(ref, path, tiny_tokenizer(), expert_types=EXPERT_TYPES[types])
    with torch.inference_mode():
        expected = ref(PROMPT[None]).logits[0]
    model = load_model(str(path), quantize="gguf").model
    moe_layers = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    assert len(moe_layers) == 2  # layer 1 is dense (mlp_only_layers)
    for block in moe_layers:
        assert isinstance(block.experts, GGUFExperts)
        assert block.experts.kinds == EXPERT_TYPES[types]
    # Decoding: the kernels' int8 activations, as llama.cpp's (a router near-tie may flip one expert).
    errors = (qwenkit_logits_stepwise(model, PROMPT, 9) - expected[8:]).abs().amax(-1) / expected.abs().max()
    assert errors.median() < 0.02
    # Many tokens per expert take the dense path on the exact dequantized values.
    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 0)
    monkeypatch.setattr(gguf_linear, "dense_dtype", lambda: torch.float32)
    assert (qwenkit_logits_full(model, PROMPT) - expected).abs().max().item() < TOL


def float_expert(blocks, kinds, expert: int, hidden: int, inter: int):
    """Expert `expert` of stacked GGUF blocks as a float SwiGLU MLP on the dequantized values
    (ggml's dequantization, checked against the gguf package in test_gguf_blocks)."""
    from qwenkit.model.layers import MLP
    from qwenkit.quantization.gguf_linear import dequantize_rows

    mlp = MLP(hidden, inter)
    with torch.no_grad():
        for linear, b, k, cols in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), blocks, kinds, (hidden, hidden, inter)):
            linear.weight.copy_(dequantize_rows(b[expert], k, cols))
    return mlp


def test_grouped_experts_equal_each_expert_alone(tmp_path):
    """GGUFExperts.grouped on rows sorted by expert: each expert's rows are that expert's float MLP
    of them (dequantized weights), within int8 activation rounding; empty experts are skipped."""
    from qwenkit.quantization.gguf_experts import GGUFExperts
    from qwenkit.quantization.gguf_linear import block_matmul, native_kernels
    from tiny_gguf import _k_quantize

    experts, hidden, inter = 5, 256, 256
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(experts, rows, cols, generator=g) / cols**0.5 for rows, cols in ((inter, hidden), (inter, hidden), (hidden, inter))]
    kinds = (Q.Q8_0, Q.Q4_K, Q.Q6_K)
    blocks = [torch.from_numpy(_k_quantize(w.numpy(), k) if k != Q.Q8_0 else quantize(w.numpy(), k)) for w, k in zip(weights, kinds)]
    module = GGUFExperts(*blocks, kinds, hidden)
    counts = [3, 0, 1, 7, 2]
    x = torch.randn(sum(counts), hidden, generator=g)
    y = module.grouped(x, counts)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        with torch.no_grad():
            want = float_expert(blocks, kinds, e, hidden, inter)(x[start : start + n])
        torch.testing.assert_close(y[start : start + n], want, atol=0.03 * want.abs().max().item(), rtol=0)
        # The one native call against the same kernels called expert by expert: the products are
        # the same; SwiGLU's exp differs from torch's by ~1e-7, which may move one int8 rounding.
        kernel = lambda rows, name: block_matmul(rows, getattr(module, f"{name}_blocks")[e], *getattr(module, f"{name}_kind"))  # noqa: E731
        rows = x[start : start + n]
        alone = kernel(torch.nn.functional.silu(kernel(rows, "gate")) * kernel(rows, "up"), "down")
        torch.testing.assert_close(y[start : start + n], alone, atol=2e-3 * alone.abs().max().item(), rtol=0)
        start += n
    with pytest.raises(RuntimeError, match="counts add up to 13, not the 12 rows"):
        native_kernels().experts_mlp(x[:12], counts, module.gate_blocks, module.up_blocks, module.down_blocks,
                                     [k for k, _, _ in (module.gate_kind, module.up_kind, module.down_kind)],
                                     [p for _, _, p in (module.gate_kind, module.up_kind, module.down_kind)])


def test_experts_with_many_rows_take_the_dense_path_alone(monkeypatch):
    """A prompt routed unevenly: the experts past KERNEL_MAX_TOKENS rows go through the dense path
    one by one and the others through the kernels in one call; each row is bit for bit what the
    all-kernel call (kernel experts) or the all-dense path (dense experts) gives it."""
    from qwenkit.quantization import gguf_linear
    from qwenkit.quantization.gguf_experts import GGUFExperts
    from tiny_gguf import _k_quantize

    experts, hidden, inter = 4, 256, 256
    g = torch.Generator().manual_seed(1)
    kinds = (Q.Q4_K, Q.Q4_K, Q.Q6_K)
    blocks = [torch.from_numpy(_k_quantize((torch.randn(experts, rows, cols, generator=g) / cols**0.5).numpy(), k))
              for (rows, cols), k in zip(((inter, hidden), (inter, hidden), (hidden, inter)), kinds)]
    module = GGUFExperts(*blocks, kinds, hidden)
    counts = [2, 9, 0, 3]
    x = torch.randn(sum(counts), hidden, generator=g)
    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 1 << 20)
    kernel = module.grouped(x, counts)
    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 0)
    dense = module.grouped(x, counts)
    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 3)  # expert 1's 9 rows are "many"
    mixed = module.grouped(x, counts)
    many = torch.zeros(sum(counts), dtype=torch.bool)
    many[2:11] = True
    # The two paths round differently on both sets of rows, so the test can tell which one ran.
    assert (kernel[many] != dense[many]).any() and (kernel[~many] != dense[~many]).any()
    starts = [0, 2, 11, 11, 14]
    with torch.no_grad():  # and each expert's rows are its float MLP of them, within int8 rounding
        for e in (0, 1, 3):
            want = float_expert(blocks, kinds, e, hidden, inter)(x[starts[e] : starts[e + 1]])
            torch.testing.assert_close(mixed[starts[e] : starts[e + 1]], want, atol=0.03 * want.abs().max().item(), rtol=0)
    assert torch.equal(mixed[many], dense[many]) and torch.equal(mixed[~many], kernel[~many])


_PEAK_RSS = """
import json, sys, torch
from qwenkit.model.attention import NoCache
from qwenkit.weights.loader import load_model

def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def load_and_run(path: str) -> None:
    model = load_model(path, quantize="gguf").model
    with torch.inference_mode():
        for tokens in (64, 1, 1, 1):  # a prompt, then decode steps
            ids = torch.randint(0, 300, (tokens,))
            pos = torch.arange(tokens)
            model.compute_logits(model(ids, pos, NoCache(pos)))

# A tiny MoE GGUF first: the kernels, torch's code pages and the tokenizer's library are the
# runtime's, paid once per process whatever the model's size.
load_and_run(sys.argv[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS (VmHWM) restarts from the current RSS
before = status("VmRSS")
load_and_run(sys.argv[2])
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def test_peak_memory_is_about_the_file(tmp_path):
    """Loading and running a MoE GGUF of ~80 MB (128 experts at hidden 512: Q8_0 gate repacked,
    Q4_K up and Q6_K down mapped) raises the process's peak RSS by at most 1.3x the file: no expert
    is widened to float, and a repacked tensor's mapped pages are let go."""
    from random_gguf import MoeShape, write_random_moe_gguf

    types = (Q.Q8_0, Q.Q4_K, Q.Q6_K)
    warm, path = tmp_path / "warm.gguf", tmp_path / "moe.gguf"
    write_random_moe_gguf(warm, MoeShape(layers=1, hidden=256, experts=4, active=2, moe_intermediate=256, heads=2, kv_heads=1, head_dim=128), types)
    shape = MoeShape(layers=2, hidden=512, experts=128, active=8, moe_intermediate=256, heads=4, kv_heads=2, head_dim=128)
    write_random_moe_gguf(path, shape, types)
    size = path.stat().st_size
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(warm), str(path)], capture_output=True, text=True, env=env, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert size > 50e6
    print(f"peak RSS increase {(rss['peak'] - rss['before']) / size:.2f}x the file ({size / 1e6:.0f} MB)")
    assert rss["peak"] - rss["before"] <= 1.3 * size, (rss, size)
