"""A checkpoint's preprocessing settings (preprocessor_config.json) and per-request overrides.

Qwen2-VL / Qwen2.5-VL checkpoints say the image pixel budget as min_pixels / max_pixels (newer
saves: size.shortest_edge / size.longest_edge, which hold the same numbers); a separate
video_preprocessor_config.json may set the video budget and frame rate. Qwen2-Audio's says the
number of mel bins (feature_size). Anything absent keeps the reference processors' defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.multimodal.image import ImageLimits
from qwenkit.multimodal.video import VideoLimits


@dataclass(frozen=True)
class MediaOptions:
    """What a request may change (vLLM's mm_processor_kwargs): pixel budget and video frame rate."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None

    @classmethod
    def from_dict(cls, kwargs: dict[str, Any] | None) -> "MediaOptions":
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - {"min_pixels", "max_pixels", "fps"})
        if unknown:
            raise QwenkitError(f"unsupported media processor options {', '.join(unknown)}; use min_pixels, max_pixels, fps")
        try:
            return cls(
                min_pixels=None if kwargs.get("min_pixels") is None else int(kwargs["min_pixels"]),
                max_pixels=None if kwargs.get("max_pixels") is None else int(kwargs["max_pixels"]),
                fps=None if kwargs.get("fps") is None else float(kwargs["fps"]),
            )
        except (TypeError, ValueError) as exc:
            raise QwenkitError(f"media processor options must be numbers ({exc})") from exc


@dataclass(frozen=True)
class ProcessorConfig:
    image: ImageLimits = field(default_factory=ImageLimits)
    video: VideoLimits = field(default_factory=VideoLimits)
    num_mel_bins: int = 128
    # Largest max_pixels a request may ask for (None: anything). The server sets it; the checkpoint's
    # own budget is the default, so a client cannot make one image cost more than the operator allows.
    max_request_pixels: int | None = None

    def for_request(self, options: MediaOptions) -> "ProcessorConfig":
        """The limits one request runs with: its options over the checkpoint's."""
        if options == MediaOptions():
            return self
        low, high = _budget_for(options, self.image.min_pixels, self.image.max_pixels)
        image = ImageLimits(low, high)
        low, high = _budget_for(options, self.video.min_pixels, self.video.max_pixels)
        video = replace(self.video, min_pixels=low, max_pixels=high, fps=options.fps or self.video.fps)
        cap = self.max_request_pixels
        if cap is not None and max(image.max_pixels, video.max_pixels) > cap:
            raise QwenkitError(f"max_pixels {options.max_pixels} is more than this server allows ({cap} pixels per image or frame)")
        return replace(self, image=image, video=video)

    def capped(self, max_pixels: int | None) -> "ProcessorConfig":
        """The server's cap on pixels per image/frame: the defaults shrink to it, requests may not exceed it."""
        if max_pixels is None:
            return self
        image = ImageLimits(min(self.image.min_pixels, max_pixels), min(self.image.max_pixels, max_pixels))
        video = replace(self.video, min_pixels=min(self.video.min_pixels, max_pixels), max_pixels=min(self.video.max_pixels, max_pixels))
        return replace(self, image=image, video=video, max_request_pixels=max_pixels)


def _budget_for(options: MediaOptions, low: int, high: int) -> tuple[int, int]:
    """A request's (min, max) pixels: what it gives, the default for the other bound, moved so the
    two stay ordered (max_pixels alone below the default minimum lowers the minimum too)."""
    if options.min_pixels is not None and options.max_pixels is not None:
        return options.min_pixels, options.max_pixels
    if options.max_pixels is not None:
        return min(low, options.max_pixels), options.max_pixels
    if options.min_pixels is not None:
        return options.min_pixels, max(high, options.min_pixels)
    return low, high


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QwenkitError(f"{path} is not valid JSON ({exc})") from exc


def _budget(d: dict[str, Any]) -> tuple[int | None, int | None]:
    size = d.get("size") or {}
    low = d.get("min_pixels") or size.get("shortest_edge")
    high = d.get("max_pixels") or size.get("longest_edge")
    return (None if low is None else int(low)), (None if high is None else int(high))


def read_processor_config(directory: Path) -> ProcessorConfig:
    """The preprocessing a checkpoint directory asks for (defaults where it says nothing)."""
    image_cfg = _read(directory / "preprocessor_config.json")
    video_cfg = _read(directory / "video_preprocessor_config.json")
    config = ProcessorConfig()
    low, high = _budget(image_cfg)
    if low is not None or high is not None:
        config = replace(config, image=ImageLimits(low or config.image.min_pixels, high or config.image.max_pixels))
    low, high = _budget(video_cfg)
    video = config.video
    if low is not None or high is not None:
        video = replace(video, min_pixels=low or video.min_pixels, max_pixels=high or video.max_pixels)
    for key in ("fps", "min_frames", "max_frames"):
        if video_cfg.get(key) is not None:
            video = replace(video, **{key: type(getattr(video, key))(video_cfg[key])})
    mel_bins = int(image_cfg.get("feature_size", config.num_mel_bins))
    return replace(config, video=video, num_mel_bins=mel_bins)


# llama.cpp's image budget for Qwen-VL mmproj files that state none (clip.cpp: 8 to 4096 tokens of
# 28x28 pixels), so an image becomes as many tokens as it does in llama-server.
MMPROJ_IMAGE_LIMITS = ImageLimits(8 * 28 * 28, 4096 * 28 * 28)


def processor_config_from_mmproj(metadata: dict[str, Any]) -> ProcessorConfig:
    """The preprocessing a llama.cpp mmproj file asks for: its image pixel budget
    (clip.vision.image_min_pixels / image_max_pixels) where it states one, else llama.cpp's; its mel bins."""
    low = metadata.get("clip.vision.image_min_pixels") or MMPROJ_IMAGE_LIMITS.min_pixels
    high = metadata.get("clip.vision.image_max_pixels") or MMPROJ_IMAGE_LIMITS.max_pixels
    mel_bins = int(metadata.get("clip.audio.num_mel_bins") or ProcessorConfig.num_mel_bins)
    return replace(ProcessorConfig(), image=ImageLimits(int(low), int(high)), num_mel_bins=mel_bins)
