"""Turn a batch of fp32 logits into next tokens, each row with its own sampling parameters.

Order (as vLLM and the OpenAI API define it): logit bias, min_tokens masking, repetition
penalty (prompt and output), presence/frequency penalties (output only), then temperature,
top-k, top-p, min-p, and a draw from each sequence's own generator, so a seeded request samples
the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from qwenkit.engine.logits_process import LogitsProcessor, apply_processors
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.kernels import cpu_kernels


@dataclass
class SamplingRow:
    params: SamplingParams
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    generator: torch.Generator | None
    blocked_token_ids: frozenset[int]  # masked while below min_tokens
    processors: list[LogitsProcessor] = field(default_factory=list)
    # A row that verifies a drafted token (engine/speculative.py) keeps its generator's state after
    # its draw, so that the engine can rewind the draws of positions after a rejected draft.
    verifies: bool = False
    generator_state: torch.Tensor | None = None


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their logprobs


def _blocks_tokens(row: SamplingRow) -> bool:
    """Its stop tokens are masked: the output is still shorter than min_tokens."""
    return bool(row.blocked_token_ids) and len(row.token_ids) - row.num_prompt_tokens < row.params.min_tokens


def _changes_logits(row: SamplingRow) -> bool:
    p = row.params
    return bool(p.logit_bias or _blocks_tokens(row) or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Everything that changes logits before the distribution is shaped (in place on a copy;
    the logits themselves when no row changes them, the usual greedy case)."""
    if not any(_changes_logits(row) for row in rows):
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:  # ids checked against the vocabulary when the request came in
            logits[i, torch.tensor(list(p.logit_bias), dtype=torch.long)] += torch.tensor(list(p.logit_bias.values()))
        if _blocks_tokens(row):
            logits[i, torch.tensor(sorted(row.blocked_token_ids))] = float("-inf")
        if p.repetition_penalty != 1.0 and row.token_ids:
            seen = torch.tensor(sorted(set(row.token_ids)), dtype=torch.long)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(row.token_ids) > row.num_prompt_tokens:
            counts = torch.bincount(torch.tensor(row.token_ids[row.num_prompt_tokens :]), minlength=vocab)[:vocab]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def finite(logits: torch.Tensor) -> torch.Tensor:
    """Extreme parameters (a penalty of 1e-300, a temperature of 1e-30) must not make NaN probabilities."""
    if logits.numel() and bool(torch.isfinite(logits.abs().amax())):  # the usual case, checked in ~20 us
        return logits  # (amax propagates NaN; nan_to_num on 150k logits costs up to 1 ms per step)
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max / 2)


def shape_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of one row after temperature, top-k, top-p and min-p."""
    logits = finite(logits / params.temperature)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already reach top_p; the first always stays.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:  # nothing sensible left: fall back to the best token
        probs = torch.zeros_like(probs).scatter_(0, torch.argmax(logits).view(1), 1.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    return probs


def _unblock_where_nothing_is_left(logits: torch.Tensor, processed: torch.Tensor, rows: list[SamplingRow]) -> None:
    """A processor's mask and min_tokens can leave a row no token at all: a grammar that has reached
    its end allows only the end-of-text token, which min_tokens holds back. The grammar is the hard
    constraint (its output must parse), so such a row is processed again without the min_tokens
    mask and ends early, as `stop`. `apply` only reads a processor's state (LogitsProcessor says
    so), so running it twice in a step is safe."""
    candidates = [i for i, row in enumerate(rows) if row.processors and _blocks_tokens(row)]
    if not candidates:
        return
    best = processed[candidates].amax(-1)
    for i, value in zip(candidates, best.tolist()):
        if value != float("-inf"):
            continue
        row = replace(rows[i], blocked_token_ids=frozenset())
        view = logits[i : i + 1]
        again = apply_penalties(view, [row])
        if again is view:
            again = view.clone()  # apply_penalties hands back its input when it changes nothing: keep the caller's logits
        failed = apply_processors(again, [row.processors])
        if failed:
            raise RowSamplingError(i, failed[0])
        processed[i] = again[0]


def _row_max(logits: torch.Tensor) -> tuple[list[float], list[int]]:
    """torch.max(logits, -1) as lists: the native kernels' vector pass over the rows where they
    are built (4-5x torch's one-thread reduction over 16 x 151,936 logits), else torch's."""
    if logits.shape[0] == 0:
        return [], []
    kernels = cpu_kernels()
    values, indices = kernels.row_max(logits) if kernels is not None and logits.dtype == torch.float32 else logits.max(-1)
    return values.tolist(), indices.tolist()


class RowSamplingError(Exception):
    """Sampling failed for one row (its own parameters or processors), not for the batch."""

    def __init__(self, row: int, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.row, self.cause = row, cause


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [len(rows), vocab] fp32. Returns a token per row and, where asked, its logprobs.

    Raises RowSamplingError naming the first row whose own logits processors failed.
    """
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in rows):
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    processed = apply_penalties(logits, rows)
    if any(r.processors for r in rows):
        if processed is logits:  # processors write in place: never into the caller's (inference-mode) logits
            processed = logits.clone()
        failed = apply_processors(processed, [r.processors for r in rows])
        if failed:
            row = min(failed)
            raise RowSamplingError(row, failed[row])
        _unblock_where_nothing_is_left(logits, processed, rows)
    tokens: list[int] = []
    # The greedy rows' maxima in one pass over the batch instead of one call per row.
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    best_values, best_indices = _row_max(processed if len(greedy) == len(rows) else processed[greedy])
    best_of = {i: (value, index) for i, value, index in zip(greedy, best_values, best_indices)}
    for i, row in enumerate(rows):
        if row.params.greedy:
            # max propagates NaN: a finite best means a clean row
            best, index = best_of[i]
            if not math.isfinite(best):
                index = int(torch.argmax(finite(processed[i])))
            tokens.append(index)
        else:  # shape_distribution makes the row finite itself
            probs = shape_distribution(processed[i], row.params)
            tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
            if row.verifies and row.generator is not None:
                row.generator_state = row.generator.get_state()
    logprobs: list[TokenLogprobs | None] = []
    for i, row in enumerate(rows):
        k = row.params.logprobs
        if k is None:
            logprobs.append(None)
            continue
        top = torch.topk(raw_logprobs[i], k) if k else None
        logprobs.append(
            TokenLogprobs(
                tokens[i],
                float(raw_logprobs[i, tokens[i]]),
                list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            )
        )
    return tokens, logprobs
