"""POST /v1/completions: raw text completion (no chat template)."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwenkit.engine.outputs import CompletionOutput
from qwenkit.server.chat import usage
from qwenkit.server.errors import SSE_DONE, APIError, sse_error, sse_event
from qwenkit.server.guided import with_guidance
from qwenkit.server.infill import fim_ids
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


def completion_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    """The prompt's ids. A text prompt is raw: strings like "<|im_start|>" in it ARE control tokens
    (this endpoint is for callers who write the whole prompt themselves; chat keeps them as text)."""
    if isinstance(prompt, list):
        return list(prompt)
    state.check_prompt_chars(len(prompt), "prompt")
    return state.tokenizer.encode(prompt)


MAX_PROMPTS = 256  # prompts in one request


def prompt_list(prompt) -> list[str | list[int]]:
    """OpenAI's prompt shapes: a string, strings, one token array, token arrays."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"too many prompts: {len(prompt)} (limit {MAX_PROMPTS})", "invalid_value", "prompt")
    return list(prompt)


async def prompt_ids_for(state: ServerState, body: CompletionRequest, prompt: str | list[int]) -> list[int]:
    if body.suffix is None:
        return await state.off_loop(completion_prompt, state, prompt)
    # Fill in the middle: the prompt is the code before the cursor.
    if not isinstance(prompt, str):
        raise APIError(400, "suffix needs a text prompt (the code before the cursor)", "invalid_value", "suffix")
    state.check_prompt_chars(len(prompt) + len(body.suffix), "prompt")
    return await state.off_loop(fim_ids, state, prompt, body.suffix)


async def completions(state: ServerState, body: CompletionRequest, request: Request, key: str):
    """Several prompts run as separate requests, batched by the engine; choice i * n + j is prompt i's j-th sample."""
    model = state.check_model(body.model)
    request_id = new_id("cmpl")
    streams, echoes = [], []
    try:
        for i, prompt in enumerate(prompt_list(body.prompt)):
            prompt_ids = await prompt_ids_for(state, body, prompt)
            max_tokens = state.max_tokens(key, len(prompt_ids), body.max_tokens or 16)
            params = await state.off_loop(with_guidance, state, body, state.sampling_params(body, max_tokens, logprobs=body.logprobs))
            streams.append(await state.start(key, prompt_ids, params, f"{request_id}-{i}", model))  # the engine has checked the ids
            echoes.append(await state.off_loop(state.tokenizer.decode, prompt_ids) if body.echo else "")
    except BaseException:  # a later prompt was refused: the earlier ones must not run on unseen
        for j in range(len(streams)):
            state.llm.abort(f"{request_id}-{j}")
        raise
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

    def chunk(choices: list[dict], **extra) -> str:
        return sse_event({"id": request_id, "object": "text_completion", "created": created, "model": model,
                          "choices": choices, **extra})

    started: set[int] = set()
    last = {}
    async for i, out in merged(streams):
        if out.error is not None:  # generation failed: say so, then end the stream properly
            yield sse_error(out.error)
            yield SSE_DONE
            return
        last[i] = out
        for c in out.outputs:
            index = i * body.n + c.index
            text = c.delta_text
            if index not in started:
                started.add(index)
                text = echoes[i] + text
            if text or c.finished:
                yield chunk([{"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": None}])
    if last and body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=total_usage(list(last.values())))
    yield SSE_DONE
