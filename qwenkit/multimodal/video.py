"""Videos for Qwen2-VL / Qwen2.5-VL, given as frames (images): sample, resize, cut into patches.

Frames are resized to one size (smart resize of the first frame under the video pixel budget),
normalised like images, padded to an even count by repeating the last frame, and cut into patches
two frames deep. Frame sampling follows transformers' Qwen2VLVideoProcessor.sample_frames: from the
source frame rate down to `fps`, between min_frames and max_frames, an even count. The reference
resizes video frames with torchvision; qwenkit resizes them with PIL like images (torchvision
cannot be installed beside our torch), so video pixels can differ from transformers' by the
resampling filter's rounding, not in layout or size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from qwenkit.errors import QwenkitError
from qwenkit.multimodal.ffmpeg import open_media
from qwenkit.multimodal.image import TEMPORAL_PATCH_SIZE, PatchedVision, normalized_pixels, patchify, smart_resize


@dataclass(frozen=True)
class VideoLimits:
    """Per-request video budget: pixels per frame, and the frame rate frames are sampled at."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise QwenkitError(f"min_pixels ({self.min_pixels}) must be positive and at most max_pixels ({self.max_pixels})")
        if not self.fps > 0:
            raise QwenkitError(f"fps must be positive, got {self.fps}")
        if not 0 < self.min_frames <= self.max_frames:
            raise QwenkitError(f"min_frames ({self.min_frames}) must be positive and at most max_frames ({self.max_frames})")


@dataclass(frozen=True)
class PatchedVideo(PatchedVision):
    seconds_per_grid: float = 1.0  # seconds of video per temporal patch (Qwen2.5-VL's temporal positions)


def sample_frame_indices(total: int, source_fps: float, limits: VideoLimits) -> list[int]:
    """Indices of the frames kept when a `total`-frame video at `source_fps` is sampled at limits.fps."""
    step = TEMPORAL_PATCH_SIZE
    most = math.floor(min(limits.max_frames, total) / step) * step
    wanted = min(max(total / source_fps * limits.fps, limits.min_frames), most, total)
    count = math.floor(wanted / step) * step
    if count <= 0:
        raise QwenkitError(f"a video needs at least {step} frames, got {total}")
    return torch.arange(0, total, total / count).int().tolist()


def preprocess_video(
    frames: Sequence[Image.Image], limits: VideoLimits = VideoLimits(), source_fps: float | None = None
) -> PatchedVideo:
    """`frames` in order. With `source_fps` they are sampled down to limits.fps; without, all are kept
    and taken to be limits.fps apart (as a client sending already sampled frames)."""
    if not frames:
        raise QwenkitError("a video needs at least one frame")
    if source_fps is not None:
        total = len(frames)
        frames = [frames[i] for i in sample_frame_indices(total, source_fps, limits)]
        fps = len(frames) / (total / source_fps)  # the rate actually kept
    else:
        fps = limits.fps
    first = frames[0]
    size = smart_resize(first.height, first.width, limits.min_pixels, limits.max_pixels)
    pixels = [normalized_pixels(frame, size) for frame in frames]
    pixels += [pixels[-1]] * (-len(pixels) % TEMPORAL_PATCH_SIZE)
    values, grid = patchify(np.stack(pixels))
    return PatchedVideo(torch.from_numpy(values), grid, seconds_per_grid=TEMPORAL_PATCH_SIZE / fps)


def decode_video(data: bytes, limits: VideoLimits = VideoLimits()) -> PatchedVideo:
    """A video file (mp4, webm, mkv... by PyAV), sampled at limits.fps while decoding, so only the
    kept frames are ever held as images."""
    with open_media(data, "video") as container:
        if not container.streams.video:
            raise QwenkitError("the file has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames or (round(float(stream.duration * stream.time_base) * fps) if stream.duration else 0)
        if fps <= 0 or total <= 0:
            raise QwenkitError("the video does not say its frame rate and length")
        keep = set(sample_frame_indices(total, fps, limits))
        frames = [frame.to_image() for i, frame in enumerate(container.decode(stream)) if i in keep]
    if not frames:
        raise QwenkitError("the video holds no frames")
    frames += [frames[-1]] * (len(keep) - len(frames))  # a container that overstated its length
    video = preprocess_video(frames, limits)
    return PatchedVideo(video.pixel_values, video.grid, seconds_per_grid=TEMPORAL_PATCH_SIZE * total / fps / len(frames))
