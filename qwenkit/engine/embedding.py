"""Text embeddings from the decoder's final hidden states (Qwen3-Embedding style).

Qwen3-Embedding takes the hidden state of each text's last token (the model attends causally,
so only the last position has seen the whole text) and L2-normalises it. Mean pooling over all
positions is the other common choice. `dimensions` truncates the vector (Matryoshka training puts
the most information in the leading coordinates) and renormalises it.

Texts run packed back to back in one forward pass (PackedSequences: each attends only within
itself), so a batch needs no padding and no KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenkit.errors import QwenkitError
from qwenkit.model.attention import NoCache, PackedSequences
from qwenkit.model.qwen import QwenForCausalLM
from qwenkit.tokenizer.tokenizer import Tokenizer

POOLINGS = ("last", "mean")
MAX_BATCH_TOKENS = 2048  # tokens per forward pass: bounds the activations of one pass


def embedding_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a text to embed: with the tokenizer's own post-processing, so a checkpoint whose
    tokenizer appends <|endoftext|> (as Qwen3-Embedding's does) pools on that token, as it was trained."""
    ids = tokenizer.backend.encode(text, add_special_tokens=True).ids
    if tokenizer.add_bos_token and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def fit_to_context(token_lists: list[list[int]], max_len: int, truncate: bool) -> list[list[int]]:
    """Check every input is non-empty and fits the context; cut the end off when `truncate`."""
    out = []
    for i, ids in enumerate(token_lists):
        if not ids:
            raise QwenkitError(f"input {i} is empty")
        if len(ids) > max_len:
            if not truncate:
                raise QwenkitError(f"input {i} has {len(ids)} tokens; the model's context holds {max_len}")
            ids = ids[:max_len]
        out.append(list(ids))
    return out


@torch.inference_mode()
def embed_token_ids(
    model: QwenForCausalLM,
    token_lists: list[list[int]],
    pooling: str = "last",
    dimensions: int | None = None,
    normalize: bool = True,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> torch.Tensor:
    """float32 embeddings [len(token_lists), dimensions or hidden_size], in input order."""
    if pooling not in POOLINGS:
        raise QwenkitError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if getattr(model, "tensor_parallel", None) is not None:  # the other processes' shards would have to run it too
        raise QwenkitError("embeddings are not computed under tensor parallelism; serve the embedding model in one process")
    hidden_size = model.config.hidden_size
    if dimensions is not None and not 1 <= dimensions <= hidden_size:
        raise QwenkitError(f"dimensions must be in [1, {hidden_size}] for this model, got {dimensions}")
    vocab = model.config.vocab_size
    for i, ids in enumerate(token_lists):
        if not ids:
            raise QwenkitError(f"input {i} is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise QwenkitError(f"input {i}: token ids must be in [0, {vocab})")
    routing = getattr(model, "lora_routing", None)
    if routing is not None:
        routing.groups = []  # embeddings come from the base model, whatever the engine's last batch used
    pooled = [torch.empty(0)] * len(token_lists)
    for batch in _batches(token_lists, max_batch_tokens):
        lengths = [len(token_lists[i]) for i in batch]
        input_ids = torch.tensor([t for i in batch for t in token_lists[i]])
        positions = torch.cat([torch.arange(n) for n in lengths])
        attention = NoCache(positions) if len(batch) == 1 else PackedSequences(lengths, positions)
        hidden = model(input_ids, positions, attention).float()
        for i, rows in zip(batch, hidden.split(lengths)):
            pooled[i] = rows[-1] if pooling == "last" else rows.mean(dim=0)
    vectors = torch.stack(pooled)
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    return F.normalize(vectors, dim=-1) if normalize else vectors


def _batches(token_lists: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices grouped into passes of at most max_tokens tokens (a longer input gets a pass of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, ids in enumerate(token_lists):
        if current and size + len(ids) > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += len(ids)
    if current:
        batches.append(current)
    return batches
