"""A request's media inside the engine: where each item sits in the prompt, its positions, its cache keys.

`prepare_multimodal` turns a prompt with one placeholder per item (as chat templates write them)
into the model's prompt (one placeholder token per encoder output) plus `MultimodalInputs`, which
the sequence carries for its whole life (preemption recomputes from it):
- M-RoPE positions (Qwen2-VL / 2.5-VL) for the prompt, computed once at add time; a token i past
  the prompt sits at i + delta on all three axes, so positions of any chunk, decode step or
  recompute are a slice (`positions`);
- which placeholder rows of a chunk take which rows of which item's encoder output (`overlapping`);
- the content keys of the items whose placeholders fall in a KV block (`keys_in`), which the
  block manager folds into that block's prefix-cache hash.

`EncoderCache` keeps encoder outputs by content key (LRU, bounded in bytes): an item is encoded
once however many chunks, requests or recomputes read it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.mrope import MropePositions, VisionItem, mrope_positions
from qwenkit.multimodal.audio import AudioFeatures
from qwenkit.multimodal.image import PatchedVision
from qwenkit.multimodal.prompt import expand_placeholders
from qwenkit.model.qwen2_audio import audio_token_count

MediaKind = Literal["image", "video", "audio"]


@dataclass(frozen=True)
class MediaItem:
    """One preprocessed image, video or audio clip."""

    kind: MediaKind
    data: PatchedVision | AudioFeatures

    @property
    def key(self) -> str:
        return self.data.key

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens (= encoder output rows) it takes in the prompt."""
        if isinstance(self.data, AudioFeatures):
            return audio_token_count(self.data.num_frames)
        return self.data.num_tokens


@dataclass(frozen=True)
class PlacedMedia:
    item: MediaItem
    start: int  # index of its first placeholder token in the prompt

    @property
    def end(self) -> int:
        return self.start + self.item.num_tokens


@dataclass(frozen=True)
class MultimodalInputs:
    placed: tuple[PlacedMedia, ...]  # in prompt order
    num_prompt_tokens: int
    mrope: MropePositions | None  # None: 1-D positions (Qwen2-Audio)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Rotary positions of tokens [start, end): [3, n] with M-RoPE, else [n]."""
        if self.mrope is None:
            return torch.arange(start, end)
        split = min(max(start, self.num_prompt_tokens), end)
        prompt = self.mrope.positions[:, start:split]
        return torch.cat([prompt, self.mrope.for_decode(split, end - split)], dim=1) if end > split else prompt

    def overlapping(self, start: int, end: int) -> list[tuple[PlacedMedia, int, int]]:
        """(item, first row, end row) of each item's encoder output that tokens [start, end) take."""
        return [(p, max(start, p.start) - p.start, min(end, p.end) - p.start) for p in self.placed if p.start < end and start < p.end]

    def keys_in(self, start: int, end: int) -> bytes:
        """Content keys of the items with placeholders among tokens [start, end) (b"" if none)."""
        return b"".join(p.item.key.encode() + b"@%d;" % p.start for p in self.placed if p.start < end and start < p.end)


def placeholder_id(config: ModelConfig, kind: MediaKind) -> int:
    if kind == "audio":
        if config.audio is None:
            raise QwenkitError(f"this model ({config.model_type}) does not take audio")
        return config.audio.audio_token_id
    if config.vision is None:
        what = "images" if kind == "image" else "videos"
        raise QwenkitError(f"this model ({config.model_type}) does not take {what}")
    return config.vision.image_token_id if kind == "image" else config.vision.video_token_id


def placeholder_ids(config: ModelConfig) -> frozenset[int]:
    ids = set()
    if config.vision is not None:
        ids |= {config.vision.image_token_id, config.vision.video_token_id}
    if config.audio is not None:
        ids.add(config.audio.audio_token_id)
    return frozenset(ids)


def prepare_multimodal(token_ids: Sequence[int], items: Sequence[MediaItem], config: ModelConfig) -> tuple[list[int], MultimodalInputs]:
    """(the model's prompt ids, its MultimodalInputs) for a prompt and its media in prompt order.

    The prompt holds one placeholder per item (expanded here) or already one per encoder output
    (kept): the two agree when every item takes one token.
    """
    by_pad: dict[int, list[MediaItem]] = {}
    for item in items:
        by_pad.setdefault(placeholder_id(config, item.kind), []).append(item)
    for pad in placeholder_ids(config):
        by_pad.setdefault(pad, [])
    ids = list(token_ids)
    counts = {pad: [i.num_tokens for i in its] for pad, its in by_pad.items()}
    if any(ids.count(pad) != sum(n) for pad, n in counts.items()):
        ids = expand_placeholders(ids, {pad: n for pad, n in counts.items()})
    pending = {pad: list(its) for pad, its in by_pad.items()}
    placed: list[PlacedMedia] = []
    i = 0
    while i < len(ids):
        pad = ids[i]
        if pad not in pending:
            i += 1
            continue
        if not pending[pad]:
            raise QwenkitError(f"the prompt has more placeholder tokens ({pad}) than media items for them")
        item = pending[pad].pop(0)
        n = item.num_tokens
        if ids[i : i + n] != [pad] * n:
            raise QwenkitError(f"a {item.kind} needs {n} consecutive placeholder tokens in the prompt")
        placed.append(PlacedMedia(item, i))
        i += n
    mrope = None
    if config.vision is not None and config.mrope_section:
        vision = [VisionItem(p.item.data.grid, p.item.kind == "video", getattr(p.item.data, "seconds_per_grid", 1.0))
                  for p in placed if p.item.kind != "audio"]
        mrope = mrope_positions(ids, vision, config.vision)
    return ids, MultimodalInputs(tuple(placed), len(ids), mrope)


def encode_media(model: torch.nn.Module, item: MediaItem) -> torch.Tensor:
    """One item's language-model embeddings [num_tokens, hidden] from the model's encoder."""
    if item.kind == "audio":
        return model.encode_audio(item.data.features, item.data.num_frames)
    return model.encode_vision(item.data.pixel_values, [item.data.grid])[0]


@dataclass
class EncoderCacheStats:
    hits: int = 0  # items served from the cache
    misses: int = 0  # items encoded


class EncoderCache:
    """Encoder outputs by content key, least recently used first out, within `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.stats = EncoderCacheStats()

    def get(self, model: torch.nn.Module, item: MediaItem) -> torch.Tensor:
        out = self.entries.get(item.key)
        if out is not None:
            self.entries.move_to_end(item.key)
            self.stats.hits += 1
            return out
        self.stats.misses += 1
        out = encode_media(model, item)
        size = out.numel() * out.element_size()
        if size <= self.max_bytes:
            self.entries[item.key] = out
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return out


def accepted_kinds(config: ModelConfig) -> frozenset[str]:
    kinds = set()
    if config.vision is not None:
        kinds |= {"image", "video"}
    if config.audio is not None:
        kinds.add("audio")
    return frozenset(kinds)
