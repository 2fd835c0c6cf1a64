"""A fast reader for the GGUF container: metadata, tensor directory, memory-mapped tensor bytes.

The `gguf` package's GGUFReader builds a numpy view per string of the 150k-token vocabulary,
which takes ~12 s for a Qwen file; this reads the same header in well under a second. The
quantization formats themselves stay the `gguf` package's business (see gguf_tensors.py).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (slowest dimension first)
    offset: int  # absolute position in the file
    n_bytes: int


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
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise QwenkitError(f"{self.path} cannot be read as a GGUF file ({exc})") from exc
        try:
            self.metadata, self.tensors = self._parse(memoryview(self._map))
        except (struct.error, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise QwenkitError(f"{self.path} is not a valid GGUF file (truncated or corrupt: {exc})") from exc

    def _parse(self, buf: memoryview):
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
                raise QwenkitError(f"{self.path}: tensor {name} has an unknown GGUF tensor type id {kind}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            t = GGUFTensor(name, qtype, tuple(int(d) for d in reversed(dims)), data_start + offset, n // block * type_size)
            if t.offset + t.n_bytes > len(buf):
                raise QwenkitError(f"{self.path} is truncated: tensor {name} ends past the end of the file")
            tensors[name] = t
        return meta, tensors

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the tensor's pages from this process's memory once they have been copied or
        converted (the map stays valid: a later read faults them in again from the file)."""
        mapping = getattr(self._map, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise"):
            return
        start = tensor.offset // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, tensor.offset + tensor.n_bytes - start)

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as uint8 [rows..., bytes per row], as `gguf.quants.dequantize` expects."""
        data = self._map[tensor.offset : tensor.offset + tensor.n_bytes]
        return data.reshape(*tensor.shape[:-1], -1)
