"""HF checkpoint directories: config.json plus one or many (indexed) safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwenkit.errors import QwenkitError

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise QwenkitError(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QwenkitError(f"{path} is not valid JSON: {exc}") from exc


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise QwenkitError(f"{directory} is incomplete: {INDEX_FILE} lists {', '.join(missing)}, which is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise QwenkitError(f"{directory} has no .safetensors files (and no {INDEX_FILE})")
    return files


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, memory-mapped: nothing is read until a tensor is used."""
    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise QwenkitError(f"{file} is truncated or corrupt ({first})") from exc
