"""The native GGUF kernels against the gguf package (llama.cpp's reference decoders).

Dequantization must be bit-equal. The matrix product quantizes activations to int8 in blocks of
32 (as llama.cpp does), so it is checked twice: against the same computation written in torch
(x rounded the same way, then float64 products with the gguf package's weights), tightly; and
against the float product, within the error that quantizing x costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from qwenkit.kernels import cpu_kernels, supported_isas
from qwenkit.quantization import gguf_linear
from qwenkit.quantization.gguf_linear import GGUFEmbedding, GGUFLinear

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="native GGUF kernels need a C++ compiler")

SMALL_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


def int8_activations(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x as the kernel sees it: per block of values (32 for the 32-value types, as llama.cpp's Q8_0;
    256 for the K-quants, as its Q8_K), scale = max|x| / 127, codes rounded half to even."""
    blocks = x.reshape(x.shape[0], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def check_product(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, kind: Q | None = None) -> None:
    block = 256 if kind in K_QUANTS else 32
    same_rounding = int8_activations(x, block).double() @ weight.double().T
    assert (y - same_rounding).abs().max() <= 1e-5 * same_rounding.abs().max()
    exact = x.double() @ weight.double().T
    assert (y - exact).abs().max() <= 2e-2 * exact.abs().max()


def gguf_blocks(kind: Q, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = quantize(weights, kind)
    return torch.from_numpy(blocks), torch.from_numpy(dequantize(blocks, kind))


@pytest.mark.parametrize("kind", SMALL_TYPES)
@pytest.mark.parametrize("cols", [96, 256])  # 96: a last half step of 32 values; 256: the packed layout
def test_block_linear_matches_gguf_package(kind, cols):
    blocks, weight = gguf_blocks(kind, 48, cols)
    layer = GGUFLinear(blocks, kind, cols)
    assert layer.packed == (cols % 64 == 0)
    assert torch.equal(layer.dequantized_weight(), weight)
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, cols)
        check_product(layer(x), x, weight)


@pytest.mark.parametrize("kind", SMALL_TYPES)
def test_many_tokens_take_the_float_path_exactly(kind, monkeypatch):
    blocks, weight = gguf_blocks(kind, 40, 128)
    bias = torch.randn(40)
    monkeypatch.setattr(gguf_linear, "DENSE_CHUNK_VALUES", 16 * 128)  # several row chunks
    monkeypatch.setattr(gguf_linear, "dense_dtype", lambda: torch.float32)
    layer = GGUFLinear(blocks, kind, 128, bias)
    x = torch.randn(gguf_linear.KERNEL_MAX_TOKENS + 5, 128, generator=torch.Generator().manual_seed(0))
    # against the exact product: two float32 sums of 128 products each may differ by a few ulps
    # of the larger terms, which over 80,000 outputs once reached 1.3e-5 against each other
    exact = (x.double() @ weight.double().T + bias.double()).float()
    torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", SMALL_TYPES)  # the K-quants: test_real_file_blocks
def test_bfloat16_rows_are_the_values_rounded_to_nearest_even(kind):
    blocks, weight = gguf_blocks(kind, 24, 256, seed=3)
    layer = GGUFLinear(blocks, kind, 256)
    out = torch.empty(24, 256, dtype=torch.bfloat16)
    cpu_kernels().dequantize_into(layer.blocks, int(kind), out, layer.packed)
    assert torch.equal(out, weight.bfloat16())  # torch's own float32 -> bfloat16 cast rounds to nearest even


@pytest.mark.parametrize("kind", [Q.Q5_0, Q.Q8_0])
def test_many_tokens_in_bfloat16(kind, monkeypatch):
    """Where the CPU multiplies bfloat16, long prompts do: the product of the bfloat16-rounded
    operands, within bfloat16's rounding of the output."""
    blocks, weight = gguf_blocks(kind, 40, 256)
    monkeypatch.setattr(gguf_linear, "DENSE_CHUNK_VALUES", 16 * 256)
    monkeypatch.setattr(gguf_linear, "dense_dtype", lambda: torch.bfloat16)
    layer = GGUFLinear(blocks, kind, 256)
    x = torch.randn(gguf_linear.KERNEL_MAX_TOKENS + 5, 256)
    y = layer(x)
    assert y.dtype == torch.float32
    rounded = x.bfloat16().double() @ weight.bfloat16().double().T
    assert (y - rounded).abs().max() <= 2**-8 * rounded.abs().max()


@pytest.mark.real_model
def test_real_file_blocks(default_gguf):
    """Every block type of the embedded model: bit-equal values and a checked product."""
    gguf, tensors = default_gguf
    assert {t.kind for t in tensors} >= {Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}
    for tensor in tensors:
        raw = np.array(gguf.raw(tensor)[:64])  # 64 rows are plenty and keep the test fast
        weight = torch.from_numpy(dequantize(raw, tensor.kind))
        layer = GGUFLinear(torch.from_numpy(raw), tensor.kind, tensor.shape[1])
        assert torch.equal(layer.dequantized_weight(), weight), tensor.kind.name
        rounded = torch.empty(weight.shape, dtype=torch.bfloat16)
        cpu_kernels().dequantize_into(layer.blocks, int(tensor.kind), rounded, layer.packed)
        assert torch.equal(rounded, weight.bfloat16()), tensor.kind.name
        x = torch.randn(2, tensor.shape[1])
        check_product(layer(x), x, weight, tensor.kind)


@pytest.fixture(scope="module")
def default_gguf():
    from qwenkit.weights.default_model import ensure_assembled
    from qwenkit.formats.gguf_reader import GGUFFile

    gguf = GGUFFile(ensure_assembled())
    first = {}
    for tensor in gguf.tensors.values():
        if len(tensor.shape) == 2 and tensor.kind not in first:
            first[tensor.kind] = tensor
    return gguf, list(first.values())


def test_embedding_reads_rows_exactly():
    blocks, weight = gguf_blocks(Q.Q5_0, 100, 64)
    ids = torch.tensor([[3, 99, 3], [0, 50, 7]])
    torch.testing.assert_close(GGUFEmbedding(blocks, Q.Q5_0, 64)(ids), weight[ids], rtol=0, atol=0)


def _mapped_kib(path) -> int:
    """This process's resident KiB of the file mapped from `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.real_model
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_embedding_lookups_let_their_file_pages_go(default_gguf):
    """Each lookup in a mapped file would keep 64 KiB around each row it read (the kernel's
    fault-around): 200 far-apart tokens, ~13 MiB. The embedding drops them after each lookup and
    still reads the file's values."""
    gguf, _ = default_gguf
    tensor = gguf.tensors["token_embd.weight"]
    blocks = torch.from_numpy(gguf.raw(tensor))
    ids = torch.arange(200) * 750
    expected = torch.from_numpy(dequantize(np.array(gguf.raw(tensor)[ids.numpy()]), tensor.kind))
    gguf.release(tensor)
    kept, dropped = GGUFEmbedding(blocks, tensor.kind, tensor.shape[1]), GGUFEmbedding(blocks, tensor.kind, tensor.shape[1], drop_pages=gguf.page_dropper(tensor))
    before = _mapped_kib(gguf.path)
    got = torch.cat([dropped(ids[i : i + 1]) for i in range(len(ids))])
    after_dropping = _mapped_kib(gguf.path)
    torch.cat([kept(ids[i : i + 1]) for i in range(len(ids))])
    after_keeping = _mapped_kib(gguf.path)
    gguf.release(tensor)
    assert torch.equal(got, expected)
    assert after_dropping - before < 256
    assert after_keeping - after_dropping > 200 * 16  # the case the dropping avoids, measured alike


@pytest.mark.parametrize("tied, head_packed, drops", [(False, True, True), (True, True, True), (True, False, False)])
def test_embedding_drops_its_pages_unless_the_output_reads_them(tmp_path, monkeypatch, tied, head_packed, drops):
    """The embedding lets go of its mapped pages after each lookup, except when a tied output
    projection reads the same mapped bytes every step (not repacked): dropping them there would
    fault the whole matrix back in each step."""
    from tiny_gguf import write_tiny_gguf
    from tiny_models import reference_model, tiny_config, tiny_tokenizer

    from qwenkit.weights.loader import load_model

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(reference_model(tiny_config("qwen2", tied=tied)), path, tiny_tokenizer(), embedding_type=Q.Q8_0)
    if not head_packed:
        monkeypatch.setattr(gguf_linear, "packs", lambda *args, **kwargs: False)
    model = load_model(str(path), quantize="gguf").model
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)
    assert not tied or model.lm_head.packed == head_packed
    assert (model.model.embed_tokens.drop_pages is not None) == drops


def test_wrong_row_length_is_refused():
    blocks, _ = gguf_blocks(Q.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="do not make rows of 96"):
        GGUFLinear(blocks, Q.Q8_0, 96)
    with pytest.raises(ValueError):
        GGUFLinear(blocks, Q.F16, 64)


# ---- Batched products and every instruction set -------------------------------------------------

K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ALL_TYPES = [*SMALL_TYPES, *K_QUANTS]
# Where each K-quant block keeps its fp16 scales (d, and dmin where it has one): ggml-common.h
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
ISAS = supported_isas()


def k_quant_blocks(kind: Q, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks of a K-quant type (the gguf package only decodes them): random bytes with
    sane fp16 scales, and the gguf package's values of them."""
    block_values, block_bytes = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    for at in K_QUANT_SCALES[kind]:
        scale = rng.uniform(0.001, 0.01, (rows, cols // block_values, 1)).astype(np.float16)
        raw[..., at : at + 2] = scale.view(np.uint8)
    raw = raw.reshape(rows, -1)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, kind))


def any_blocks(kind: Q, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return k_quant_blocks(kind, rows, cols, seed) if kind in K_QUANTS else gguf_blocks(kind, rows, cols, seed)


def stored(kernels, blocks: torch.Tensor, kind: Q, cols: int) -> tuple[torch.Tensor, bool]:
    """(rows, packed) as `kernels` reads them (as pack_if_packable does for the default build): the
    32-value types packed (in groups of 8 or 16 rows where the build packs them so), any type a build
    packs in groups of rows too; the rest as the file stores them."""
    if (kind in SMALL_TYPES and cols % 64 == 0) or (kind not in SMALL_TYPES and kernels.packed_group_rows(int(kind)) > 1):
        return kernels.pack(blocks, int(kind), cols), True
    return blocks, False


@pytest.fixture(scope="module", params=ISAS)
def kernels(request):
    module = cpu_kernels(request.param)
    if module is None:
        pytest.skip(f"the {request.param} kernels could not be built")
    return module


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("cols", [512, 896])
def test_batched_product_is_each_token_alone(kernels, kind, cols):
    """T tokens in one call: each row of the result is bit for bit that token's own product,
    and all of them match the gguf package's values within int8 activation rounding. (896: a
    row of 28 blocks, whose last scales are read eight at a time past the row's blocks; 70 rows:
    eight-row groups with a tail.)"""
    if kind in K_QUANTS and cols % 256:
        cols = 768
    blocks, weight = any_blocks(kind, 70, cols, seed=5)
    rows, packed = stored(kernels, blocks, kind, cols)
    for tokens in (2, 3, 7, 16, 48):
        x = torch.randn(tokens, cols)
        y = kernels.matmul(x, rows, int(kind), packed)
        for t in range(tokens):
            assert torch.equal(y[t], kernels.matmul(x[t : t + 1], rows, int(kind), packed)[0]), (kind.name, tokens, t)
        check_product(y, x, weight, kind)


# Bytes that hold codes (not scales) per block, by type: every code at its largest value.
CODE_BYTES = {Q.Q4_0: range(2, 18), Q.Q4_1: range(4, 20), Q.Q5_0: range(2, 22), Q.Q5_1: range(4, 24),
              Q.Q2_K: range(16, 80), Q.Q3_K: range(0, 96), Q.Q4_K: range(16, 144), Q.Q5_K: range(16, 176),
              Q.Q6_K: range(0, 192)}


@pytest.mark.parametrize("kind", list(CODE_BYTES))
def test_largest_codes_against_largest_activations_do_not_saturate(kernels, kind):
    """Every code at its maximum against activations that all quantize to +127 or -127: the
    kernels' int16 sums of VPMADDUBSW results are at their bound, and the products still match
    the gguf package's values (alone and in a batch that takes the interleaved path)."""
    cols = 512
    block_values, block_bytes = GGML_QUANT_SIZES[kind]
    blocks, _ = any_blocks(kind, 24, cols, seed=3)
    raw = blocks.numpy().reshape(24, cols // block_values, block_bytes).copy()
    raw[..., list(CODE_BYTES[kind])] = 0xFF
    raw = raw.reshape(24, -1)
    weight = torch.from_numpy(dequantize(raw, kind))
    rows, packed = stored(kernels, torch.from_numpy(raw), kind, cols)
    for sign in (1.0, -1.0):
        x = torch.full((8, cols), 3.0 * sign)
        y = kernels.matmul(x, rows, int(kind), packed)
        check_product(y, x, weight, kind)
        assert torch.equal(y[0], kernels.matmul(x[:1], rows, int(kind), packed)[0])


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("cols", [96, 512])
def test_every_instruction_set_gives_the_same_values(kernels, kind, cols):
    """Forced AVX2 / portable builds: the same packed bytes where they pack the same layout (the
    AVX2 build packs the unsigned 32-value types in groups of 8 rows, with a tail of the row
    layout: 46 rows are 5 groups and 6 rows), bit-equal dequantization to the
    gguf package; products equal to the best build's up to float summation order."""
    if kind not in SMALL_TYPES and cols % 256:
        pytest.skip("K-quant rows are whole 256-value blocks")
    best = cpu_kernels(ISAS[0])
    blocks, weight = any_blocks(kind, 46, cols, seed=9)
    rows, packed = stored(kernels, blocks, kind, cols)
    best_rows, best_packed = stored(best, blocks, kind, cols)
    if packed and best_packed and kernels.packed_group_rows(int(kind)) == best.packed_group_rows(int(kind)):
        assert torch.equal(rows, best_rows)  # one layout, the same bytes
    values = torch.empty(46, cols)
    kernels.dequantize_into(rows, int(kind), values, packed)
    assert torch.equal(values, weight)
    rounded = torch.empty(46, cols, dtype=torch.bfloat16)
    kernels.dequantize_into(rows, int(kind), rounded, packed)
    assert torch.equal(rounded, weight.bfloat16())
    x = torch.randn(5, cols)
    y, reference = kernels.matmul(x, rows, int(kind), packed), best.matmul(x, best_rows, int(kind), best_packed)
    assert (y - reference).abs().max() <= 1e-5 * reference.abs().max()
    check_product(y, x, weight, kind)


def test_grouped_product_is_each_weight_alone(kernels):
    """matmul_group: several weights of different types on one input (a layer's q, k, v: Q5_0,
    Q5_0, Q8_0; with a K-quant, whose activations are quantized in 256-value blocks) give, bit
    for bit, each weight's own product plus its bias; with silu_mul, silu(gate) * up of those
    products within float rounding (the kernels' exp against torch's)."""
    cols = 512
    kinds = [Q.Q5_0, Q.Q5_0, Q.Q8_0, Q.Q4_K]
    weights = [any_blocks(kind, rows, cols, seed=20 + i)[0] for i, (kind, rows) in enumerate(zip(kinds, [70, 33, 33, 40]))]
    layers, packed = map(list, zip(*(stored(kernels, w, kind, cols) for w, kind in zip(weights, kinds))))
    biases = [torch.randn(70), torch.empty(0), torch.randn(33), torch.empty(0)]
    for tokens in (1, 3, 17):
        x = torch.randn(tokens, cols)
        outs = kernels.matmul_group(x, layers, [int(k) for k in kinds], packed, biases, False)
        assert len(outs) == 4
        for out, w, kind, p, bias in zip(outs, layers, kinds, packed, biases):
            alone = kernels.matmul(x, w, int(kind), p)
            assert torch.equal(out, alone + bias if bias.numel() else alone), (kind.name, tokens)
    up_layer = kernels.pack(any_blocks(Q.Q5_0, 70, cols, seed=40)[0], int(Q.Q5_0), cols)
    for tokens, scale in ((1, 1.0), (5, 1.0), (3, 300.0)):  # x300: gates far into both tails of silu
        x = torch.randn(tokens, cols) * scale
        gate, up = kernels.matmul(x, layers[0], int(Q.Q5_0), True), kernels.matmul(x, up_layer, int(Q.Q5_0), True)
        fused = kernels.matmul_group(x, [layers[0], up_layer], [int(Q.Q5_0)] * 2, [True, True], [torch.empty(0)] * 2, True)
        assert len(fused) == 1
        torch.testing.assert_close(fused[0], torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6 * scale)


def test_grouped_product_refuses_mismatched_weights(kernels):
    blocks = kernels.pack(gguf_blocks(Q.Q8_0, 8, 256)[0], int(Q.Q8_0), 256)
    other = kernels.pack(gguf_blocks(Q.Q8_0, 9, 256)[0], int(Q.Q8_0), 256)
    x = torch.randn(1, 256)
    with pytest.raises(RuntimeError, match="gate and an up weight"):
        kernels.matmul_group(x, [blocks, other], [int(Q.Q8_0)] * 2, [True, True], [torch.empty(0)] * 2, True)
    with pytest.raises(RuntimeError, match="one value per output row"):
        kernels.matmul_group(x, [blocks], [int(Q.Q8_0)], [True], [torch.randn(3)], False)
    with pytest.raises(RuntimeError, match="in_features"):
        kernels.matmul_group(torch.randn(1, 128), [blocks], [int(Q.Q8_0)], [True], [torch.empty(0)], False)


def test_gguf_layers_run_grouped_as_one_by_one():
    """GGUFLinear.forward_group / forward_silu_mul, as the decoder calls them (model.layers.project),
    against the layers called one at a time (and the torch ops after them)."""
    from qwenkit.model.layers import project

    layers = [GGUFLinear(*gguf_blocks(kind, rows, 256, seed=i)[:1], kind, 256, bias=torch.randn(rows) if i == 0 else None)
              for i, (kind, rows) in enumerate([(Q.Q5_0, 64), (Q.Q5_0, 16), (Q.Q8_0, 16)])]
    with torch.inference_mode():
        x = torch.randn(2, 256)
        for grouped, alone in zip(project(x, layers), [layer(x) for layer in layers]):
            assert torch.equal(grouped, alone)
        gate, up = layers[1], GGUFLinear(gguf_blocks(Q.Q5_0, 16, 256, seed=7)[0], Q.Q5_0, 256)
        torch.testing.assert_close(GGUFLinear.forward_silu_mul(x, gate, up), torch.nn.functional.silu(gate(x)) * up(x),
                                   rtol=1e-6, atol=1e-6)
        many = torch.randn(gguf_linear.KERNEL_MAX_TOKENS + 1, 256)  # the dense path: the hooks decline, layer by layer
        assert GGUFLinear.forward_group(many, layers) is None and GGUFLinear.forward_silu_mul(many, gate, up) is None
        for grouped, alone in zip(project(many, layers), [layer(many) for layer in layers]):
            assert torch.equal(grouped, alone)


def test_every_instruction_set_gives_the_same_decode_ops(kernels):
    best = cpu_kernels(ISAS[0])
    x, weight = torch.randn(3, 896), torch.randn(896)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), best.rms_norm(x, weight, 1e-6), rtol=1e-6, atol=1e-6)
    q, cos, sin = torch.randn(4, 3, 64), torch.randn(4, 64), torch.randn(4, 64)
    torch.testing.assert_close(kernels.rotary(q, cos, sin), best.rotary(q, cos, sin), rtol=1e-6, atol=1e-6)
    pool = torch.randn(50, 2, 64, dtype=torch.float16)
    slots = torch.randperm(50)[None, :30].repeat(2, 1)
    q = torch.randn(2, 14, 64)
    lengths = torch.tensor([30, 11])
    torch.testing.assert_close(kernels.paged_decode_attention(q, pool, pool, slots, lengths, 0.125, 0),
                               best.paged_decode_attention(q, pool, pool, slots, lengths, 0.125, 0), rtol=1e-5, atol=1e-6)


def test_row_max_is_torch_max(kernels):
    """The greedy sampler's row maxima: the same values and first indices as torch.max, ties,
    infinities and NaN (the first NaN wins) included, on rows longer and shorter than a vector."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1003, generator=g)
    x[1, ::7] = x[1].max() + 1  # ties: the first one
    x[2, 500], x[2, 40], x[2, 999] = float("nan"), float("nan"), float("nan")
    x[3] = float("-inf")
    x[4, 1001] = float("inf")
    x[5, 1002] = x[5].max() + 1  # in the tail past the last full vector
    x[6, 1002] = float("nan")
    x[7, 33] = x[7, 20] = x[7].max() + 1  # tied in two vector lanes: the later lane holds the first index
    for rows in (x, torch.randn(4, 5, generator=g), torch.randn(2, 1, generator=g)):
        values, indices = kernels.row_max(rows)
        expected_values, expected_indices = rows.max(-1)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(values.isnan(), expected_values.isnan())
        assert torch.equal(values[~values.isnan()], expected_values[~expected_values.isnan()])


def test_forced_instruction_sets_give_the_same_logits(tmp_path, monkeypatch):
    """A tiny GGUF model decoded token by token through each build's kernels (QWENKIT_ISA)."""
    import qwenkit.kernels as kernel_builds
    from test_models_vs_transformers import PROMPT, qwenkit_logits_stepwise
    from tiny_gguf import write_tiny_gguf
    from tiny_models import reference_model, tiny_config, tiny_tokenizer

    from qwenkit.weights.loader import load_model

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(reference_model(tiny_config("qwen2", tied=True)), path, tiny_tokenizer(), embedding_type=Q.Q8_0)
    logits = {}
    for isa in ISAS:
        monkeypatch.setenv("QWENKIT_ISA", isa)
        kernel_builds.kernel_isa.cache_clear()
        kernel_builds.cpu_kernels.cache_clear()
        assert kernel_builds.cpu_kernels() is cpu_kernels(isa)
        model = load_model(str(path), quantize="gguf").model  # packed by this build, in its layout
        logits[isa] = qwenkit_logits_stepwise(model, PROMPT, 9)
    kernel_builds.kernel_isa.cache_clear()
    kernel_builds.cpu_kernels.cache_clear()
    # The builds' products differ in float summation order (~1e-7 relative) and every layer
    # requantizes its input to int8: an activation that sits on a rounding boundary can round the
    # other way in one build and move later logits by ~1% (measured: the AVX-512 build against
    # itself with its products perturbed by 2e-7 relative, 1 seed in 4). So the logits agree within
    # the int8 activations' error, as check_product's bound against the exact product; each
    # product is compared tightly across builds by test_every_instruction_set_gives_the_same_values.
    best = logits[ISAS[0]]
    for isa, values in logits.items():
        assert (values - best).abs().max() <= 2e-2 * best.abs().max(), isa


def test_an_unknown_instruction_set_is_refused(monkeypatch):
    import qwenkit.kernels as kernel_builds
    from qwenkit.errors import QwenkitError

    monkeypatch.setenv("QWENKIT_ISA", "avx9000")
    kernel_builds.kernel_isa.cache_clear()
    try:
        with pytest.raises(QwenkitError, match="QWENKIT_ISA"):
            kernel_builds.kernel_isa()
    finally:
        monkeypatch.delenv("QWENKIT_ISA")
        kernel_builds.kernel_isa.cache_clear()


@pytest.mark.parametrize("kind", [*SMALL_TYPES, Q.Q4_K])
def test_tensor_parallel_cuts_of_packed_rows_keep_their_values(kind):
    """GGUFLinear.narrow and GGUFExperts.narrow_intermediate on weights of 70 rows, packed (on the
    AVX2 build: 8 groups of 8 rows and 6 rows in the row layout; on the AVX-512 builds: 4 tile
    groups of 16 rows and 6 rows) or the file's (Q4_K): each cut
    holds exactly the gguf package's values of its rows or columns, and its product is that of
    those values; a row cut that would split a group is refused."""
    from qwenkit.quantization.gguf_experts import GGUFExperts

    blocks, weight = any_blocks(kind, 70, 512, seed=31)
    layer = GGUFLinear(blocks, kind, 512)
    x = torch.randn(3, 512)
    columns = ((1, 256, 256),) if kind in K_QUANTS else ((1, 64, 256), (1, 448, 64))
    for dim, start, length in (*columns, (0, 16, 32), (0, 64, 6), (0, 0, 70)):
        cut = layer.narrow(dim, start, length)
        expected = weight.narrow(dim, start, length)
        assert torch.equal(cut.dequantized_weight(), expected), (dim, start, length)
        inputs = x[:, start : start + length] if dim == 1 else x
        check_product(cut(inputs), inputs, expected, kind)
    if gguf_linear.group_rows(kind, layer.packed) > 1:
        with pytest.raises(ValueError, match=f"groups of {gguf_linear.group_rows(kind, layer.packed)} rows"):
            layer.narrow(0, 4, 16)
    # Two experts of 2 units of intermediate features (gate, up: 2 units of rows of 512; down: 512
    # rows of 2 units), the second unit of each kept
    unit = 256 if kind in K_QUANTS else 64
    gate, gate_w = any_blocks(kind, 4 * unit, 512, seed=32)
    down, down_w = any_blocks(kind, 1024, 2 * unit, seed=33)
    experts = GGUFExperts(gate.view(2, 2 * unit, -1), gate.view(2, 2 * unit, -1), down.view(2, 512, -1), (kind, kind, kind), 512)
    assert experts.column_unit == unit
    shard = experts.narrow_intermediate(unit, unit)
    for e in range(2):
        got = gguf_linear.dequantize_rows(shard.gate_blocks[e], kind, 512, shard.gate_kind[2])
        assert torch.equal(got, gate_w.view(2, 2 * unit, 512)[e, unit:])
        got = gguf_linear.dequantize_rows(shard.down_blocks[e], kind, unit, shard.down_kind[2])
        assert torch.equal(got, down_w.view(2, 512, 2 * unit)[e, :, unit:])


@pytest.mark.parametrize("kind", [Q.Q5_0, Q.Q8_0, Q.Q4_K])
def test_no_tokens_give_an_empty_product(kernels, kind):
    """A product of no tokens is [0, rows] (the eight-row paths must not decode rows for nobody)."""
    blocks, _ = any_blocks(kind, 24, 512, seed=41)
    rows, packed = stored(kernels, blocks, kind, 512)
    assert kernels.matmul(torch.empty(0, 512), rows, int(kind), packed).shape == (0, 24)
