"""A fast reader for the GGUF container: metadata, tensor directory, memory-mapped tensor bytes.

A model split by llama.cpp's gguf-split (`name-00001-of-00003.gguf` ...) is read in place from all
its files: the first holds the metadata, each holds some tensors, `split.count` says how many.

The `gguf` package's GGUFReader builds a numpy view per string of the 150k-token vocabulary,
which takes ~12 s for a Qwen file; this reads the same header in well under a second. The
quantization formats themselves stay the `gguf` package's business (see gguf_tensors.py).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwenkit.errors import QwenkitError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
# Arrays of arrays are legal GGUF but no model needs more than a level or two; a crafted file with
# thousands of levels would otherwise end in a RecursionError.
MAX_ARRAY_NESTING = 8
# llama.cpp's split file names (llama_split_path): PREFIX-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_paths(path: Path, count: int) -> list[Path]:
    """The paths of all `count` files of the split GGUF that `path` is one part of."""
    m = SPLIT_NAME.match(path.name)
    if m is None:
        raise QwenkitError(f"{path} is part of a {count}-file split GGUF but is not named PREFIX-0000N-of-{count:05d}.gguf")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (slowest dimension first)
    offset: int  # absolute position in its file
    n_bytes: int
    part: int = 0  # which file of a split GGUF holds it


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise struct.error("string runs past the end of the file")
        s = bytes(self.buf[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise ValueError(f"metadata arrays nested deeper than {MAX_ARRAY_NESTING} levels")
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return arr.tolist()
            if count > len(self.buf) - self.pos:  # every element takes at least a byte
                raise ValueError(f"a metadata array claims {count} elements, more than the file holds")
            return [self.value(item, depth + 1) for _ in range(count)]
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        raise ValueError(f"unknown GGUF value type {kind}")


class GGUFFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._maps: list[np.memmap] = []
        self.metadata, self.tensors = self._open(self.path, 0)
        count = int(self.metadata.get("split.count", 1) or 1)
        if count > 1:
            self._open_split(split_part_paths(self.path, count))

    def _open(self, path: Path, part: int) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
        try:
            self._maps.append(np.memmap(path, dtype=np.uint8, mode="r"))
        except (OSError, ValueError) as exc:
            raise QwenkitError(f"{path} cannot be read as a GGUF file ({exc})") from exc
        try:
            parsed = self._parse(memoryview(self._maps[-1]), path, part)
        except (struct.error, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise QwenkitError(f"{path} is not a valid GGUF file (truncated or corrupt: {exc})") from exc
        # The header (for Qwen, ~6 MB of vocabulary and merges) is now Python objects: its pages
        # would otherwise stay in this process's RSS for as long as the tensors are mapped.
        self._drop_pages(part, 0, min(tensor.offset for tensor in parsed[1].values()) if parsed[1] else len(self._maps[-1]))
        return parsed

    def _open_split(self, paths: list[Path]) -> None:
        count = len(paths)
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise QwenkitError(f"split GGUF {self.path.name} has {count} parts; missing: {', '.join(missing)}")
        if int(self.metadata.get("split.no", 0)) != 0:  # opened from a later part: the first holds the metadata
            self.path, self._maps = paths[0], []
            self.metadata, self.tensors = self._open(self.path, 0)
        for part, path in enumerate(paths[1:], start=1):
            meta, tensors = self._open(path, part)
            if int(meta.get("split.no", -1)) != part or int(meta.get("split.count", 0)) != count:
                raise QwenkitError(f"{path} is not part {part + 1} of {count} of {self.path.name} (its split metadata differs)")
            self.tensors.update(tensors)
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(self.tensors):
            raise QwenkitError(f"split GGUF {self.path.name} lists {expected} tensors but its {count} files hold {len(self.tensors)}")

    @property
    def paths(self) -> list[Path]:
        """Every file the model is read from (one, or all parts of a split GGUF)."""
        return [Path(m.filename) for m in self._maps]

    def _parse(self, buf: memoryview, path: Path, part: int):
        c = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        c.pos = 4
        version = c.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
            kind, offset = c.scalar("<I"), c.scalar("<Q")
            infos.append((name, dims, kind, offset))
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment must be a positive power of two, not {alignment!r}")
        data_start = -(-c.pos // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for name, dims, kind, offset in infos:
            try:
                qtype = GGMLQuantizationType(kind)
            except ValueError:
                raise QwenkitError(f"{path}: tensor {name} has an unknown GGUF tensor type id {kind}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            t = GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), data_start + offset, n // block * type_size, part)
            if t.offset + t.n_bytes > len(buf):
                raise QwenkitError(f"{path} is truncated: tensor {name} ends past the end of the file")
            tensors[name] = t
        return meta, tensors

    def release(self, tensor: GGUFTensor, start: int = 0, end: int | None = None) -> None:
        """Drop the tensor's pages (or those of its bytes [start, end)) from this process's memory
        once they have been copied or converted (the map stays valid: a later read faults them in
        again from the file)."""
        end = tensor.n_bytes if end is None else end
        self._drop_pages(tensor.part, tensor.offset + start, tensor.offset + end)

    def page_dropper(self, tensor: GGUFTensor) -> Callable[[], None]:
        """A function that drops the tensor's pages from this process's memory, as release(), and
        holds the file's map but not this object (nor its metadata)."""
        mapping, start, end = getattr(self._maps[tensor.part], "_mmap", None), tensor.offset, tensor.offset + tensor.n_bytes
        return lambda: _drop_pages(mapping, start, end)

    def _drop_pages(self, part: int, start: int, end: int) -> None:
        _drop_pages(getattr(self._maps[part], "_mmap", None), start, end)

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as uint8 [rows..., bytes per row], as `gguf.quants.dequantize` expects."""
        data = self._maps[tensor.part][tensor.offset : tensor.offset + tensor.n_bytes]
        return data.reshape(*tensor.shape[:-1], -1)


def _drop_pages(mapping: mmap.mmap | None, start: int, end: int) -> None:
    if mapping is None or not hasattr(mapping, "madvise") or end <= start:
        return
    start = start // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
