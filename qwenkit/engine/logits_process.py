"""Per-request logits processors: plug-ins that change a sequence's logits before it samples.

A processor holds one sequence's state (each of a request's n samples gets its own, made by the
same factory). Each step the sampler groups the rows that carry processors by class and calls
that class's `apply` once with all of them, so a processor can work on the whole batch at once
(one bitmask for every grammar-constrained row, one masked fill for every forced token) instead
of a Python loop per row. After a token is appended, each of the sequence's processors `accept`s
it. The thinking budget is the first user; grammar-constrained output plugs in the same way.

Factories see a `ProcessorContext` and return a processor, or None when the request does not
need one; `BUILTIN_FACTORIES` are asked for every sequence, `SamplingParams.logits_processors`
add a request's own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.tokenizer.reasoning import THINK_CLOSE, THINK_OPEN

if TYPE_CHECKING:
    from qwenkit.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class ProcessorContext:
    tokenizer: Tokenizer
    params: SamplingParams
    prompt_token_ids: list[int]
    thinking_open: bool  # the prompt ended inside <think> (the chat template opened it)


class LogitsProcessor(ABC):
    # Speculative verification (engine/speculative.py) samples several positions of a sequence in
    # one step, each as if the drafted tokens before it were already accepted. A processor whose
    # state can be looked at that way says so and gives `after_draft`; a sequence with any other
    # processor decodes one token at a time.
    supports_drafts: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def apply(cls, logits: torch.Tensor, rows: list[int], processors: list[LogitsProcessor]) -> None:
        """Change `logits[rows[i]]` for `processors[i]`, in place (logits: fp32 [batch rows, vocab]).

        Must only read the processors' state (state changes belong in `accept`): the sampler may
        apply a row's processors again in the same step (sampler.py: a grammar that min_tokens
        left without a token)."""

    @abstractmethod
    def accept(self, token_id: int) -> None:
        """The sequence's newest token (sampled under this processor's mask, or not)."""

    def is_finished(self) -> bool:
        """True once the sequence must stop (e.g. a grammar that reached its end)."""
        return False

    def after_draft(self, drafted: list[int]) -> LogitsProcessor:
        """The processor of the position after `drafted` (tokens not accepted yet), for verification;
        it must leave this processor's own state as it was. Only asked when `supports_drafts`."""
        raise NotImplementedError(f"{type(self).__name__} cannot verify drafted tokens")

    def forced_tokens(self) -> list[int]:
        """Tokens this processor certainly forces next (jump-forward): the engine drafts them, so a
        forced run costs one verification instead of a step per token. Empty: none."""
        return []


LogitsProcessorFactory = Callable[[ProcessorContext], "LogitsProcessor | None"]


def force_tokens(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> None:
    """Leave exactly one possible token in each row: every sampling setting then picks it."""
    index = torch.tensor(rows, dtype=torch.long)
    logits[index] = float("-inf")
    logits[index, torch.tensor(tokens, dtype=torch.long)] = 0.0


THINKING_BUDGET_CLOSE = "\n" + THINK_CLOSE + "\n\n"


class ThinkingBudget(LogitsProcessor):
    """Ends a <think> section after `budget` tokens by forcing "\\n</think>\\n\\n"."""

    def __init__(self, budget: int, open_id: int | None, close_id: int | None, close_ids: list[int], in_thinking: bool):
        self.budget, self.open_id, self.close_id, self.close_ids = budget, open_id, close_id, close_ids
        self.in_thinking = in_thinking
        self.thinking_tokens = 0
        self.forced: list[int] = []  # still to come of the close sequence

    @classmethod
    def apply(cls, logits, rows, processors):
        forcing = [(row, p.forced[0]) for row, p in zip(rows, processors) if p.forced]
        if forcing:
            force_tokens(logits, [r for r, _ in forcing], [t for _, t in forcing])

    def accept(self, token_id: int) -> None:
        if self.forced:
            self.forced.pop(0)
        if token_id == self.open_id:
            self.in_thinking, self.thinking_tokens = True, 0
        elif token_id == self.close_id:  # sampled, or the forced close (whose "\n\n" still follows)
            self.in_thinking = False
        elif self.in_thinking:
            self.thinking_tokens += 1
            if self.thinking_tokens >= self.budget and not self.forced:
                self.forced = list(self.close_ids)


def thinking_budget(ctx: ProcessorContext) -> ThinkingBudget | None:
    if ctx.params.thinking_budget is None:
        return None
    tok = ctx.tokenizer
    return ThinkingBudget(
        ctx.params.thinking_budget, tok.token_to_id(THINK_OPEN), tok.token_to_id(THINK_CLOSE),
        tok.encode(THINKING_BUDGET_CLOSE, add_special_tokens=False), ctx.thinking_open,
    )


BUILTIN_FACTORIES: tuple[LogitsProcessorFactory, ...] = (thinking_budget,)


def make_processors(ctx: ProcessorContext) -> list[LogitsProcessor]:
    factories = (*BUILTIN_FACTORIES, *ctx.params.logits_processors)
    return [p for f in factories if (p := f(ctx)) is not None]


def apply_processors(logits: torch.Tensor, per_row: list[list[LogitsProcessor]]) -> dict[int, Exception]:
    """Every row's processors, one `apply` call per processor class for the whole batch.

    A class whose batched call fails is called again row by row, so only the rows whose own
    processor fails are reported (row -> exception); the others are processed as usual.
    """
    groups: dict[type[LogitsProcessor], tuple[list[int], list[LogitsProcessor]]] = {}
    for row, processors in enumerate(per_row):
        for p in processors:
            rows, members = groups.setdefault(type(p), ([], []))
            rows.append(row)
            members.append(p)
    failed: dict[int, Exception] = {}
    for cls, (rows, members) in groups.items():
        try:
            cls.apply(logits, rows, members)
        except Exception:
            for row, p in zip(rows, members):
                try:
                    cls.apply(logits, [row], [p])
                except Exception as exc:
                    failed.setdefault(row, exc)
    return failed
