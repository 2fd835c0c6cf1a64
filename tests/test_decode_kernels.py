"""The native decode-step kernels against torch's own operations (F.rms_norm, SDPA over gathered
K/V), which stay the path on CPUs without the kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenkit.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="native kernels need x86-64 AVX-512 VNNI and a compiler")


@pytest.mark.parametrize("shape", [(1, 896), (7, 64), (3, 5, 40)])
def test_rms_norm_matches_torch(shape):
    x = torch.randn(shape) * 3
    weight = torch.randn(shape[-1])
    expected = F.rms_norm(x.double(), weight.shape, weight.double(), 1e-6).float()
    torch.testing.assert_close(cpu_kernels().rms_norm(x, weight, 1e-6), expected, rtol=1e-5, atol=1e-5)


def reference_decode(q, k_pool, v_pool, slots, lengths, scale, window):
    """Each sequence alone: gather its keys and values, SDPA with GQA expanded by hand."""
    out = []
    group = q.shape[1] // k_pool.shape[1]
    for b in range(q.shape[0]):
        first = max(0, int(lengths[b]) - window) if window else 0
        used = slots[b, first : int(lengths[b])]
        keys = k_pool[used].float().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, L, D]
        values = v_pool[used].float().repeat_interleave(group, 1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b][:, None, :].double(), keys.double(), values.double(), scale=scale)
        out.append(o.reshape(-1).float())
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
# The AVX-512 build's 64- and 128-value heads run in passes of 4 or 2 query heads, then the rest.
@pytest.mark.parametrize("heads, kv_heads, dim", [(14, 2, 64), (14, 2, 128), (12, 4, 64), (10, 2, 80)])
def test_paged_decode_attention_matches_sdpa(dtype, window, heads, kv_heads, dim):
    torch.manual_seed(0)
    pool = 200
    k_pool = torch.randn(pool, kv_heads, dim).to(dtype)
    v_pool = torch.randn(pool, kv_heads, dim).to(dtype)
    lengths = torch.tensor([1, 17, 40])
    slots = torch.zeros(3, 40, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):  # scattered, as a block table leaves them
        slots[b, :n] = torch.randperm(pool)[:n]
    q = torch.randn(3, heads, dim)
    got = cpu_kernels().paged_decode_attention(q, k_pool, v_pool, slots, lengths, 0.125, window)
    torch.testing.assert_close(got, reference_decode(q, k_pool, v_pool, slots, lengths, 0.125, window), rtol=1e-4, atol=1e-5)


def test_paged_decode_attention_softmax_over_long_and_sharp_scores():
    """The vectorised exp of the softmax: scores over hundreds of positions, from a flat spread to
    one so sharp that most weights underflow to 0, with lengths off the 8-lane stride."""
    torch.manual_seed(1)
    heads, kv_heads, dim, pool = 4, 1, 64, 700
    k_pool, v_pool = torch.randn(pool, kv_heads, dim), torch.randn(pool, kv_heads, dim)
    lengths = torch.tensor([8, 300, 613])
    slots = torch.stack([torch.randperm(pool)[:613] for _ in range(3)])
    for sharpness in (0.01, 1.0, 40.0):
        q = torch.randn(3, heads, dim) * sharpness
        got = cpu_kernels().paged_decode_attention(q, k_pool, v_pool, slots, lengths, 0.125, 0)
        torch.testing.assert_close(got, reference_decode(q, k_pool, v_pool, slots, lengths, 0.125, 0), rtol=1e-4, atol=1e-5)


def test_paged_decode_attention_refuses_a_bad_length():
    q = torch.randn(1, 2, 16)
    pool = torch.randn(4, 1, 16)
    with pytest.raises(RuntimeError, match="length"):
        cpu_kernels().paged_decode_attention(q, pool, pool, torch.zeros(1, 4, dtype=torch.long), torch.tensor([5]), 1.0, 0)


def test_rotary_matches_rotate_half():
    x = torch.randn(5, 3, 64)
    cos, sin = torch.randn(5, 64), torch.randn(5, 64)
    half = 32
    expected = x * cos[:, None, :] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None, :]
    torch.testing.assert_close(cpu_kernels().rotary(x, cos, sin), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_writes_the_slots_as_index_put(dtype):
    """store_kv against torch's own conversion and scatter; other slots stay untouched."""
    kernels = cpu_kernels()
    k_pool, v_pool = torch.randn(40, 2, 64).to(dtype), torch.randn(40, 2, 64).to(dtype)
    k, v = torch.randn(5, 2, 64) * 100, torch.randn(5, 2, 64)
    slots = torch.tensor([3, 17, 0, 39, 8])
    expected_k, expected_v = k_pool.clone(), v_pool.clone()
    expected_k[slots], expected_v[slots] = k.to(dtype), v.to(dtype)
    kernels.store_kv(k, v, k_pool, v_pool, slots)
    assert torch.equal(k_pool, expected_k) and torch.equal(v_pool, expected_v)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.store_kv(k, v, k_pool, v_pool, torch.tensor([3, 17, 0, 40, 8]))


@pytest.mark.parametrize("window", [None, 100])
def test_prompt_attention_split_over_two_threads_gives_the_same_bits(window, monkeypatch):
    """With torch on one thread and 2 kernel threads (a GGUF model's prompt step), a prefill chunk's
    attention runs half its KV heads on a helper thread: each head as the single call computes it."""
    from qwenkit.engine import paged_attention
    from qwenkit.model.attention import causal_attention

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_kernels().set_kernel_threads(2)
    calls = []
    monkeypatch.setattr(paged_attention, "causal_attention", lambda q, *args: calls.append(q.shape[1]) or causal_attention(q, *args))
    try:
        torch.manual_seed(0)
        q, k, v = torch.randn(256, 14, 64), torch.randn(1000, 2, 64), torch.randn(1000, 2, 64)
        q_positions, k_positions = torch.arange(744, 1000), torch.arange(1000)
        split = paged_attention._prefill_attention(q, k, v, q_positions, k_positions, 0.125, window)
    finally:
        torch.set_num_threads(threads)
        cpu_kernels().set_kernel_threads(0)
    assert sorted(calls) == [7, 7]  # two halves of the 14 query heads
    assert torch.equal(split, causal_attention(q, k, v, q_positions, k_positions, 0.125, window))
    # by hand, in float64: each query sees the keys at or before its position (and within the window)
    seen = k_positions[None, :] <= q_positions[:, None]
    if window is not None:
        seen &= k_positions[None, :] > q_positions[:, None] - window
    keys, values = k.double().repeat_interleave(7, 1), v.double().repeat_interleave(7, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * 0.125
    weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    exact = torch.einsum("hqk,khd->qhd", weights, values).reshape(256, -1)
    torch.testing.assert_close(split.double(), exact, rtol=1e-4, atol=1e-5)
