"""Images for Qwen2-VL / Qwen2.5-VL: decode, "smart resize", normalise, cut into patches.

Equal to transformers' PIL-backed Qwen2VLImageProcessor: the image is resized (bicubic, by PIL) to
a size whose sides are multiples of 28 (patch 14 x merge 2) and whose area lies within the pixel
budget, rescaled to [0, 1] and normalised with the CLIP mean/std, then cut into patches of
[channels, temporal 2, 14, 14] flattened, ordered so that each 2x2 block of patches is consecutive
(the vision tower's merger relies on that). A still image fills both temporal slots.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qwenkit.errors import QwenkitError
from qwenkit.multimodal.key import content_key

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # output sides are multiples of this
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageLimits:
    """Per-request pixel budget of one image (the processor's min_pixels / max_pixels)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise QwenkitError(f"min_pixels ({self.min_pixels}) must be positive and at most max_pixels ({self.max_pixels})")
        if self.max_pixels < FACTOR * FACTOR:
            raise QwenkitError(f"max_pixels must be at least {FACTOR * FACTOR} (one {FACTOR}x{FACTOR} block)")


@dataclass(frozen=True)
class PatchedVision:
    """One image or video as the vision tower reads it."""

    pixel_values: torch.Tensor  # [t * h * w, channels * temporal patch * 14 * 14] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens it takes in the prompt (one per 2x2 block of patches)."""
        t, h, w = self.grid
        return t * h * w // (MERGE_SIZE * MERGE_SIZE)

    @cached_property
    def key(self) -> str:
        """Content key (see qwenkit.multimodal.key)."""
        return content_key("vision", (self.grid, getattr(self, "seconds_per_grid", None)), self.pixel_values)


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """The (height, width) closest to the image's, on multiples of `factor`, with area in [min, max]."""
    if min(height, width) <= 0:
        raise QwenkitError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise QwenkitError(f"image aspect ratio {width}x{height} is more extreme than {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, max_source_pixels: int | None = None) -> Image.Image:
    """An image from its file bytes (PNG, JPEG, WebP, GIF...); a clear error if it is none, or if it
    has more than `max_source_pixels` (checked from the header, before the pixels are decoded)."""
    try:
        image = Image.open(io.BytesIO(data))
        if max_source_pixels is not None and image.width * image.height > max_source_pixels:
            raise QwenkitError(f"the image has too many pixels ({image.width}x{image.height}); at most {max_source_pixels} are accepted")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise QwenkitError(f"cannot decode the image ({exc})") from exc
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as the reference processor does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def normalized_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """[3, height, width] float32: resized (bicubic), scaled to [0, 1] and CLIP-normalised."""
    height, width = size
    resized = to_rgb(image).resize((width, height), resample=Image.Resampling.BICUBIC)
    # The reference rescales in float64 and only then drops to float32; kept for bit-equality.
    pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[frames, C, H, W] (frames a multiple of 2) -> ([t*h*w, C*2*14*14], (t, h, w)).

    Row order: temporal group, then 2x2 merge blocks row-major, then the patches inside a block.
    """
    count, channels, height, width = frames.shape
    t, h, w = count // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE
    m, p = MERGE_SIZE, PATCH_SIZE
    patches = frames.reshape(t, TEMPORAL_PATCH_SIZE, channels, h // m, m, p, w // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches).reshape(t * h * w, -1), (t, h, w)


def preprocess_image(image: Image.Image | bytes, limits: ImageLimits = ImageLimits()) -> PatchedVision:
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    size = smart_resize(image.height, image.width, limits.min_pixels, limits.max_pixels)
    pixels = normalized_pixels(image, size)
    frames = np.broadcast_to(pixels[None], (TEMPORAL_PATCH_SIZE, *pixels.shape))
    values, grid = patchify(frames)
    return PatchedVision(torch.from_numpy(values), grid)
