"""Turn what the user typed after --model into a local checkpoint: directory, .gguf file, hub id, or default."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.weights.default_model import ensure_assembled
from qwenkit.weights.hub import fetch, gguf_models, is_mmproj_name, parse_hub_id


class WeightFormat(Enum):
    HF = "hf"  # a directory with config.json and safetensors
    GGUF = "gguf"  # a .gguf file (the first part of a split GGUF)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    format: WeightFormat
    mmproj: Path | None = None  # a GGUF model's vision tower (llama.cpp's mmproj file)


def resolve_model(spec: str | None, revision: str | None = None, source: str | None = None,
                  mmproj: str | None = None) -> ResolvedModel:
    """`revision` and `source` apply to hub ids (see weights/hub.py). `mmproj`: a GGUF model's vision
    tower file (llama.cpp's --mmproj); without it, a directory's single mmproj file beside its GGUF."""
    resolved = _resolve_weights(spec, revision, source)
    if mmproj is not None:
        path = Path(mmproj).expanduser()
        if not path.is_file():
            raise QwenkitError(f"no such mmproj file: {mmproj}")
        if resolved.format != WeightFormat.GGUF:
            raise QwenkitError(f"--mmproj goes with a GGUF language model; {resolved.path} is a {resolved.format.value} checkpoint")
        return replace(resolved, mmproj=path)
    return resolved


def _resolve_weights(spec: str | None, revision: str | None, source: str | None) -> ResolvedModel:
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
        names = [p.name for p in path.glob("*.gguf")]
        models = gguf_models(names)
        if len(models) == 1:  # one GGUF, or the parts of one split GGUF (and its vision tower if there is one)
            projectors = [n for n in names if is_mmproj_name(n)]
            mmproj = path / projectors[0] if len(projectors) == 1 else None
            return ResolvedModel(path / next(iter(models.values()))[0], WeightFormat.GGUF, mmproj)
        raise QwenkitError(f"{path} has no config.json (and not exactly one GGUF model)")
    ref = parse_hub_id(spec, revision, source)
    if ref is not None:
        fetched = fetch(ref)
        return ResolvedModel(fetched.path, WeightFormat.GGUF if fetched.is_gguf else WeightFormat.HF, fetched.mmproj)
    raise QwenkitError(f"no such model path: {spec}")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
