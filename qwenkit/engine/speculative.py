"""Speculative decoding: a drafter guesses the next tokens, one forward pass checks them all.

Decoding one token reads every weight once, so a decode step costs about the same for 1 token as
for a few. Each step, a sequence that speculates runs its last token plus up to k drafted tokens
as one chunk of the batch (the runner gives each of them logits); the engine samples every
position as usual and keeps the drafts up to the first one the model would not have produced,
plus the model's own token at that position (the correction, or the bonus token when all were
right). So a step emits between 1 and k + 1 tokens, exactly as plain decoding would have:

- greedy: a draft is kept iff it is the argmax, so the output is token for token the same;
- sampling: every position samples its token from the model's distribution p as usual, and a
  draft is kept iff it equals that token. For a drafter whose proposal is a point mass q = δ(x)
  (prompt lookup, a draft model's argmax) this is exactly the rejection sampling of Leviathan et
  al. 2023 / Chen et al. 2023: x is kept with probability p(x) = min(1, p(x) / q(x)), and after a
  rejection the token is distributed as p given it is not x, i.e. the residual
  normalize(max(p - q, 0)). The draws of positions after a rejection are rewound (the sampler
  keeps each verification row's generator state), so a seeded request draws exactly what it
  would have without speculation: the same seed gives the same output with or without it, and
  whatever k the timing-dependent choice below made.

How far each sequence guesses weighs its recent acceptance against what a bigger step was
measured to cost here (`SpeculationState.choose_k`, `StepCosts`); when no guess pays, the sequence
decodes plainly and retries rarely, so text the drafter cannot predict decodes at plain speed. The drafter here is prompt lookup (n-gram): code
edits and answers about given code copy long spans of their input, and finding them is free.

Jump-forward: a logits processor that knows its next tokens for certain (a grammar after `{` in a
JSON schema forces `"name": "`) offers them (`forced_tokens`), and they are drafted ahead of any
drafter, whether or not the engine speculates otherwise. They are verified like any draft, each
position under the processor's mask as it would be there (`after_draft`), so the output is exactly
the model's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.engine.sequence import Sequence

# Until a step size has been timed, each token beyond a decode's is assumed to cost this fraction
# of a decode step (optimistic, so that larger steps get tried and then measured).
PRIOR_TOKEN_COST = 0.25
# Draft only when the expected tokens per unit of time beat plain decoding by this much: a guess
# that is barely worth it on paper is not worth the noise in the estimates.
MIN_GAIN = 0.05
# A step is estimated no cheaper than a smaller one timed within this many steps (StepCosts.estimate).
ENVELOPE_OBSERVATIONS = 200
# Acceptance statistics decay by this factor per verification (about the last 10 count).
DECAY = 0.9
# When drafting does not pay, wait this many decode steps before one cheap retry (a single drafted
# token); each fruitless retry doubles the wait, up to the maximum.
RETRY_MIN_STEPS = 8
RETRY_MAX_STEPS = 256


@dataclass
class StepCosts:
    """Seconds of decode-only steps by their number of tokens (moving averages): what a drafted
    token costs on this machine. Verifying k drafts is not free on CPU, and how far from free
    depends on the kernels and the cores, so it is measured rather than assumed."""

    seconds: dict[int, float] = field(default_factory=dict)
    observed_at: dict[int, int] = field(default_factory=dict)  # the count of observations when each size was last timed
    observations: int = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        old = self.seconds.get(num_tokens)
        self.seconds[num_tokens] = seconds if old is None else 0.8 * old + 0.2 * seconds
        self.observations += 1
        self.observed_at[num_tokens] = self.observations

    def estimate(self, num_tokens: int, floor_from: int = 0) -> float:
        """Seconds of a step of `num_tokens`: as measured; between two measured sizes, on the line
        between them; past the largest, its time plus PRIOR_TOKEN_COST decode steps per extra token
        (in units of a decode step until anything was timed). Never less than a smaller size, from
        `floor_from` (the step's plain size) on, timed in the last ENVELOPE_OBSERVATIONS steps:
        timings of neighbouring sizes differ by +-20% on a busy machine, and where a drafted token
        costs about a sequence's own one (16 sequences on 2 AVX2 cores: 16 tokens 183 ms, 17 207,
        21 313, 22 224) the allocator kept taking the sizes that looked cheap by chance. Only
        recent timings bound (an old outlier ages out and the sizes it hid get tried again), and
        none below the plain step (a slow smaller step would raise the plain step's cost to that of
        its drafted sizes and make drafts look free)."""
        if not self.seconds:
            return 1 + PRIOR_TOKEN_COST * (num_tokens - 1)
        recent = self.observations - ENVELOPE_OBSERVATIONS
        smaller = max((s for t, s in self.seconds.items() if floor_from <= t < num_tokens and self.observed_at[t] > recent), default=0.0)
        return max(self._interpolated(num_tokens), smaller)

    def _interpolated(self, num_tokens: int) -> float:
        if num_tokens in self.seconds:
            return self.seconds[num_tokens]
        smallest = min(self.seconds)
        decode_step = self.seconds[smallest] / (1 + PRIOR_TOKEN_COST * (smallest - 1))
        below = max((t for t in self.seconds if t < num_tokens), default=None)
        above = min((t for t in self.seconds if t > num_tokens), default=None)
        if below is None:
            return decode_step * (1 + PRIOR_TOKEN_COST * (num_tokens - 1))
        if above is not None:
            share = (num_tokens - below) / (above - below)
            return self.seconds[below] + share * (self.seconds[above] - self.seconds[below])
        return self.seconds[below] + decode_step * PRIOR_TOKEN_COST * (num_tokens - below)

    def measured_above(self, num_tokens: int) -> bool:
        return any(t > num_tokens for t in self.seconds)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a verification of k drafts emits when each draft is kept with probability alpha
    (given the ones before it were): 1 + alpha + ... + alpha^k."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def best_k(alpha: float, max_k: int, relative_cost) -> int:
    """The number of drafts that maximizes expected tokens per unit of time; 0 when none beats
    plain decoding by MIN_GAIN. `relative_cost(k)`: a step with k drafts over one without."""
    best, best_value = 0, 1 + MIN_GAIN
    for k in range(1, max_k + 1):
        value = expected_tokens(alpha, k) / relative_cost(k)
        if value > best_value:
            best, best_value = k, value
    return best


def allocate_drafts(alphas: list[float], caps: list[int], base: int, step_cost) -> list[int]:
    """How many drafts each of a step's sequences verifies, when they share the step: a draft adds a
    token to the step for every sequence. Drafts are ranked by their chance of being kept (sequence
    i's (k+1)-th is kept with probability alpha_i^(k+1)), up to each sequence's own choice `caps[i]`,
    and the step takes the run of the best-ranked ones that gives the most expected tokens per second.
    (The whole run is weighed, not draft by draft: a step's cost grows in jumps, e.g. at a kernel's
    tile size, so one more token can cost more than the next seven.)
    `step_cost(n)`: seconds (or any unit) of a step of n tokens; `base`: the step's tokens without drafts."""
    ks = [0] * len(alphas)
    order: list[int] = []
    gains: list[float] = []
    for _ in range(sum(caps)):
        best = max((i for i in range(len(alphas)) if ks[i] < caps[i]), key=lambda i: alphas[i] ** (ks[i] + 1))
        gains.append(alphas[best] ** (ks[best] + 1))
        order.append(best)
        ks[best] += 1
    # As best_k: drafting must beat the plain step by MIN_GAIN.
    expected, best_value, best_count = float(base), (1 + MIN_GAIN) * base / step_cost(base), 0
    for count, gain in enumerate(gains, start=1):
        expected += gain
        value = expected / step_cost(base + count)
        if value > best_value:
            best_value, best_count = value, count
    chosen = [0] * len(alphas)
    for i in order[:best_count]:
        chosen[i] += 1
    return chosen


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
    # Jump-forward (tokens a logits processor forced, drafted apart from the drafter's and not counted above).
    num_forced_draft_tokens: int = 0
    num_forced_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step: the accepted drafts plus the model's own token (vLLM's
        "mean acceptance length")."""
        return 1 + self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0

    def since(self, before: SpeculationStats) -> SpeculationStats:
        return SpeculationStats(*(getattr(self, f.name) - getattr(before, f.name) for f in fields(self)))

    def report(self) -> str:
        parts = []
        if self.num_draft_tokens or not self.num_forced_draft_tokens:
            parts.append(f"{self.acceptance_rate:.1%} of {self.num_draft_tokens} drafted tokens accepted, "
                         f"{self.mean_accepted_length:.2f} tokens per verification")
        if self.num_forced_draft_tokens:
            parts.append(f"jump-forward: {self.num_forced_accepted_tokens} of {self.num_forced_draft_tokens} forced tokens kept")
        return "; ".join(parts)


@dataclass
class SpeculationState:
    """One sequence's speculation: what it drafted for this step, and how often its drafts are kept."""

    max_k: int
    draft_token_ids: list[int] = field(default_factory=list)  # for the step being scheduled
    forced: bool = False  # the drafts are a processor's forced tokens (jump-forward), not the drafter's
    # Decayed counts of kept drafts and of verifications that ended in a rejected one (the prior
    # says 2 of 3: worth a first try); alpha = kept / (kept + rejected) per drafted token.
    kept: float = 2.0
    rejected: float = 1.0
    cooldown: int = 0  # decode steps left before drafting is retried
    retry_steps: int = RETRY_MIN_STEPS  # the next cool-down's length
    drafter_state: object | None = None  # the drafter's own per-sequence state (prompt lookup: NgramIndex)

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def record(self, drafted: int, accepted: int) -> None:
        self.kept = DECAY * self.kept + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)
        if accepted:
            self.retry_steps = RETRY_MIN_STEPS

    def choose_k(self, relative_cost) -> int:
        """How many drafts to ask for this step: the best trade of expected tokens against the
        step's cost; when none pays, pause (cooldown) and then retry with one, so that a sequence
        whose text turns predictable later gets to show it."""
        if self.cooldown:
            self.cooldown -= 1
            return 1 if self.cooldown == 0 else 0
        k = best_k(self.alpha, self.max_k, relative_cost)
        if k == 0:
            self.cooldown = self.retry_steps
            self.retry_steps = min(RETRY_MAX_STEPS, 2 * self.retry_steps)
        return k


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
    """The engine's side of speculation: which sequences draft and how far, their drafts, the stats.
    Without a drafter it drafts only what logits processors force (jump-forward)."""

    def __init__(self, drafter: Drafter | None, num_speculative_tokens: int):
        if num_speculative_tokens < 1:
            raise QwenkitError(f"num_speculative_tokens must be at least 1, got {num_speculative_tokens}")
        self.drafter = drafter
        self.num_speculative_tokens = num_speculative_tokens
        self.stats = SpeculationStats()
        self.costs = StepCosts()

    def new_state(self, seq: Sequence) -> SpeculationState | None:
        """None when the sequence must decode one token at a time: the request opted out, a
        logits processor constrains it that cannot mask drafted positions (a thinking budget;
        a grammar can), it carries media (not verified with M-RoPE positions yet), or there is
        nothing to draft (no drafter and no processor that may force tokens)."""
        processors = seq.sampling.processors
        if not seq.params.speculative or seq.media is not None or not all(p.supports_drafts for p in processors):
            return None
        if self.drafter is None and not processors:
            return None
        return SpeculationState(max_k=self.num_speculative_tokens)

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        """Set the drafts of every running sequence that decodes this step."""
        for seq in running:  # drafts are for one step only
            if seq.speculation is not None:
                seq.speculation.draft_token_ids = []
        decoding = [seq for seq in running if seq.num_uncomputed_tokens == 1]
        base = max(1, len(decoding))  # the step's tokens without drafts
        base_cost = self.costs.estimate(base)

        def step_cost(num_tokens: int) -> float:
            return self.costs.estimate(num_tokens, floor_from=base)

        def relative_cost(k: int) -> float:
            return step_cost(base + k) / base_cost

        asking, caps = [], []
        for seq in decoding:
            state = seq.speculation
            if state is None:
                continue
            # Every emitted token must fit max_tokens and the context; a step emits drafts + 1.
            room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - len(seq)) - 1
            forced = next((tokens for p in seq.sampling.processors if (tokens := p.forced_tokens())), [])
            state.forced = bool(forced) and room > 0
            if state.forced:  # certain tokens: worth a verification whatever the drafter's record
                state.draft_token_ids = forced[: min(room, self.num_speculative_tokens)]
                continue
            if self.drafter is None:
                continue
            k = min(state.choose_k(relative_cost), room)  # what this sequence would draft alone
            if k > 0:
                asking.append(seq)
                caps.append(k)
        if not asking:
            return
        # With many sequences in the step, their drafts add up: share the step's tokens out, by
        # measured costs. Until a step bigger than plain decoding's has been timed, one draft each
        # times one cheaply (a step's cost can jump: past the kernels' token limit the GGUF
        # products take the dense path, and 16 sequences' own choices made a 61-token step cost
        # 12x a 16-token one here).
        if self.costs.measured_above(base):
            sizes = allocate_drafts([seq.speculation.alpha for seq in asking], caps, base, step_cost)
        else:
            sizes = [1] * len(asking)
        asking, sizes = [seq for seq, k in zip(asking, sizes) if k], [k for k in sizes if k]
        if asking:
            for seq, drafts in zip(asking, self.drafter.propose(asking, sizes)):
                seq.speculation.draft_token_ids = drafts

    def release(self, seq: Sequence) -> None:
        if seq.speculation is not None and self.drafter is not None:
            self.drafter.release(seq)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        state = seq.speculation
        if state.forced:  # the drafter's record and the stats of its guesses stay its own
            self.stats.num_forced_draft_tokens += drafted
            self.stats.num_forced_accepted_tokens += accepted
        else:
            self.stats.num_verifications += 1
            self.stats.num_draft_tokens += drafted
            self.stats.num_accepted_tokens += accepted
            state.record(drafted, accepted)
        state.draft_token_ids = []
        state.forced = False
