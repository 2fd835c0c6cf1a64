"""Media files beyond WAV (mp3, flac, ogg; mp4, webm, mkv...) through PyAV, FFmpeg's Python binding.

PyAV is optional (`pip install qwenkit[media]`): without it WAV audio and videos sent as frames
still work, and any other file is a clear error naming the extra.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qwenkit.errors import QwenkitError


@contextmanager
def open_media(data: bytes, what: str) -> Iterator[Any]:
    """An open PyAV container of `data`; decoding errors inside the block become QwenkitErrors."""
    try:
        import av
    except ImportError as exc:
        raise QwenkitError(f"decoding {what} needs PyAV: pip install 'qwenkit[media]'") from exc
    try:
        with av.open(io.BytesIO(data)) as container:
            yield container
    except (av.error.FFmpegError, IndexError, ValueError, EOFError) as exc:
        raise QwenkitError(f"cannot decode the {what} ({exc})") from exc
