"""Hub ids: GGUF repos by quantization tag, split GGUFs, revisions, the cache, offline errors.

Never the network: a stand-in for the hub's file API on 127.0.0.1 (hub_server.py) serves the
repos, and the real `huggingface_hub` client (HF_ENDPOINT) or `modelscope` client (MODELSCOPE_ENDPOINT)
downloads from it in a subprocess (modelscope keeps its configuration in a process-wide singleton).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hub_server import FakeRepo, serve
from qwenkit.errors import QwenkitError
from qwenkit.model.attention import NoCache
from qwenkit.weights.hub import HubRef, parse_hub_id, select_gguf, select_mmproj
from qwenkit.weights.loader import load_model
from tiny_gguf import write_tiny_gguf
from tiny_models import randomize, save_tiny, tiny_config, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REPO = "Qwen/Tiny-GGUF"
VL_REPO = "Qwen/Tiny-VL-GGUF"
VL_FIXTURES = ROOT / "tests" / "fixtures" / "mmproj_gguf"
LISTING = [
    "README.md",
    "tiny-q8_0.gguf",
    "tiny-Q4_K.gguf",
    "tiny-Q4_K_M-00001-of-00002.gguf",
    "tiny-Q4_K_M-00002-of-00002.gguf",
    "mmproj-tiny-f16.gguf",
]


def test_a_tag_picks_its_file_case_insensitively_and_every_split_part():
    assert select_gguf(LISTING, "Q8_0", REPO) == ["tiny-q8_0.gguf"]
    assert select_gguf(LISTING, "q4_k_m", REPO) == ["tiny-Q4_K_M-00001-of-00002.gguf", "tiny-Q4_K_M-00002-of-00002.gguf"]
    assert select_gguf(LISTING, "Q4_K", REPO) == ["tiny-Q4_K.gguf"]  # not Q4_K_M: the tag is a whole word
    assert select_gguf(LISTING, None, REPO) == select_gguf(LISTING, "Q4_K_M", REPO)  # llama.cpp's default tag
    assert select_gguf(["a/x-F16.gguf", "mmproj-F16.gguf"], None, REPO) == ["a/x-F16.gguf"]  # the only model
    with pytest.raises(QwenkitError, match=r"no GGUF file in Qwen/Tiny-GGUF has the quantization tag 'Q2_K'; available: Q4_K, Q4_K_M, q8_0"):
        select_gguf(LISTING, "Q2_K", REPO)
    with pytest.raises(QwenkitError, match="lists 1 of the 2 parts"):
        select_gguf(LISTING[:4], "Q4_K_M", REPO)
    with pytest.raises(QwenkitError, match="has no .gguf files"):
        select_gguf(["config.json", "model.safetensors"], "Q4_K_M", REPO)


def test_a_gguf_repos_vision_tower_is_chosen_with_its_model():
    assert select_mmproj(LISTING) == "mmproj-tiny-f16.gguf"
    assert select_mmproj(["x-Q4_K_M.gguf", "mmproj-x-f32.gguf", "mmproj-x-F16.gguf", "mmproj-x-q8_0.gguf"]) == "mmproj-x-F16.gguf"
    assert select_mmproj(["x-Q4_K_M.gguf", "mmproj-x-q8_0.gguf", "mmproj-x-bf16.gguf"]) == "mmproj-x-bf16.gguf"
    assert select_mmproj(LISTING[:5]) is None


def test_hub_ids_sources_and_paths(monkeypatch):
    monkeypatch.delenv("QWENKIT_USE_MODELSCOPE", raising=False)
    assert parse_hub_id("hf.co/Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M") == HubRef("Qwen/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M")
    assert parse_hub_id("Qwen/Qwen3-8B", revision="v1.0") == HubRef("Qwen/Qwen3-8B", None, "v1.0")
    assert parse_hub_id("./Qwen/Qwen3-8B") is None and parse_hub_id("/models/x") is None
    monkeypatch.setenv("QWENKIT_USE_MODELSCOPE", "1")
    assert parse_hub_id("Qwen/Qwen3-8B").source == "modelscope"
    assert parse_hub_id("Qwen/Qwen3-8B", source="huggingface").source == "huggingface"
    with pytest.raises(QwenkitError, match="unknown model source"):
        parse_hub_id("Qwen/Qwen3-8B", source="github")


def _logits(model, ids):
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, NoCache(pos)))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in hub with a GGUF repo (a 3-part split Q4_K_M-named model, a one-file Q8_0 one; revision
    v1 has only the Q8_0) and a safetensors repo (src/checkpoint, and a README and onnx/ to leave alone);
    yields (endpoint, HF_HOME, transformers reference, source files)."""
    src = tmp_path_factory.mktemp("repo")
    reference = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3")).eval()
    randomize(reference)
    write_tiny_gguf(reference, src / "tiny-Q4_K_M.gguf", tiny_tokenizer(), split_max_tensors=15)
    write_tiny_gguf(reference, src / "tiny-Q8_0.gguf", tiny_tokenizer())  # same values: the reference already holds them
    parts = sorted(src.glob("tiny-Q4_K_M-*.gguf"))
    assert len(parts) == 3
    gguf_files = {p.name: p for p in [*parts, src / "tiny-Q8_0.gguf"]}
    checkpoint = src / "checkpoint"
    save_tiny("qwen2", checkpoint)
    (src / "README.md").write_text("# Tiny\n")
    (src / "model.onnx").write_bytes(b"onnx")
    extra = {"README.md": src / "README.md", "onnx/model.onnx": src / "model.onnx"}  # not for qwenkit to download
    repos = {
        REPO: FakeRepo({"main": gguf_files, "v1": {"tiny-Q8_0.gguf": src / "tiny-Q8_0.gguf"}}),
        "Qwen/Tiny": FakeRepo({"main": {p.name: p for p in checkpoint.iterdir() if p.is_file()} | extra}),
        VL_REPO: FakeRepo({"main": {"tiny-VL-Q8_0.gguf": VL_FIXTURES / "tiny-qwen2_5_vl-q8_0.gguf",
                                    "mmproj-tiny-VL-f32.gguf": VL_FIXTURES / "mmproj-tiny-qwen2_5_vl-f32.gguf"}}),
    }
    server, endpoint = serve(repos)
    yield endpoint, tmp_path_factory.mktemp("hf_home"), reference, src
    server.shutdown()


def _run(argv, **env):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWENKIT_USE_MODELSCOPE", "MODELSCOPE_"))} | env
    return subprocess.run([sys.executable, *argv], env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)


def _qwenkit(args, endpoint, home, offline=False):
    return _run(["-m", "qwenkit.cli.main", *args], HF_ENDPOINT=endpoint, HF_HOME=str(home), **({"HF_HUB_OFFLINE": "1"} if offline else {}))


def _modelscope(args, endpoint, home, **env):
    """qwenkit (or `-c CODE`) with modelscope's cache, config and the Hugging Face cache in `home`."""
    argv = args if args[0] == "-c" else ["-m", "qwenkit.cli.main", *args]
    return _run(argv, MODELSCOPE_ENDPOINT=endpoint, MODELSCOPE_CACHE=str(home / "modelscope"),
                MODELSCOPE_HOME=str(home / "config"), HF_HOME=str(home / "hf"), **env)


def _snapshot(home, repo, revision="master"):
    return home / "modelscope" / "models" / repo.replace("/", "--") / "snapshots" / revision


def test_pull_by_tag_downloads_every_split_part_and_the_split_model_loads(hub):
    endpoint, home, reference, src = hub
    result = _qwenkit(["pull", f"hf.co/{REPO}:q4_k_m"], endpoint, home)
    assert result.returncode == 0, result.stderr
    first = Path(result.stdout.strip().splitlines()[-1])
    assert first.name == "tiny-Q4_K_M-00001-of-00003.gguf"
    assert sorted(p.name for p in first.parent.iterdir()) == [f"tiny-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    loaded = load_model(str(first), "float32")  # read in place from its three files
    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
    assert (_logits(loaded.model, ids) - expected).abs().max().item() < 1e-4
    from qwenkit.kernels import cpu_kernels

    if cpu_kernels() is not None:  # blocks run in place from the three files: as from one file with the same tensors
        split_blocks = load_model(str(first))
        one_file = load_model(str(src / "tiny-Q8_0.gguf"))  # the same tensors in one file
        assert torch.equal(_logits(split_blocks.model, ids), _logits(one_file.model, ids))
    # offline now: the cached parts are found without the hub
    again = _qwenkit(["pull", f"{REPO}:Q4_K_M"], "http://127.0.0.1:9", home, offline=True)
    assert again.returncode == 0 and Path(again.stdout.strip()) == first, again.stderr


def test_a_mmproj_gguf_repo_brings_its_mmproj_as_llama_cpp_hf_does(hub, tmp_path):
    """`--model owner/repo:TAG` of a VL repo downloads the model and the repo's mmproj, and images work."""
    from PIL import Image

    from qwenkit.engine import LLM, SamplingParams

    endpoint, home, _, _ = hub
    cat = tmp_path / "cat.png"
    Image.effect_noise((100, 70), 60).convert("RGB").save(cat)
    result = _qwenkit(["chat", "--model", f"{VL_REPO}:Q8_0", "-p", "what is it", "--image", str(cat),
                       "--max-tokens", "5", "--temperature", "0"], endpoint, home)
    assert result.returncode == 0, result.stderr
    pulled = _qwenkit(["pull", f"{VL_REPO}:Q8_0"], endpoint, home, offline=True)  # both files are in the cache now
    assert sorted(p.name for p in Path(pulled.stdout.strip()).parent.iterdir()) == ["mmproj-tiny-VL-f32.gguf", "tiny-VL-Q8_0.gguf"]
    llm = LLM(str(VL_FIXTURES / "tiny-qwen2_5_vl-q8_0.gguf"), mmproj=str(VL_FIXTURES / "mmproj-tiny-qwen2_5_vl-f32.gguf"))
    messages = [{"role": "user", "content": [{"type": "image", "image": str(cat)}, {"type": "text", "text": "what is it"}]}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text
    assert result.stdout.rstrip("\n") == expected


def test_revision_pins_what_is_downloaded_and_listed(hub):
    endpoint, home, _, _ = hub
    result = _qwenkit(["pull", REPO, "--revision", "v1"], endpoint, home)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).name == "tiny-Q8_0.gguf"  # v1's only model: no tag needed
    missing = _qwenkit(["pull", REPO, "--revision", "v2"], endpoint, home)
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {REPO}@v2 on the Hugging Face hub: revision not found"
    checkpoint = _qwenkit(["pull", "Qwen/Tiny"], endpoint, home)
    assert checkpoint.returncode == 0 and (Path(checkpoint.stdout.strip()) / "config.json").exists(), checkpoint.stderr
    listing = _qwenkit(["models"], endpoint, home, offline=True)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith(f"{REPO}:Q8_0 ") and " gguf Q8_0 " in line for line in lines), listing.stdout
    assert any(line.startswith("Qwen/Tiny ") and " safetensors " in line for line in lines), listing.stdout


def test_offline_and_uncached_is_one_clear_line(hub):
    endpoint, home, _, _ = hub
    result = _qwenkit(["generate", "hi", "--model", "Qwen/Not-Cached-GGUF:Q4_K_M"], "http://127.0.0.1:9", home, offline=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "error: cannot download Qwen/Not-Cached-GGUF:Q4_K_M from the Hugging Face hub and it is not in the local cache (offline?"
    )
    unknown_tag = _qwenkit(["pull", f"{REPO}:Q2_K"], endpoint, home)
    assert unknown_tag.returncode == 1 and "has the quantization tag 'Q2_K'" in unknown_tag.stderr, unknown_tag.stderr


# ---- ModelScope: the real modelscope client against the stand-in's ModelScope API ------------------


def test_modelscope_pull_by_tag_downloads_every_split_part_and_the_split_model_loads(hub, tmp_path):
    endpoint, _, reference, src = hub
    result = _modelscope(["pull", f"{REPO}:q4_k_m", "--source", "modelscope"], endpoint, tmp_path)
    assert result.returncode == 0, result.stderr
    first = Path(result.stdout.strip().splitlines()[-1])
    parts = [f"tiny-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert first == _snapshot(tmp_path, REPO) / parts[0]
    assert sorted(p.name for p in first.parent.iterdir()) == parts  # neither the Q8_0 nor anything else
    assert all((first.parent / f).read_bytes() == (src / f).read_bytes() for f in parts)
    loaded = load_model(str(first), "float32")
    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
    assert (_logits(loaded.model, ids) - expected).abs().max().item() < 1e-4


def test_modelscope_checkpoint_downloads_only_what_it_needs_and_loads(hub, tmp_path):
    endpoint, _, _, src = hub
    listed = _modelscope(["-c", "from qwenkit.weights.hub import _hub, HubRef; "
                          "print(*_hub('modelscope').list_files(HubRef('Qwen/Tiny', source='modelscope')))"], endpoint, tmp_path)
    checkpoint = sorted(p.name for p in (src / "checkpoint").iterdir())
    assert listed.stdout.split() == sorted([*checkpoint, "README.md", "onnx/model.onnx"]), listed.stderr  # not the onnx/ directory
    result = _modelscope(["pull", "Qwen/Tiny"], endpoint, tmp_path, QWENKIT_USE_MODELSCOPE="1")
    assert result.returncode == 0, result.stderr
    directory = Path(result.stdout.strip())
    assert directory == _snapshot(tmp_path, "Qwen/Tiny")
    assert sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()) == checkpoint
    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    downloaded, local = load_model(str(directory), "float32"), load_model(str(src / "checkpoint"), "float32")
    assert torch.equal(_logits(downloaded.model, ids), _logits(local.model, ids))


def test_modelscope_revision_pins_what_is_downloaded(hub, tmp_path):
    endpoint, _, _, _ = hub
    pinned = _modelscope(["pull", REPO, "--revision", "v1", "--source", "modelscope"], endpoint, tmp_path)
    assert pinned.returncode == 0, pinned.stderr
    assert Path(pinned.stdout.strip()) == _snapshot(tmp_path, REPO, "v1") / "tiny-Q8_0.gguf"  # v1's only model
    assert [p.name for p in _snapshot(tmp_path, REPO, "v1").iterdir()] == ["tiny-Q8_0.gguf"]
    # the default branch is not the cached v1: its default tag is Q4_K_M, in three parts
    default = _modelscope(["pull", REPO, "--source", "modelscope"], endpoint, tmp_path)
    assert default.returncode == 0 and Path(default.stdout.strip()) == _snapshot(tmp_path, REPO) / "tiny-Q4_K_M-00001-of-00003.gguf", default.stderr
    missing = _modelscope(["pull", REPO, "--revision", "v2", "--source", "modelscope"], endpoint, tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == f"error: {REPO}@v2 on the ModelScope hub: repository or revision not found\n"


def test_modelscope_cache_serves_offline_and_is_listed(hub, tmp_path):
    endpoint, _, _, _ = hub
    for model in ("Qwen/Tiny", f"{REPO}:Q8_0"):
        online = _modelscope(["pull", model, "--source", "modelscope"], endpoint, tmp_path)
        assert online.returncode == 0, online.stderr
        offline = _modelscope(["pull", model, "--source", "modelscope"], "http://127.0.0.1:9", tmp_path)  # nothing listens
        assert offline.returncode == 0 and offline.stdout == online.stdout, offline.stderr
    listing = _modelscope(["models"], "http://127.0.0.1:9", tmp_path)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    ours = [re.split(r" {2,}", line)[:2] for line in lines if " [modelscope] " in line]  # the MODEL and FORMAT columns
    assert ours == [["Qwen/Tiny [modelscope]", "safetensors"], [f"{REPO}:Q8_0 [modelscope]", "gguf Q8_0"]], listing.stdout


def test_modelscope_missing_repo_offline_and_no_package_are_one_line(hub, tmp_path):
    endpoint, _, _, _ = hub
    missing = _modelscope(["pull", "Qwen/Missing-GGUF:Q4_K_M", "--source", "modelscope"], endpoint, tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == "error: Qwen/Missing-GGUF:Q4_K_M on the ModelScope hub: repository or revision not found\n"
    offline = _modelscope(["generate", "hi", "--model", "Qwen/Not-Cached-GGUF:Q4_K_M"], "http://127.0.0.1:9", tmp_path,
                          QWENKIT_USE_MODELSCOPE="1")
    assert offline.returncode == 1 and offline.stderr.count("\n") == 1, offline.stderr  # not modelscope's retry warnings
    assert offline.stderr.startswith(
        "error: cannot download Qwen/Not-Cached-GGUF:Q4_K_M from the ModelScope hub and it is not in the local cache (offline?"
    )
    no_package = _modelscope(["-c", "import sys; sys.modules['modelscope'] = None; from qwenkit.cli.main import main; "
                              f"sys.exit(main(['pull', '{REPO}:Q8_0', '--source', 'modelscope']))"], endpoint, tmp_path)
    assert no_package.returncode == 1
    assert no_package.stderr == "error: ModelScope as a source needs the modelscope package: pip install modelscope\n"
