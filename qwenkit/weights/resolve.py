"""Turn what the user typed after --model into a local checkpoint: directory, .gguf file, hub id, or default."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.weights.default_model import ensure_assembled
from qwenkit.weights.hub import fetch, gguf_models, parse_hub_id


class WeightFormat(Enum):
    HF = "hf"  # a directory with config.json and safetensors
    GGUF = "gguf"  # a .gguf file (the first part of a split GGUF)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    format: WeightFormat


def resolve_model(spec: str | None, revision: str | None = None, source: str | None = None) -> ResolvedModel:
    """`revision` and `source` apply to hub ids (see weights/hub.py)."""
    if spec is None:
        return ResolvedModel(ensure_assembled(), WeightFormat.GGUF)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return ResolvedModel(path, WeightFormat.GGUF)
        raise QwenkitError(f"{path} is neither a .gguf file nor a checkpoint directory")
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedModel(path, WeightFormat.HF)
        models = gguf_models([p.name for p in path.glob("*.gguf")])
        if len(models) == 1:  # one GGUF, or the parts of one split GGUF
            return ResolvedModel(path / next(iter(models.values()))[0], WeightFormat.GGUF)
        raise QwenkitError(f"{path} has no config.json (and not exactly one GGUF model)")
    ref = parse_hub_id(spec, revision, source)
    if ref is not None:
        fetched = fetch(ref)
        return ResolvedModel(fetched.path, WeightFormat.GGUF if fetched.is_gguf else WeightFormat.HF)
    raise QwenkitError(f"no such model path: {spec}")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
