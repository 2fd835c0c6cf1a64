"""M-RoPE positions of a prompt with images and videos (transformers' `get_rope_index`).

Text tokens advance one position on all three axes. The tokens of an image or video take
(temporal, height, width) positions of their merged grid, offset by where they start; the text
after them resumes one past the largest position used. Decoding continues from there: token i of
the sequence (i >= prompt length) sits at i + `delta` on every axis.

"One past the largest position" is the rule Qwen's own code, vLLM and transformers 4 use. The
transformers 5 in our venv advances text after a video by only max(height, width) of its grid,
ignoring the temporal extent; the two agree for images and for videos whose last temporal
position is below that (the tests use such a video), and differ for longer videos, where
qwenkit keeps the rule the models were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenkit.config import VisionConfig
from qwenkit.errors import QwenkitError


@dataclass(frozen=True)
class VisionItem:
    """One image or video of a prompt, as the preprocessor cut it."""

    grid: tuple[int, int, int]  # (t, h, w) in patches
    is_video: bool = False
    seconds_per_grid: float = 1.0  # video seconds per temporal patch (Qwen2.5-VL's temporal positions)

    def num_tokens(self, merge: int) -> int:
        t, h, w = self.grid
        return t * h * w // (merge * merge)


@dataclass(frozen=True)
class MropePositions:
    positions: torch.Tensor  # [3, prompt tokens]
    delta: int  # position of token i beyond the prompt is i + delta (on all three axes)

    def for_decode(self, start: int, count: int = 1) -> torch.Tensor:
        """[3, count] positions of tokens start .. start+count-1 generated after the prompt."""
        return (torch.arange(start, start + count) + self.delta).expand(3, count)


def mrope_positions(token_ids: Sequence[int], items: Sequence[VisionItem], vision: VisionConfig) -> MropePositions:
    merge = vision.spatial_merge_size
    placeholder = {vision.image_token_id: False, vision.video_token_id: True}
    parts: list[torch.Tensor] = []
    pending = list(items)
    next_pos, i, n = 0, 0, len(token_ids)
    while i < n:
        if token_ids[i] not in placeholder:
            start = i
            while i < n and token_ids[i] not in placeholder:
                i += 1
            parts.append((torch.arange(i - start) + next_pos).expand(3, -1))
            next_pos += i - start
            continue
        if not pending:
            raise QwenkitError("the prompt has more image/video placeholder tokens than images and videos")
        item = pending.pop(0)
        count = item.num_tokens(merge)
        if item.is_video != placeholder[token_ids[i]] or list(token_ids[i : i + count]) != [token_ids[i]] * count:
            kind = "video" if item.is_video else "image"
            raise QwenkitError(f"a {kind} of grid {item.grid} needs {count} consecutive placeholder tokens here")
        t, h, w = item.grid
        step = vision.tokens_per_second * item.seconds_per_grid if item.is_video and vision.tokens_per_second else 1.0
        temporal = (torch.arange(t) * step).long()
        grid = torch.stack(
            torch.meshgrid(temporal, torch.arange(h // merge), torch.arange(w // merge), indexing="ij")
        ).reshape(3, -1)
        parts.append(grid + next_pos)
        next_pos = int(parts[-1].max()) + 1
        i += count
    if pending:
        raise QwenkitError(f"{len(pending)} image(s)/video(s) have no placeholder tokens in the prompt")
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.int64)
    return MropePositions(positions, next_pos - n)
