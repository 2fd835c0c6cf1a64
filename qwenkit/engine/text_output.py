"""Per-sample output text: incremental detokenization, stop strings, and what may be streamed."""

from __future__ import annotations

from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.tokenizer.detokenizer import IncrementalDetokenizer
from qwenkit.tokenizer.tokenizer import Tokenizer


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stops = params.stop
        # A stop string may start in text already produced; hold back that much while streaming.
        self.hold_back = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def add_token(self, token_id: int) -> str | None:
        """Add a generated token; return the stop string it completed, if any (the text is cut before it)."""
        delta = self.detokenizer.add(token_id)
        return self._append(delta)

    def finish(self) -> str | None:
        return self._append(self.detokenizer.flush())

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += delta
        if not self.stops:
            return None
        found = [(i, s) for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if not found:
            return None
        index, stop = min(found)
        self.text = self.text[:index]
        return stop

    def take_new_text(self, finished: bool) -> str:
        """Text not yet sent that can no longer turn out to be part of a stop string."""
        upto = len(self.text) if finished or not self.stops else max(self.sent, len(self.text) - self.hold_back)
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
