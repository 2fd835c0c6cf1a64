"""Streaming detokenization that only ever emits complete UTF-8 characters.

`tokenizers`' own DecodeStream does the work (it holds text back while it ends in a partial
character); measured on the default model's tokenizer it takes ~0.7 us per token against ~8 us
for decoding a window of tokens twice per step in Python. What it still holds when generation
ends (an incomplete character cut by max_tokens) comes out of `flush`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from qwenkit.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text they add (the deltas add up to the full decode)."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # tokens whose text the stream has not given out yet

    def add(self, token_id: int) -> str:
        text = self._stream.step(self.tokenizer.backend, token_id)
        if text is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (possibly an incomplete character).

        Byte-level text decodes token by token, and the stream only gives text out at character
        boundaries, so the held tokens decoded alone are the full decode's remaining tail.
        """
        text = self.tokenizer.decode(self._held, skip_special_tokens=self.skip_special_tokens)
        self._held = []
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return text
