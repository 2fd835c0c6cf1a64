"""HF checkpoint directories: config.json plus one or many (indexed) safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwenkit.distributed import Cut, ShardPlan
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


def iter_safetensors(directory: Path, plan: ShardPlan | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, memory-mapped: nothing is read until a tensor is used.
    With a tensor-parallel `plan`, a sharded tensor is only this process's run of it, a copy."""
    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    cut = plan.tensor_cut(name) if plan is not None else None
                    yield name, f.get_tensor(name) if cut is None else _read_run(file, name, cut)
        except (SafetensorError, OSError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise QwenkitError(f"{file} is truncated or corrupt ({first})") from exc


def _read_run(file: Path, name: str, cut: Cut) -> torch.Tensor:
    """A run of tensor `name`, copied through a map of the file of its own, which is gone once the
    run is copied: the tensor's other pages never stay resident (a column run reads every page)."""
    with safe_open(file, framework="pt") as own:
        tensor = own.get_slice(name)
        run = slice(cut.start, cut.start + cut.length)
        index = (run,) if cut.dim == 0 or len(tensor.get_shape()) == 1 else (slice(None), run)
        return tensor[index].clone(memory_format=torch.contiguous_format)
