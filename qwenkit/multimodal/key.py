"""Content keys of preprocessed media: equal keys mean equal encoder outputs and equal K/V.

The engine caches encoder outputs by this key (a repeated image is encoded once) and mixes it into
prefix-cache block hashes (two different images never share blocks; the same image does). The key
covers exactly what the encoder reads and what positions depend on, after preprocessing, so the
same picture sent as PNG and as an identical-pixel BMP shares, and one resized under a different
pixel budget does not.
"""

from __future__ import annotations

import hashlib

import torch


def content_key(kind: str, shape_info: tuple, values: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{kind}:{shape_info!r}:{values.dtype}:{tuple(values.shape)}".encode())
    digest.update(values.detach().contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()
