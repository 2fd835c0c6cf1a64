"""The grammar as a logits processor: one bitmask filled for every constrained row of the batch
(xgrammar's batched, threaded fill), applied to the logits in one native call.

Measured on the default model (benchmarks/structured_outputs.py, 2 shared cores): filling and
applying the mask takes 0.5-2% of a JSON-schema run's wall time at batch 1 and 16 (0.1 ms per
row per step in a JSON string, a few ms for structure). Two things this does not do, on purpose:
- Fill on a worker thread during the forward pass: the forward already runs torch on every core
  here, so the fill would compete for them rather than overlap, to save at most those 0.5-2%.

Jump-forward: what the grammar forces next (`find_jump_forward_tokens`, e.g. `"name": "` after `{`
in a schema) is offered to the engine as a draft (`forced_tokens`) and verified like any drafted
tokens (engine/speculative.py): each position samples under the mask the grammar would have there
(`after_draft`), and a forced token is kept only if the model samples it itself. So a forced run
costs one multi-token step, and the output stays exactly the model's: where xgrammar's split of the
forced text differs from the one the model prefers (`"` + `, "` versus `",` + ` "`), the model's
token wins and the rest of the draft is dropped.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr

from qwenkit.engine.logits_process import LogitsProcessor, ProcessorContext
from qwenkit.structured.compiler import compiler_for
from qwenkit.tokenizer.reasoning import THINK_CLOSE

if TYPE_CHECKING:
    from qwenkit.structured.spec import GuidedDecoding


class _Bitmask:
    """A bitmask buffer reused across steps (grown when a batch is wider)."""

    def __init__(self):
        self.tensor = torch.empty(0, 0, dtype=torch.int32)
        self.lock = threading.Lock()

    def rows(self, batch: int, vocab: int) -> torch.Tensor:
        words = (vocab + 31) // 32
        if self.tensor.shape[0] < batch or self.tensor.shape[1] != words:
            self.tensor = xgr.allocate_token_bitmask(batch, vocab)
        return self.tensor


_BITMASK = _Bitmask()
_BATCH = xgr.BatchGrammarMatcher(max_threads=2)


def _apply_mask(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int, rows: list[int]) -> None:
    """The filled bitmask rows onto those logits rows, in one native call; ids past the tokenizer's
    vocabulary (the model's padded rows) are never allowed."""
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)
    if vocab < logits.shape[1]:
        logits[torch.tensor(rows), vocab:] = float("-inf")


class GrammarProcessor(LogitsProcessor):
    supports_drafts = True

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int, wait_for_token: int | None = None):
        """`wait_for_token`: stay unconstrained until this token (the </think> of a prompt that
        opened reasoning), so the grammar shapes the answer, not the thinking."""
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's; logits may be wider (padding rows)
        self.wait_for_token = wait_for_token

    @classmethod
    def apply(cls, logits, rows, processors):
        live = [(row, p) for row, p in zip(rows, processors) if p.wait_for_token is None and not p.matcher.is_terminated()]
        if not live:
            return
        indices = [row for row, _ in live]
        vocab = live[0][1].vocab_size  # one engine, one tokenizer: the bitmask has its width
        with _BITMASK.lock:
            bitmask = _BITMASK.rows(logits.shape[0], vocab)
            _BATCH.batch_fill_next_token_bitmask([p.matcher for _, p in live], bitmask, indices=indices)
            _apply_mask(logits, bitmask, vocab, indices)

    def accept(self, token_id: int) -> None:
        if self.wait_for_token is not None:
            if token_id == self.wait_for_token:
                self.wait_for_token = None
            return
        if self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} does not continue the grammar")

    def is_finished(self) -> bool:
        return self.wait_for_token is None and self.matcher.is_terminated()

    def after_draft(self, drafted: list[int]) -> LogitsProcessor:
        return _DraftedGrammar(self, tuple(drafted)) if drafted else self

    def forced_tokens(self) -> list[int]:
        if self.wait_for_token is not None or self.matcher.is_terminated():
            return []
        return self.matcher.find_jump_forward_tokens()

    def grammar_tokens(self, drafted: tuple[int, ...]) -> tuple[int, ...] | None:
        """Which drafted tokens the grammar reads: those after </think> while it waits for it
        (None: still waiting, so the position is unconstrained)."""
        if self.wait_for_token is None:
            return drafted
        if self.wait_for_token not in drafted:
            return None
        return drafted[drafted.index(self.wait_for_token) + 1 :]


class _DraftedGrammar(LogitsProcessor):
    """A grammar's mask at a drafted position: its matcher accepts the drafts before the position,
    fills the row, and is rolled back, so the sequence's own state is untouched."""

    def __init__(self, parent: GrammarProcessor, drafted: tuple[int, ...]):
        self.parent, self.drafted = parent, drafted

    @classmethod
    def apply(cls, logits, rows, processors):
        chains: dict[int, list[tuple[int, _DraftedGrammar]]] = {}
        for row, view in zip(rows, processors):
            chains.setdefault(id(view.parent), []).append((row, view))
        vocab = processors[0].parent.vocab_size
        masked: list[int] = []
        with _BITMASK.lock:
            bitmask = _BITMASK.rows(logits.shape[0], vocab)
            for chain in chains.values():
                chain.sort(key=lambda rv: len(rv[1].drafted))
                matcher, accepted, valid = chain[0][1].parent.matcher, 0, True
                for row, view in chain:
                    tokens = view.parent.grammar_tokens(view.drafted)
                    if tokens is None:
                        continue  # the grammar has not engaged at this position
                    while valid and accepted < len(tokens):
                        # A draft the grammar refuses is never sampled at its own position, so the
                        # positions after it are discarded whatever their rows hold.
                        valid = not matcher.is_terminated() and matcher.accept_token(tokens[accepted])
                        accepted += valid
                    if valid and not matcher.is_terminated():
                        matcher.fill_next_token_bitmask(bitmask, row)
                        masked.append(row)
                if accepted:
                    matcher.rollback(accepted)
            if masked:
                _apply_mask(logits, bitmask, vocab, masked)

    def accept(self, token_id: int) -> None:
        raise RuntimeError("a drafted position's view never accepts tokens; the sequence's own processor does")


def grammar_processor(spec: GuidedDecoding, ctx: ProcessorContext) -> GrammarProcessor:
    compiler = compiler_for(ctx.tokenizer)
    matcher = xgr.GrammarMatcher(compiler.compile(spec), terminate_without_stop_token=False)
    wait = ctx.tokenizer.token_to_id(THINK_CLOSE) if ctx.thinking_open else None
    return GrammarProcessor(matcher, compiler.vocab_size, wait)
