"""KV-cache blocks: allocation, reference counts, and prefix caching by chained block hashes.

A full block's hash covers its tokens and, through the previous block's hash, every token
before it, so equal hashes mean equal prefixes. Freed blocks keep their hash and contents until
the pool reuses them (least recently freed first), so a later request with the same prefix
skips that computation.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from qwenkit.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and its K/V computed


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def block_hash(previous: bytes | None, tokens: list[int], media_keys: bytes = b"") -> bytes:
    h = hashlib.blake2b(previous or b"", digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    h.update(media_keys)  # the content of the images/audio whose placeholder tokens these are
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # its old contents are about to be overwritten
        block.hash = None
        block.ref_count = 1
        return block_id

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _hash_of_block(self, seq: Sequence, i: int, previous: bytes | None) -> bytes:
        """The prefix-cache hash of the sequence's block i: its tokens, the media among them, and the
        hash chain before it."""
        start, end = i * self.block_size, (i + 1) * self.block_size
        return block_hash(previous, seq.token_ids[start:end], seq.block_media_keys(start, end))

    def _release(self, block_id: int, reuse_first: bool = False) -> None:
        """One holder fewer; a block nobody holds goes back to the free list (keeping its hash, so the
        prefix cache can still find it until it is reused), at the front if it is to be reused first."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None
            if reuse_first:
                self.free.move_to_end(block_id, last=False)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of the sequence, never its last token (its logits are needed)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        previous = seq.cache_salt
        full_blocks = (len(seq) - 1) // self.block_size
        for i in range(full_blocks):
            h = self._hash_of_block(seq, i, previous)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            previous = h
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(len(seq)) - len(hits) <= self.num_free_blocks - reusable_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for the whole sequence as it stands; prefix-cached ones are shared, not recomputed."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        for block_id in hits:
            self._hold(block_id)
        seq.block_table = hits + [self._take_free_block() for _ in range(self.blocks_needed(len(seq)) - len(hits))]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.stats.queried_tokens += len(seq)
        self.stats.hit_tokens += seq.num_cached_tokens

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) * self.block_size > len(seq) or self.num_free_blocks > 0

    def ensure_capacity(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Room for the sequence's newest token (called before it is computed), or for its first
        `num_tokens` positions (drafted tokens after its own)."""
        while len(seq.block_table) * self.block_size < (len(seq) if num_tokens is None else num_tokens):
            seq.block_table.append(self._take_free_block())

    def room_after(self, seq: Sequence) -> int:
        """How many positions past its tokens the sequence could fill from its blocks and the free pool."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - len(seq)

    def release_unused(self, seq: Sequence) -> None:
        """Return the blocks past the sequence's tokens (held for drafts that were rejected). They
        hold nothing worth caching, so they go to the front of the free list, to be reused first."""
        keep = self.blocks_needed(len(seq))
        for block_id in seq.block_table[keep:]:
            self._release(block_id, reuse_first=True)
        del seq.block_table[keep:]

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Give a hash to every block that is now full and computed, so later requests can share it."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        previous = seq.cache_salt
        for i in range(full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash = self._hash_of_block(seq, i, previous)
                self.cached.setdefault(block.hash, block.block_id)
            previous = block.hash

    def fork(self, parent: Sequence, child: Sequence) -> int | None:
        """Share the parent's full blocks with the child, and give it a fresh block for a partial
        last one (the caller copies its K/V). Returns the parent's block to copy from, or None."""
        full = parent.num_computed_tokens // self.block_size
        for block_id in parent.block_table[:full]:
            self._hold(block_id)
        child.block_table = list(parent.block_table[:full])
        copy_from = None
        if len(parent.block_table) > full:
            child.block_table.append(self._take_free_block())
            copy_from = parent.block_table[full]
        child.num_computed_tokens = parent.num_computed_tokens
        return copy_from

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail goes back first: it is the least shareable
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
