"""The grammar as a logits processor: one bitmask filled for every constrained row of the batch
(xgrammar's batched, threaded fill), applied to the logits in one native call.

Measured on the default model (benchmarks/structured_outputs.py, 2 shared cores): filling and
applying the mask takes 0.5-2% of a JSON-schema run's wall time at batch 1 and 16 (0.1 ms per
row per step in a JSON string, a few ms for structure). Two things this does not do, on purpose:
- Fill on a worker thread during the forward pass: the forward already runs torch on every core
  here, so the fill would compete for them rather than overlap, to save at most those 0.5-2%.
- Jump-forward of forced text (`GrammarMatcher.find_jump_forward_string`): the forced string has
  to become tokens the model did not choose (a retokenization that can differ from how the model
  would have split it, e.g. `"` + `, "` versus `",` + ` "`, which changes what follows), and
  appending several tokens to a sequence in one step needs the multi-token decode path that
  speculative decoding adds to the engine.
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


class GrammarProcessor(LogitsProcessor):
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
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=indices)
        if vocab < logits.shape[1]:  # ids the tokenizer does not have (the model's padded rows)
            logits[torch.tensor(indices), vocab:] = float("-inf")

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


def grammar_processor(spec: GuidedDecoding, ctx: ProcessorContext) -> GrammarProcessor:
    compiler = compiler_for(ctx.tokenizer)
    matcher = xgr.GrammarMatcher(compiler.compile(spec), terminate_without_stop_token=False)
    wait = ctx.tokenizer.token_to_id(THINK_CLOSE) if ctx.thinking_open else None
    return GrammarProcessor(matcher, compiler.vocab_size, wait)
