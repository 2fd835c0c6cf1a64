"""HF checkpoint directories: config.json plus one or many (indexed) safetensors files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
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


def iter_safetensors(
    directory: Path, plan: ShardPlan | None = None, rename: Callable[[str], str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, named by `rename` (default: as stored), memory-mapped:
    nothing is read until a tensor is used. With a tensor-parallel `plan`, a tensor the plan cuts
    is this process's run of it (a copy), and one it cuts into parts (experts stored fused) is
    read through a map that goes with the tensor."""
    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="pt") as f:
                names = f.keys()
                shares = _ShareReader(file, len(names))
                for stored in names:
                    name = rename(stored) if rename is not None else stored
                    cut = plan.tensor_cut(name) if plan is not None else None
                    if cut is not None:
                        yield name, shares.run(stored, cut)
                    elif plan is not None and plan.cuts_within(name.rpartition(".")[0]):
                        yield name, shares.whole(stored)
                    else:
                        yield name, f.get_tensor(stored)
        except (SafetensorError, OSError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise QwenkitError(f"{file} is truncated or corrupt ({first})") from exc


class _ShareReader:
    """Reads a tensor-parallel process's share of a file's tensors through a map of the file of
    its own, replaced after REMAP_BYTES of tensors or a 64th of the file's tensors, whichever
    comes first: the pages a run reads (all of its tensor's, for a run of columns) leave with
    that map instead of staying resident until the whole file is read, and a file of thousands
    of small tensors (a MoE's experts) is not opened once per tensor (~1.4 ms each with a
    2,000-tensor header)."""

    REMAP_BYTES = 64 << 20

    def __init__(self, file: Path, tensors: int):
        self.file, self.handle, self.bytes, self.reads = file, None, 0, 0
        self.reads_per_map = max(1, tensors // 64)

    def _map(self):
        if self.handle is None or self.bytes >= self.REMAP_BYTES or self.reads >= self.reads_per_map:
            self.handle, self.bytes, self.reads = safe_open(self.file, framework="pt"), 0, 0  # the old map goes with its last tensor
        self.reads += 1
        return self.handle

    def run(self, name: str, cut: Cut) -> torch.Tensor:
        stored = self._map().get_slice(name)
        dim = 0 if len(stored.get_shape()) == 1 else cut.dim  # a bias: its rows
        run = slice(cut.start, cut.start + cut.length)
        values = stored[(run,) if dim == 0 else (slice(None), run)].clone(memory_format=torch.contiguous_format)
        # A run of rows reads its own pages; a run of columns reads every page of the tensor.
        self.bytes += values.nbytes if dim == 0 else values.nbytes * stored.get_shape()[1] // cut.length
        return values

    def whole(self, name: str) -> torch.Tensor:
        tensor = self._map().get_tensor(name)
        self.bytes += tensor.nbytes
        return tensor
