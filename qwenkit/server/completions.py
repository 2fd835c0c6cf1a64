"""POST /v1/completions: raw text completion (no chat template)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwenkit.engine.outputs import CompletionOutput
from qwenkit.server.chat import usage
from qwenkit.server.errors import APIError
from qwenkit.server.protocol import CompletionRequest
from qwenkit.server.state import ServerState, final_output, new_id


def legacy_logprobs(state: ServerState, c: CompletionOutput) -> dict:
    tokens = [state.tokenizer.decode([e.token_id]) for e in c.logprobs]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in c.logprobs],
        "top_logprobs": [{state.tokenizer.decode([t]): lp for t, lp in e.top} for e in c.logprobs],
        "text_offset": offsets,
    }


MAX_PROMPTS = 256  # prompts in one request


def prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's prompt shapes: a string, strings, one token array, token arrays."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"too many prompts: {len(prompt)} (limit {MAX_PROMPTS})", "invalid_value", "prompt")
    return list(prompt)


async def completions(state: ServerState, body: CompletionRequest, request: Request):
    """Several prompts run as separate requests, batched by the engine; choice i * n + j is prompt i's j-th sample."""
    key = state.authenticate(request)
    model = state.check_model(body.model)
    request_id = new_id("cmpl")
    streams, echoes = [], []
    for i, prompt in enumerate(prompt_list(body.prompt)):
        prompt_ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = state.admit(key, prompt_ids, body.max_tokens or 16)
        params = state.sampling_params(body, max_tokens, logprobs=body.logprobs)
        state.engine.validate_prompt(prompt_ids, params)  # errors become a 400 before any streaming starts
        echoes.append(state.tokenizer.decode(prompt_ids) if body.echo else "")
        streams.append((prompt_ids, params))
    streams = [state.generate(key, ids, params, f"{request_id}-{i}", model) for i, (ids, params) in enumerate(streams)]
    if body.stream:
        return StreamingResponse(stream_completion(state, streams, request_id, model, body, echoes), media_type="text/event-stream")
    outs = await asyncio.gather(*(final_output(request, s) for s in streams))
    choices = [{"index": i * body.n + c.index, "text": echoes[i] + c.text, "finish_reason": c.finish_reason,
                "logprobs": legacy_logprobs(state, c) if body.logprobs is not None else None}
               for i, out in enumerate(outs) for c in out.outputs]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": total_usage(outs)}


def total_usage(outs) -> dict:
    parts = [usage(out) for out in outs]
    total = {k: sum(p[k] for p in parts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    total["prompt_tokens_details"] = {"cached_tokens": sum(p["prompt_tokens_details"]["cached_tokens"] for p in parts)}
    return total


async def merged(streams):
    """(stream index, item) from several async iterators, as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:  # handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:  # the client went away: cancelling a pump closes its stream, which aborts the request
            task.cancel()


async def stream_completion(state, streams, request_id, model, body: CompletionRequest, echoes: list[str]):
    created = int(time.time())
    started: set[int] = set()
    last = {}
    async for i, out in merged(streams):
        last[i] = out
        for c in out.outputs:
            index = i * body.n + c.index
            text = c.delta_text
            if index not in started:
                started.add(index)
                text = echoes[i] + text
            if text or c.finished:
                choice = {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                yield "data: " + json.dumps({"id": request_id, "object": "text_completion", "created": created,
                                             "model": model, "choices": [choice]}) + "\n\n"
    if last and body.stream_options and body.stream_options.include_usage:
        yield "data: " + json.dumps({"id": request_id, "object": "text_completion", "created": created,
                                     "model": model, "choices": [], "usage": total_usage(list(last.values()))}) + "\n\n"
    yield "data: [DONE]\n\n"
