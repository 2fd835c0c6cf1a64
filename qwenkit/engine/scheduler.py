"""Which sequences run in the next step, and how many of their tokens.

Running sequences go first (a decode costs one token of the budget, an unfinished prefill
takes what is left of it in a chunk), then waiting ones are admitted in arrival order while the
token budget, the seat limit and the KV pool allow. When a running sequence needs a block and
none is free, the most recently arrived sequence is preempted: its blocks are freed and it
waits to be recomputed (its finished blocks stay in the prefix cache, so that is cheap).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # how many of its uncomputed tokens run this step
    draft_token_ids: list[int] = field(default_factory=list)  # drafted tokens verified after them (engine/speculative.py)

    @property
    def completes_prompt(self) -> bool:
        """After this step every token has K/V, so the next token gets sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.ensure_capacity(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        for item in scheduled:  # after every running sequence has its own token's slot
            budget = self._add_drafts(item, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        return scheduled

    def _add_drafts(self, item: ScheduledSequence, budget: int) -> int:
        """A decode's drafted tokens ride along within the token budget, in blocks that are free: a
        guess never preempts or delays a sequence's real tokens."""
        seq = item.seq
        if seq.speculation is None or not seq.speculation.draft_token_ids or not item.completes_prompt or item.num_tokens != 1:
            return budget
        drafts = seq.speculation.draft_token_ids[: min(budget, self.block_manager.room_after(seq))]
        if drafts:
            self.block_manager.ensure_capacity(seq, len(seq) + len(drafts))
            item.draft_token_ids = drafts
        return budget - len(drafts)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.register_computed_blocks(seq)
        self.block_manager.free_sequence(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def add_running(self, seq: Sequence) -> None:
        """A forked sample that already holds its blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and return its blocks to the pool."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.register_computed_blocks(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
