"""Speculative decoding: a drafter guesses the next tokens, one forward pass checks them all.

Decoding one token reads every weight once, so a decode step costs about the same for 1 token as
for a few. Each step, a sequence that speculates runs its last token plus up to k drafted tokens
as one chunk of the batch (the runner gives each of them logits); the engine samples every
position as usual and keeps the drafts up to the first one the model would not have produced,
plus the model's own token at that position (the correction, or the bonus token when all were
right). So a step emits between 1 and k + 1 tokens, exactly as plain decoding would have:

- greedy: a draft is kept iff it is the argmax, so the output is token for token the same;
- sampling: rejection sampling (Leviathan et al. 2023, Chen et al. 2023) keeps the distribution
  (`sample_against_draft`).

Drafting backs off per sequence when its guesses miss (`SpeculationState.record`), so text the
drafter cannot predict decodes at plain speed. The drafter here is prompt lookup (n-gram): code
edits and answers about given code copy long spans of their input, and finding them is free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.engine.sequence import Sequence

# After drafting falls to k = 0, wait this many decode steps before guessing again (one token);
# each further miss doubles the wait, up to the maximum, so a text the drafter never predicts
# pays for about one 2-token verification every RETRY_MAX_STEPS steps.
RETRY_MIN_STEPS = 8
RETRY_MAX_STEPS = 256


def sample_against_draft(probs: torch.Tensor, draft: int, generator: torch.Generator | None) -> int:
    """A token distributed as `probs`, equal to `draft` whenever the draft can be kept.

    Rejection sampling for a drafter whose proposal is a point mass q = δ(draft) (prompt lookup,
    or any deterministic guess): keep the draft with probability min(1, p(x) / q(x)) = p(x); else
    draw from the residual normalize(max(p - q, 0)), which is p with the draft removed. The
    result is exactly p, and a rejection never returns the draft, so the caller sees where the
    accepted prefix ends by comparing tokens.
    """
    p_draft = float(probs[draft])
    if float(torch.rand((), generator=generator)) < p_draft:
        return draft
    residual = probs.clone()
    residual[draft] = 0.0
    if not float(residual.sum()) > 0:  # p was (numerically) all on the draft
        return draft
    return int(torch.multinomial(residual, 1, generator=generator))


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts the verification kept: the longest prefix the model sampled itself
    (`sampled[i]` is the model's token at the position of `drafts[i]`)."""
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return n


@dataclass
class SpeculationStats:
    """Totals over the engine's life (published to /metrics and `qwenkit bench`)."""

    num_verifications: int = 0  # sequence-steps that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step: the accepted drafts plus the model's own token (vLLM's
        "mean acceptance length")."""
        return 1 + self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0

    def since(self, before: SpeculationStats) -> SpeculationStats:
        return SpeculationStats(
            self.num_verifications - before.num_verifications,
            self.num_draft_tokens - before.num_draft_tokens,
            self.num_accepted_tokens - before.num_accepted_tokens,
        )

    def report(self) -> str:
        return (f"{self.acceptance_rate:.1%} of {self.num_draft_tokens} drafted tokens accepted, "
                f"{self.mean_accepted_length:.2f} tokens per verification")


@dataclass
class SpeculationState:
    """One sequence's speculation: what it drafted for this step and how far it should guess."""

    max_k: int
    k: int  # drafts to ask for next (adaptive)
    draft_token_ids: list[int] = field(default_factory=list)  # for the step being scheduled
    cooldown: int = 0  # decode steps left before drafting is retried
    retry_steps: int = RETRY_MIN_STEPS  # the next cool-down's length
    drafter_state: object | None = None  # the drafter's own per-sequence state (prompt lookup: NgramIndex)

    def record(self, drafted: int, accepted: int) -> None:
        """Adapt k to how the last verification went: guess further after a full hit, as far as the
        last run after a partial one, half as far after a miss; at zero, pause and retry later."""
        if accepted == drafted:
            self.k = min(self.max_k, 2 * self.k)
            self.retry_steps = RETRY_MIN_STEPS
        elif accepted:
            self.k = min(self.max_k, accepted + 1)
        else:
            self.k //= 2
            if self.k == 0:
                self.k, self.cooldown = 1, self.retry_steps
                self.retry_steps = min(RETRY_MAX_STEPS, 2 * self.retry_steps)


class Drafter(ABC):
    @abstractmethod
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Up to `num_tokens[i]` guesses of the tokens that follow `seqs[i]` (fewer, or none, when
        the drafter has no good guess; a guess costs verification time)."""

    def release(self, seq: Sequence) -> None:
        """The sequence is done: free whatever the drafter holds for it."""


class NgramIndex:
    """The latest earlier occurrence of each n-gram (n in [min_n, max_n]) of a growing token list,
    indexed incrementally: each new token costs max_n - min_n + 1 dict updates."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.end_of: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self.indexed_to = 0  # n-grams ending before this position are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """The k tokens that followed the latest earlier occurrence of the list's last n tokens,
        trying the longest n first (a longer match predicts better)."""
        end = len(tokens)
        # Index every n-gram but the list's own suffix (the one being looked up).
        for stop in range(max(self.indexed_to, self.min_n), end):
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                self.end_of[tuple(tokens[stop - n : stop])] = stop
        self.indexed_to = max(self.indexed_to, end)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            stop = self.end_of.get(tuple(tokens[end - n :]))
            if stop is not None:
                return tokens[stop : stop + k]
        return []


class NgramDrafter(Drafter):
    """Prompt lookup (vLLM's `ngram` method, llama.cpp's lookup decoding): continue the latest
    earlier place in the prompt or output that ends with the same n tokens."""

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise QwenkitError(f"prompt lookup needs 1 <= min n-gram <= max n-gram, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs, num_tokens):
        out = []
        for seq, k in zip(seqs, num_tokens):
            state = seq.speculation
            if not isinstance(state.drafter_state, NgramIndex):
                state.drafter_state = NgramIndex(self.min_n, self.max_n)
            out.append(state.drafter_state.propose(seq.token_ids, k))
        return out


class Speculator:
    """The engine's side of speculation: which sequences draft and how far, their drafts, the stats."""

    def __init__(self, drafter: Drafter, num_speculative_tokens: int):
        if num_speculative_tokens < 1:
            raise QwenkitError(f"num_speculative_tokens must be at least 1, got {num_speculative_tokens}")
        self.drafter = drafter
        self.num_speculative_tokens = num_speculative_tokens
        self.stats = SpeculationStats()

    def new_state(self, seq: Sequence) -> SpeculationState | None:
        """None when the sequence must decode one token at a time: the request opted out, or a
        logits processor (a grammar, a thinking budget) constrains it: processors keep state
        that `accept`s tokens one by one, so drafted positions could not be masked correctly."""
        if not seq.params.speculative or seq.sampling.processors:
            return None
        k = self.num_speculative_tokens
        return SpeculationState(max_k=k, k=k)

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Set the drafts of every running sequence that decodes this step."""
        asking, sizes = [], []
        for seq in running:
            state = seq.speculation
            if state is None:
                continue
            state.draft_token_ids = []
            if seq.num_uncomputed_tokens != 1:  # still prefilling
                continue
            if state.cooldown:
                state.cooldown -= 1
                continue
            # Every emitted token must fit max_tokens and the context; a step emits drafts + 1.
            room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - len(seq)) - 1
            k = min(state.k, room)
            if k > 0:
                asking.append(seq)
                sizes.append(k)
        if asking:
            for seq, drafts in zip(asking, self.drafter.propose(asking, sizes)):
                seq.speculation.draft_token_ids = drafts

    def release(self, seq: Sequence) -> None:
        if seq.speculation is not None:
            self.drafter.release(seq)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        self.stats.num_verifications += 1
        self.stats.num_draft_tokens += drafted
        self.stats.num_accepted_tokens += accepted
        seq.speculation.record(drafted, accepted)
        seq.speculation.draft_token_ids = []
