"""Chat messages with media content parts -> messages for the chat template plus preprocessed media.

Accepted parts (OpenAI's, vLLM's and Qwen's own spellings):
  {"type": "text", "text": ...}
  {"type": "image_url", "image_url": {"url": ...}}     {"type": "image", "image": url | path | bytes | PIL image}
  {"type": "input_audio", "input_audio": {"data": base64, "format": "wav" | "mp3" | ...}}
  {"type": "audio_url", "audio_url": {"url": ...}}     {"type": "audio", "audio": url | path | bytes | (samples, rate)}
  {"type": "video", "video": [frame, frame, ...]}      (frames as image sources, taken `fps` apart)
  {"type": "video_url", "video_url": {"url": ...}}     {"type": "video", "video": url | path}  (a file, via PyAV)
Each media part becomes {"type": kind, kind: "<n>"} for the template, which writes one placeholder
for it (qwenkit.multimodal.templates); the media's bytes never reach the template. A message whose
parts are all text is joined into one string, so any template renders it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from qwenkit.engine.media_inputs import MediaItem
from qwenkit.errors import QwenkitError
from qwenkit.multimodal.audio import decode_audio, preprocess_audio
from qwenkit.multimodal.image import decode_image, preprocess_image
from qwenkit.multimodal.processor import MediaOptions, ProcessorConfig
from qwenkit.multimodal.sources import MediaPolicy, decode_base64, load_media_bytes
from qwenkit.multimodal.video import decode_video, preprocess_video

MEDIA_KINDS = {"image_url": "image", "image": "image", "input_audio": "audio", "audio_url": "audio", "audio": "audio",
               "video": "video", "video_url": "video"}
DEFAULT_MAX_SOURCE_PIXELS = 64_000_000  # an image's own size, before resizing (PIL's bomb check is at 179M)


@dataclass(frozen=True)
class MediaContext:
    """How one request's media are read and preprocessed."""

    processor: ProcessorConfig | None  # None: the model takes no media
    accepted: frozenset[str] = frozenset()  # "image", "video", "audio"
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    options: MediaOptions = field(default_factory=MediaOptions)
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS


def _url(part: dict[str, Any], key: str) -> Any:
    value = part.get(key)
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise QwenkitError(f"a {part.get('type')!r} content part needs its {key!r} (with a url)")
    return value


def _image(source: Any, ctx: MediaContext) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    return decode_image(load_media_bytes(source, ctx.policy), ctx.max_source_pixels)


def _audio(part: dict[str, Any], ctx: MediaContext, processor: ProcessorConfig) -> MediaItem:
    kind = part.get("type")
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise QwenkitError("an input_audio part needs input_audio.data (base64) and input_audio.format")
        data = decode_base64(audio["data"], "audio")
        if len(data) > ctx.policy.max_bytes:
            raise QwenkitError(f"the audio is larger than {ctx.policy.max_bytes} bytes")
        samples, rate = decode_audio(data)
    elif kind == "audio" and isinstance(part.get("audio"), tuple):
        samples, rate = part["audio"]
        samples = np.asarray(samples, dtype=np.float32)
    else:
        samples, rate = decode_audio(load_media_bytes(_url(part, kind), ctx.policy))
    return MediaItem("audio", preprocess_audio(samples, rate, processor.num_mel_bins))


def _video(part: dict[str, Any], ctx: MediaContext, processor: ProcessorConfig) -> MediaItem:
    source = _url(part, part["type"])
    if isinstance(source, (list, tuple)):
        if len(source) > processor.video.max_frames:
            raise QwenkitError(f"a video may have at most {processor.video.max_frames} frames, got {len(source)}")
        return MediaItem("video", preprocess_video([_image(frame, ctx) for frame in source], processor.video))
    return MediaItem("video", decode_video(load_media_bytes(source, ctx.policy), processor.video))


def load_part(part: dict[str, Any], ctx: MediaContext) -> MediaItem:
    """One media content part, fetched, decoded and preprocessed."""
    kind = MEDIA_KINDS[part["type"]]
    if ctx.processor is None or kind not in ctx.accepted:
        what = {"image": "images", "video": "video", "audio": "audio"}[kind]
        raise QwenkitError(f"this model does not take {what}" + ("" if ctx.accepted else " (it is a text-only model)"))
    processor = ctx.processor.for_request(ctx.options)
    if kind == "image":
        return MediaItem("image", preprocess_image(_image(_url(part, part["type"]), ctx), processor.image))
    if kind == "audio":
        return _audio(part, ctx, processor)
    return _video(part, ctx, processor)


def chat_media(messages: Iterable[dict[str, Any]], ctx: MediaContext) -> tuple[list[dict[str, Any]], list[MediaItem]]:
    """(messages for the chat template, the media in prompt order)."""
    out: list[dict[str, Any]] = []
    items: list[MediaItem] = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, dict) or part.get("type") not in ("text", *MEDIA_KINDS):
                raise QwenkitError(f"unsupported content part {part.get('type') if isinstance(part, dict) else part!r}")
            if part["type"] == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
                continue
            item = load_part(part, ctx)
            items.append(item)
            parts.append({"type": item.kind, item.kind: str(len(items))})
        if all(p["type"] == "text" for p in parts):
            out.append({**message, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({**message, "content": parts})
    return out, items

