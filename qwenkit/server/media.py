"""Media in chat requests: OpenAI content parts -> preprocessed images, video and audio, or a 400.

Every failure that belongs to the request's media (undecodable bytes, a URL or path the server does
not allow, too many pixels, media a text-only model cannot take) is a 400 in OpenAI's error shape
with the reason, raised before generation starts, so the server keeps serving. The work (fetching,
decoding, resizing) runs in the worker thread that renders the chat template (ServerState.off_loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenkit.engine.media_chat import DEFAULT_MAX_SOURCE_PIXELS, MediaContext, chat_media
from qwenkit.engine.media_inputs import MediaItem, accepted_kinds, prepare_multimodal
from qwenkit.errors import QwenkitError
from qwenkit.multimodal.processor import MediaOptions
from qwenkit.multimodal.sources import MediaPolicy
from qwenkit.server.errors import APIError


@dataclass(frozen=True)
class MediaServerConfig:
    """The operator's media settings (`qwenkit serve` flags)."""

    policy: MediaPolicy = field(default_factory=MediaPolicy)  # closed: data: URLs only
    max_pixels: int | None = None  # per image / video frame after resizing (caps the checkpoint's budget and requests')
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS  # an image's own size before resizing


def media_context(state, kwargs: dict[str, Any] | None) -> MediaContext:
    loaded = state.engine.loaded
    config: MediaServerConfig = state.config.media
    processor = loaded.processor.capped(config.max_pixels) if loaded.processor is not None else None
    try:
        options = MediaOptions.from_dict(kwargs)
    except QwenkitError as exc:
        raise APIError(400, str(exc), "invalid_value", "mm_processor_kwargs") from exc
    return MediaContext(processor, accepted_kinds(loaded.config), config.policy, options, config.max_source_pixels)


def has_media(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") != "text" for p in m["content"]) for m in messages)


def load_chat_media(state, messages: list[dict[str, Any]], kwargs: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[MediaItem]]:
    """(messages for the template, their media); a 400 naming the problem if any part cannot be used."""
    if not has_media(messages):
        return messages, []
    try:
        return chat_media(messages, media_context(state, kwargs))
    except QwenkitError as exc:
        raise APIError(400, str(exc), "invalid_media", "messages") from exc


def expand_prompt(state, prompt_ids: list[int], media: list[MediaItem]) -> list[int]:
    """The prompt with one placeholder token per encoder output (its real length, for max_tokens)."""
    if not media:
        return prompt_ids
    try:
        return prepare_multimodal(prompt_ids, media, state.engine.loaded.config)[0]
    except QwenkitError as exc:
        raise APIError(400, str(exc), "invalid_media", "messages") from exc
