"""The catalog's shapes and memory model against independent numbers: llama.cpp's own Q4_K_M file
(the embedded default) and the parameter counts the checkpoints publish."""

import re

import pytest

from qwenkit.cli.main import main
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.weights.catalog import CATALOG, RECOMMENDED, by_name
from qwenkit.weights.default_model import ensure_assembled
from qwenkit.weights.memory import GIB, fit_text, tensor_type, weight_bytes


@pytest.fixture(scope="module")
def default_gguf():
    return GGUFFile(ensure_assembled())


def test_the_q4_k_m_recipe_gives_every_tensor_the_type_llama_cpp_gave_it(default_gguf):
    shape = by_name("Qwen2.5-Coder-0.5B-Instruct").shape
    predicted = {}
    for name, layer, rows, columns in shape.tensors():
        full = f"{name}.weight" if layer < 0 else f"blk.{layer}.{name}.weight"
        predicted[full] = (tensor_type("Q4_K_M", name, layer, shape.layers, columns), (rows, columns))
    actual = {t.name: (t.kind.name, t.shape) for t in default_gguf.tensors.values() if len(t.shape) == 2}
    assert predicted == actual


def test_weight_bytes_are_the_files_bytes_qwenkit_keeps_resident(default_gguf):
    shape = by_name("Qwen2.5-Coder-0.5B-Instruct").shape
    # every weight matrix in its blocks (the mapped embedding too); norms and biases as float32
    kept = sum(t.n_bytes for t in default_gguf.tensors.values() if len(t.shape) == 2)
    small = sum(4 * t.shape[0] for t in default_gguf.tensors.values() if len(t.shape) == 1)
    assert weight_bytes(shape, "Q4_K_M") == pytest.approx(kept + small, rel=1e-3)


def test_parameter_counts_match_the_published_checkpoints():
    # safetensors parameter counts of the released checkpoints (model cards / the hub's widget)
    assert by_name("Qwen2.5-0.5B-Instruct").params == 494_032_768
    assert by_name("Qwen2.5-7B-Instruct").params == 7_615_616_512
    moe = by_name("Qwen3-30B-A3B")
    assert moe.params == pytest.approx(30.5e9, rel=0.01) and moe.shape.active_params == pytest.approx(3.3e9, rel=0.03)
    assert by_name("Qwen3-235B-A22B").params == pytest.approx(235e9, rel=0.01)
    assert by_name("Qwen3-0.6B").params - 151936 * 1024 == pytest.approx(0.44e9, rel=0.01)  # "non-embedding 0.44B"
    assert by_name("Qwen3-8B").params == pytest.approx(8.2e9, rel=0.01)
    for task, names in RECOMMENDED.items():
        assert all(task in by_name(n).tasks for n in names), task
    assert len({m.name for m in CATALOG}) == len(CATALOG)


def test_fit_text():
    assert fit_text(GIB, 2 * GIB) == "fits"
    assert fit_text(5 * GIB, 3.5 * GIB) == "needs 1.5 GiB more"


def test_models_catalog_for_a_task_recommends_one_that_fits(capsys):
    assert main(["models", "--catalog", "--task", "coding", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("Qwen", "QwQ"))]
    assert rows == [m.name for m in CATALOG if "coding" in m.tasks] and "Qwen2.5-Math-7B-Instruct" not in rows
    assert re.search(r"^memory available here: [\d.]+ GiB", out, re.MULTILINE)
    (rec,) = [line for line in out.splitlines() if line.startswith("coding: ")]
    assert re.match(r"coding: Qwen\S+Coder\S+ \(Q4_K_M, fits: [\d.]+ GiB\)  ->  qwenkit chat -m Qwen/\S+-GGUF:Q4_K_M$", rec), rec
