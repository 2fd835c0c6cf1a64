"""POST /v1/embeddings (OpenAI), and the embedding call the Ollama routes share."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Literal

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import Field

from qwenkit.engine.embedding import embed_token_ids, embedding_token_ids, fit_to_context
from qwenkit.server.errors import APIError, documented_errors
from qwenkit.server.protocol import Model
from qwenkit.server.state import ServerState

MAX_INPUTS = 2048  # as OpenAI: inputs per request

router = APIRouter(responses=documented_errors(400, 401, 404, 413, 429))


class EmbeddingRequest(Model):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # extensions
    pooling: Literal["last", "mean"] = "last"
    normalize: bool = True
    truncate: bool = False  # cut inputs longer than the context instead of refusing them


@dataclass
class Embeddings:
    vectors: torch.Tensor  # [inputs, dimensions], float32
    num_tokens: int
    seconds: float


def authorized_key(request: Request) -> str:
    """The caller's key, counted against its rate limit; a dependency, so it runs before the body is validated."""
    return request.app.state.qwenkit.authorize(request)


def token_lists(state: ServerState, inputs) -> list[list[int]]:
    """OpenAI's input shapes: a string, strings, one token array, token arrays."""
    if isinstance(inputs, str):
        inputs = [inputs]
    elif inputs and isinstance(inputs[0], int):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input must not be empty", "invalid_value", "input")
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"too many inputs: {len(inputs)} (limit {MAX_INPUTS})", "invalid_value", "input")
    state.check_prompt_chars(sum(len(x) for x in inputs if isinstance(x, str)), "input")
    return [embedding_token_ids(state.tokenizer, x) if isinstance(x, str) else list(x) for x in inputs]


async def embed(
    state: ServerState, key: str, model: str, ids: list[list[int]], pooling: str = "last",
    dimensions: int | None = None, normalize: bool = True, truncate: bool = False,
) -> Embeddings:
    """Embed token lists with the base model, between engine steps (the engine thread owns the model)."""
    if model in state.engine.lora_adapters:
        raise APIError(400, "embeddings come from the base model; LoRA adapters are not applied", "invalid_value", "model")
    ids = fit_to_context(ids, state.max_model_len, truncate)
    num_tokens = sum(len(x) for x in ids)
    state.rate_limiter.take_tokens(key, num_tokens)
    start = time.monotonic()
    run = lambda: embed_token_ids(state.engine.loaded.model, ids, pooling, dimensions, normalize)  # noqa: E731
    vectors = await state.llm.call_in_engine_thread(run)
    return Embeddings(vectors, num_tokens, time.monotonic() - start)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, key: str = Depends(authorized_key)):
    state: ServerState = request.app.state.qwenkit
    model = state.check_model(body.model)
    out = await embed(state, key, model, await state.off_loop(token_lists, state, body.input), body.pooling, body.dimensions,
                      body.normalize, body.truncate)
    return embeddings_body(out.vectors, out.num_tokens, model, body.encoding_format)


def embeddings_body(vectors: torch.Tensor, num_tokens: int, model: str, encoding_format: str) -> dict:
    """The response (the server's and a batch job's)."""
    if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
