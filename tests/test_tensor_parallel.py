"""Tensor parallelism: two torchrun processes give one process's logits and greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenkit.distributed import ProcessGroup
from qwenkit.engine.llm import LLM
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.tensor_parallel import tensor_parallel_group
from qwenkit.errors import QwenkitError
from qwenkit.model.tensor_parallel import shard_mlp, shard_model
from qwenkit.weights.loader import load_model
from server_process import free_port
from tensor_parallel_run import run
from tiny_gguf import write_tiny_gguf
from tiny_models import reference_model, save_tiny, tiny_config, tiny_tokenizer

HERE = Path(__file__).resolve().parent


def gguf_model(path: Path) -> Path:
    """A dense model whose row-parallel inputs split on the packed layout's 64-value blocks: Q8_0
    o_proj 128 = 64 + 64, Q5_0 down_proj 192 = 64 + 128 (an uneven split of whole blocks)."""
    config = tiny_config("qwen2")
    config.hidden_size, config.intermediate_size = 128, 192
    write_tiny_gguf(reference_model(config), path, tiny_tokenizer())
    return path


def tied_gguf_model(path: Path) -> Path:
    """A dense model whose output projection is its Q8_0 embedding (tied), split by vocabulary rows."""
    from gguf import GGMLQuantizationType as Q

    config = tiny_config("qwen2", tied=True)
    config.hidden_size, config.intermediate_size = 128, 192  # o_proj's and down_proj's inputs split on 64-value runs
    write_tiny_gguf(reference_model(config), path, tiny_tokenizer(), embedding_type=Q.Q8_0)
    return path


def gguf_moe_model(path: Path) -> Path:
    """Qwen2-MoE (with its gated shared expert) whose experts stay in their GGUF blocks: Q4_K
    gate/up, Q6_K down over 512 intermediate features (two 256-value blocks: one per process)."""
    from gguf import GGMLQuantizationType as Q

    from test_moe_gguf import moe_config

    config = moe_config("qwen2_moe", experts=4, layers=2, dense_layers=())
    config.moe_intermediate_size = config.shared_expert_intermediate_size = 512
    write_tiny_gguf(reference_model(config), path, tiny_tokenizer(), expert_types=(Q.Q4_K, Q.Q4_K, Q.Q6_K))
    return path


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(free_port()), *args], capture_output=True, text=True, timeout=120, env=env)


def test_two_processes_equal_one(tmp_path):
    cases = [
        {"path": str(tmp_path / "dense"), "dtype": "float32"},
        {"path": str(tmp_path / "moe"), "dtype": "float32"},  # Qwen2-MoE: experts and the gated shared expert
        {"path": str(gguf_model(tmp_path / "dense.gguf")), "quantize": "gguf"},
        # Drafts verified as extra decode rows: the same tokens as plain decoding.
        {"path": str(tmp_path / "dense"), "dtype": "float32", "speculative": "ngram"},
        {"path": str(gguf_moe_model(tmp_path / "moe.gguf")), "quantize": "gguf"},  # experts in their blocks
        # Loaded whole, then sharded in place (LLM(loaded_model, tensor_parallel_size=2)).
        {"path": str(tmp_path / "dense.gguf"), "quantize": "gguf", "shard_after_load": True},
        # The output projection is the tied Q8_0 embedding's rows, split by vocabulary and gathered.
        {"path": str(tied_gguf_model(tmp_path / "tied.gguf")), "quantize": "gguf"},
    ]
    # The float models agree to fp32 rounding. The GGUF kernels quantize each layer's input to int8
    # per 32 values, as llama.cpp does: a split sum's last-bit difference (1e-6) can move an
    # activation across a rounding step, which moves that position's logits (and the later ones')
    # by up to ~1% of their size; the other positions agree to fp32 rounding.
    tolerance = [1e-5, 1e-5, "int8", 1e-5, "int8", "int8", "int8"]
    save_tiny("qwen2", tmp_path / "dense")
    save_tiny("qwen2_moe", tmp_path / "moe")
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = torchrun(2, str(HERE / "tensor_parallel_run.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for case, atol, two in zip(cases, tolerance, results):
        one = run(case, ProcessGroup())
        errors = (one["logits"] - two["logits"]).abs().amax(-1)  # per position
        if atol == "int8":
            assert errors.median() < 1e-4 and errors.max() < 0.015 * one["logits"].abs().max(), (case, errors)
        else:
            assert errors.max() < atol, case
        assert one["tokens"] == two["tokens"], case
        assert len({tuple(t) for t in one["tokens"][0] + one["tokens"][2]}) > 1  # the prompts do generate differently
    assert results[3]["tokens"] == results[0]["tokens"] and results[3]["drafts"] > 0
    assert torch.equal(results[5]["logits"], results[2]["logits"])  # sharded on load or after: the same shards


def test_a_shards_decode_steps_in_one_native_call_give_the_layers_bits(tmp_path):
    """Under tensor parallelism on one machine, a decode step's layers run in one native call that
    makes each half-layer's sum itself through shared memory (model/native_decode.py): the same
    bits as the layers run one by one with their hooks, dense and MoE (experts in their blocks,
    the gated shared expert)."""
    dense, moe = str(gguf_model(tmp_path / "dense.gguf")), str(gguf_moe_model(tmp_path / "moe.gguf"))
    cases = [{"path": dense, "quantize": "gguf"}, {"path": dense, "quantize": "gguf", "native": False},
             {"path": moe, "quantize": "gguf"}, {"path": moe, "quantize": "gguf", "native": False}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = torchrun(2, str(HERE / "tensor_parallel_run.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for stacked, layered in ((results[0], results[1]), (results[2], results[3])):
        assert sum(stacked["native"]) >= 10 and stacked["native"][-1]  # the decode steps took the stack
        assert len(stacked["steps"]) == len(layered["steps"])
        assert all(torch.equal(a, b) for a, b in zip(stacked["steps"], layered["steps"]))
        assert stacked["tokens"] == layered["tokens"]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (GGUF blocks included), by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def fused_moe_checkpoint(path: Path) -> None:
    """A Qwen2-MoE checkpoint with each layer's experts stored fused, as transformers 5 holds them
    ([experts, 2 x intermediate, hidden] gate_up_proj, [experts, hidden, intermediate] down_proj)."""
    from safetensors.torch import load_file, save_file

    save_tiny("qwen2_moe", path)
    tensors = load_file(path / "model.safetensors")
    fused = {}
    for name in sorted(tensors):
        if ".mlp.experts." not in name:
            fused[name] = tensors[name]
        elif name.endswith(".experts.0.gate_proj.weight"):
            prefix = name.removesuffix(".0.gate_proj.weight")
            count = sum(1 for n in tensors if n.startswith(prefix + ".") and n.endswith(".gate_proj.weight"))
            fused[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]]) for e in range(count)])
            fused[f"{prefix}.down_proj"] = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(count)])
    save_file(fused, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused", "audio", "dense.gguf", "moe.gguf", "tied.gguf"])
def test_a_shard_read_by_itself_is_the_whole_model_cut(kind, tmp_path, monkeypatch):
    """The loader given a process's group reads only that process's runs of each weight (GGUF
    blocks cut in the file's layout, then packed); the result is, byte for byte, the whole model
    loaded and then cut in place, for each rank. Uneven splits included: Q5_0 down_proj 192 = 64 + 128,
    and a 300-token vocabulary's output rows 144 + 156. A safetensors reader cuts every run itself
    (under a multimodal checkpoint's own names too); only experts stored fused are cut after reading."""
    from qwenkit.distributed import Cut

    path = tmp_path / kind
    if kind == "dense.gguf":
        gguf_model(path)
    elif kind == "moe.gguf":
        gguf_moe_model(path)
    elif kind == "tied.gguf":  # the output projection is the Q8_0 embedding's own packed copy: split by rows
        tied_gguf_model(path)
    elif kind == "audio":
        from tiny_multimodal import save_tiny_multimodal_checkpoint

        save_tiny_multimodal_checkpoint("qwen2_audio", path)
    elif kind == "moe_fused":
        fused_moe_checkpoint(path)
    else:
        save_tiny("qwen2" if kind == "dense" else "qwen2_moe", path)
    options = {"quantize": "gguf"} if kind.endswith(".gguf") else {"dtype": "float32"}
    for rank in (0, 1):
        group = ProcessGroup(rank=rank, world_size=2)
        whole = load_model(str(path), **options).model
        shard_model(whole, group)
        cut_after_reading = []
        original = Cut.of
        monkeypatch.setattr(Cut, "of", lambda self, *a: cut_after_reading.append(self) or original(self, *a))
        read = load_model(str(path), **options, tensor_parallel=group).model
        monkeypatch.setattr(Cut, "of", original)
        expected, got = _weights(whole), _weights(read)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected), [n for n in expected if not torch.equal(expected[n], got[n])]
        assert read.model.layers[0].self_attn.num_heads == 2 and read.tensor_parallel == group
        if kind in ("dense", "moe", "audio"):
            assert not cut_after_reading
        if kind == "moe_fused":
            assert len(cut_after_reading) == 2 * 4 * 3  # 2 layers x 4 experts x (gate, up, down)
        if kind in ("dense", "tied.gguf"):  # the output projection splits by vocabulary rows, in groups of 16
            assert read.lm_head.out_features == (144, 156)[rank]
        if rank == 1 and kind == "dense":
            assert "model.layers.0.self_attn.q_proj.bias" in got and got["model.layers.0.self_attn.q_proj.bias"].shape == (32,)


def test_a_gguf_that_cannot_split_on_its_blocks_is_a_clear_error_before_reading(tmp_path):
    """o_proj's input splits by heads: 4 processes of a 4-head model with 32-value heads would
    cut Q8_0 rows stored in runs of 64. The plan refuses it before any block is read."""
    config = tiny_config("qwen2")
    config.hidden_size, config.num_key_value_heads = 128, 4
    write_tiny_gguf(reference_model(config), tmp_path / "m.gguf", tiny_tokenizer())
    with pytest.raises(QwenkitError, match=r"o_proj: tensor parallel size 4 gives each process 32 of its input values, not whole blocks of 64"):
        load_model(str(tmp_path / "m.gguf"), quantize="gguf", tensor_parallel=ProcessGroup(rank=1, world_size=4))


def test_tensor_parallel_refuses_layers_it_cannot_cut_before_reading_weights(tmp_path):
    save_tiny("qwen2", tmp_path)
    with pytest.raises(QwenkitError, match="shards float and GGUF block layers, not --quantize int8"):
        load_model(str(tmp_path), "float32", quantize="int8", tensor_parallel=ProcessGroup(rank=0, world_size=2))


def test_sharding_changes_the_model(tmp_path):
    """Guard: a shard alone is not the model (the all-reduce is what makes two processes equal one)."""
    save_tiny("qwen2", tmp_path)
    loaded = load_model(str(tmp_path), "float32")
    attention = loaded.model.model.layers[0].self_attn
    shard_model(loaded.model, ProcessGroup(rank=1, world_size=2))
    assert (attention.num_heads, attention.num_kv_heads) == (2, 1)
    assert attention.q_proj.out_features == 2 * attention.head_dim and attention.o_proj.bias is None


def test_cli_generate_under_torchrun(tmp_path):
    """`qwenkit generate --tensor-parallel-size 2` under torchrun prints what one process prints, and
    both processes exit cleanly (rank 0 releases the other at exit)."""
    save_tiny("qwen2", tmp_path)
    args = ["generate", "--model", str(tmp_path), "--dtype", "float32", "--temperature", "0", "--max-tokens", "12", "hello"]
    two = torchrun(2, "-m", "qwenkit.cli.main", *args, "--tensor-parallel-size", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    one = LLM(str(tmp_path), "float32").generate("hello", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert two.stdout == one + "\n" and len(one) > 3


def test_size_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    save_tiny("qwen2", tmp_path)
    alone = subprocess.run([sys.executable, "-m", "qwenkit.cli.main", "generate", "--model", str(tmp_path), "--tensor-parallel-size", "2", "hi"],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1
    assert alone.stderr.startswith("error: --tensor-parallel-size 2 needs 2 processes") and "not launched by torchrun" in alone.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(QwenkitError, match="--tensor-parallel-size 4 needs 4 processes, one per shard .torchrun started 2 processes"):
        tensor_parallel_group(4)


def test_gguf_mlp_splits_on_whole_blocks():
    """The default model's Q6_K down_proj rows (4864 = 19 blocks of 256) split 9 + 10 blocks, and
    gate/up follow the same split; a rank keeps exactly its columns' bytes."""
    mlp = load_model(None).model.model.layers[0].mlp
    down, gate = mlp.down_proj.dequantized_weight(), mlp.gate_proj.dequantized_weight()
    shard_mlp(mlp, ProcessGroup(rank=1, world_size=2), "mlp")
    assert torch.equal(mlp.down_proj.dequantized_weight(), down[:, 2304:])
    assert torch.equal(mlp.gate_proj.dequantized_weight(), gate[2304:])
    assert mlp.down_proj.bias is None


def test_heads_that_do_not_split_are_a_clear_error(tmp_path):
    save_tiny("qwen2", tmp_path)
    loaded = load_model(str(tmp_path), "float32")
    with pytest.raises(QwenkitError, match="must divide the model's 4 attention heads and 2 key/value heads"):
        shard_model(loaded.model, ProcessGroup(rank=0, world_size=4))


@pytest.mark.parametrize("types", ["q8_0", "k_quants"])
def test_gguf_experts_split_into_partial_sums(types, tmp_path):
    """Experts in their GGUF blocks split on whole blocks of the intermediate features (Q8_0's packed
    64-value runs, Q6_K's 256); each rank's experts give a partial sum, and the two sum to the whole."""
    from gguf import GGMLQuantizationType as Q

    from qwenkit.model.moe import SparseMoeBlock
    from qwenkit.model.tensor_parallel import shard_moe
    from qwenkit.quantization.gguf_experts import GGUFExperts

    if types == "q8_0":
        path, (block,) = gguf_moe_layers(tmp_path, (Q.Q8_0, Q.Q8_0, Q.Q8_0), intermediate=192)  # 3 runs of 64: 1 + 2
    else:
        path, (block,) = gguf_moe_layers(tmp_path, (Q.Q4_K, Q.Q4_K, Q.Q6_K), intermediate=512)
    assert isinstance(block, SparseMoeBlock) and isinstance(block.experts, GGUFExperts)
    x = torch.randn(5, block.experts.hidden_size, generator=torch.Generator().manual_seed(0))
    counts = [2, 0, 3, 0]
    with torch.inference_mode():
        whole = block.experts.grouped(x, counts)
        parts = []
        for rank in (0, 1):
            shard = load_model(str(path), quantize="gguf").model.model.layers[0].mlp
            shard_moe(shard, ProcessGroup(rank=rank, world_size=2), "mlp")
            assert shard.experts.intermediate_size < block.experts.intermediate_size
            parts.append(shard.experts.grouped(x, counts))
    # The split sum differs from the whole one by float rounding only (the same int8 activations).
    assert (parts[0] + parts[1] - whole).abs().max().item() < 1e-4 * whole.abs().max().item()


def gguf_moe_layers(tmp_path, types, intermediate: int):
    from qwenkit.model.moe import SparseMoeBlock
    from test_moe_gguf import moe_config

    config = moe_config("qwen3_moe", experts=4, layers=1, dense_layers=())
    config.moe_intermediate_size = intermediate
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(reference_model(config), path, tiny_tokenizer(), expert_types=types)
    model = load_model(str(path), quantize="gguf").model
    return path, [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoeBlock)]


_PEAK_OF_LOAD = r"""
import sys
from qwenkit.distributed import ProcessGroup
from qwenkit.weights.loader import load_model

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

before = status("VmRSS")
group = ProcessGroup(rank=1, world_size=2) if sys.argv[2] == "shard" else ProcessGroup()
loaded = load_model(sys.argv[1], sys.argv[3] if sys.argv[3] != "-" else None, tensor_parallel=group)
for tensor in [*loaded.model.parameters(), *loaded.model.buffers()]:  # read every weight (a mapped one is read lazily)
    tensor.float().sum()
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_rank_never_holds_the_whole_model(kind, tmp_path):
    """Loading one rank's shard and reading it peaks at about half the layers' bytes below loading
    the whole model: a rank never holds all of it, not even on the way (a safetensors column run
    reads every page of its tensor, through a map dropped after; GGUF blocks are cut before they
    are packed, and the file's pages let go)."""
    config = tiny_config("qwen2")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1536, 8
    config.layer_types = ["full_attention"] * 8
    model = reference_model(config)
    if kind == "safetensors":
        model.save_pretrained(tmp_path)
        tiny_tokenizer().save_pretrained(tmp_path)
        path, dtype = tmp_path, "float32"
    else:
        path, dtype = tmp_path / "model.gguf", "-"
        write_tiny_gguf(model, path, tiny_tokenizer())
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    peak = {}
    for mode in ("whole", "shard"):
        done = subprocess.run([sys.executable, "-c", _PEAK_OF_LOAD, str(path), mode, dtype], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        peak[mode] = int(done.stdout.split()[-1])
    # KiB. The decoder layers are ~99% of the file; a rank keeps half of them and nothing more.
    size = sum(f.stat().st_size for f in Path(tmp_path).rglob("*.safetensors")) if kind == "safetensors" else path.stat().st_size
    assert peak["whole"] > size // 1024
    assert peak["whole"] - peak["shard"] > 0.42 * size // 1024, (peak, size // 1024)


@pytest.mark.parametrize("shared", [True, False])
def test_sums_and_gathers_across_processes(shared, tmp_path, monkeypatch):
    """The group's sums (each half-layer's partial outputs) and gathers (the vocabulary rows'
    logits) through shared memory on one machine, and through gloo: each equals what one process
    computes from every process's part; the sum's bits are gloo's order (rank 0 + rank 1)."""
    from collectives_run import part

    monkeypatch.setenv("QWENKIT_TP_SHARED_MEMORY", "1" if shared else "0")
    done = torchrun(2, str(HERE / "collectives_run.py"), str(tmp_path / "out.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["shared"] is shared
    for i, shape in enumerate([(1, 896), (16, 896), (3, 5), (1100, 2048)]):
        for repeat in range(3):
            expected = part(0, shape) * (repeat + 1) + part(1, shape) * (repeat + 1)
            assert torch.equal(got[f"sum{i}.{repeat}"], expected), (i, repeat)
    assert torch.equal(got["sum_bf16"], part(0, (4, 8), torch.bfloat16) + part(1, (4, 8), torch.bfloat16))
    for rows in (1, 16, 3000, 200_000):
        key = "gather_big" if rows == 200_000 else f"gather{rows}"
        assert torch.equal(got[key], torch.cat([part(0, (rows, 7)), part(1, (rows, 12))], dim=1)), rows


def test_a_process_left_waiting_fails_within_the_timeout(tmp_path, monkeypatch):
    """A process whose partner never makes the sum (a process of the group failed) fails with a
    clear error after QWENKIT_TP_TIMEOUT seconds instead of waiting forever."""
    monkeypatch.setenv("QWENKIT_TP_TIMEOUT", "2")
    done = torchrun(2, str(HERE / "collectives_run.py"), str(tmp_path / "out.pt"), "abandoned")
    assert done.returncode == 0, done.stderr[-3000:]
    error = torch.load(tmp_path / "out.pt")["error"]
    assert "tensor parallel: process 1 has not reached collective 1 in 2 s" in error and "QWENKIT_TP_TIMEOUT" in error


def test_an_idle_group_waits_for_the_next_step_past_the_collective_timeout(tmp_path, monkeypatch):
    """Between steps the other processes wait for rank 0 without a limit: a server idle for longer
    than the collectives' timeout (here 2 s) keeps its processes (gloo's own limit killed them)."""
    monkeypatch.setenv("QWENKIT_TP_TIMEOUT", "2")
    case = {"path": str(gguf_model(tmp_path / "dense.gguf")), "quantize": "gguf", "pause": 5}
    (tmp_path / "cases.json").write_text(json.dumps([case]))
    done = torchrun(2, str(HERE / "tensor_parallel_run.py"), str(tmp_path / "cases.json"), str(tmp_path / "out.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(tmp_path / "out.pt")[0]["tokens"] == run({**case, "pause": 0}, ProcessGroup())["tokens"]


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_timeout_is_a_clear_error(value, monkeypatch):
    from qwenkit.distributed import collective_timeout

    monkeypatch.setenv("QWENKIT_TP_TIMEOUT", value)
    with pytest.raises(QwenkitError, match=f"QWENKIT_TP_TIMEOUT must be a positive number of seconds, not '{value}'"):
        collective_timeout()


def test_serve_under_torchrun_answers_openai_clients(tmp_path):
    """`qwenkit serve --tensor-parallel-size 2` under torchrun, through the official openai client:
    concurrent and streamed completions give what one process gives; embeddings are refused with
    a clear error; SIGTERM ends both processes."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    from server_process import ServerProcess

    save_tiny("qwen2", tmp_path / "tiny")
    prompts = ["hello", "the sea is", "def f(x):"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [out.outputs[0].text for out in LLM(str(tmp_path / "tiny"), "float32").generate(prompts, params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    server = ServerProcess("--model", str(tmp_path / "tiny"), "--dtype", "float32", "--tensor-parallel-size", "2",
                           launcher=launcher, env=env)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        name = client.models.list().data[0].id

        def complete(prompt: str) -> str:
            return client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(complete, prompts)) == expected
        stream = client.completions.create(model=name, prompt=prompts[1], max_tokens=8, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream) == expected[1]
        with pytest.raises(openai.APIStatusError, match="not computed under tensor parallelism"):
            client.embeddings.create(model=name, input="hello")
    finally:
        server.stop()
    assert server.proc.returncode is not None
