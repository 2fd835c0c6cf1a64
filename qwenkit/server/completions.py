"""POST /v1/completions: raw text completion (no chat template)."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwenkit.engine.outputs import CompletionOutput
from qwenkit.server.chat import usage
from qwenkit.server.errors import SSE_DONE, APIError, sse_error, sse_event
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


async def completions(state: ServerState, body: CompletionRequest, request: Request, key: str):
    model = state.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (batched string prompts are not supported)", "invalid_value", "prompt")
        prompt = prompt[0]
    prompt_ids = await state.off_loop(completion_prompt, state, prompt)
    max_tokens = state.max_tokens(key, len(prompt_ids), body.max_tokens or 16)
    params = state.sampling_params(body, max_tokens, logprobs=body.logprobs)
    request_id = new_id("cmpl")
    stream = await state.start(key, prompt_ids, params, request_id, model)  # the engine has checked the ids
    echo = await state.off_loop(state.tokenizer.decode, prompt_ids) if body.echo else ""
    if body.stream:
        return StreamingResponse(stream_completion(state, stream, request_id, model, body, echo), media_type="text/event-stream")
    out = await final_output(request, stream)
    choices = [{"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
                "logprobs": legacy_logprobs(state, c) if body.logprobs is not None else None} for c in out.outputs]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(out)}


async def stream_completion(state, stream, request_id, model, body: CompletionRequest, echo: str):
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        return sse_event({"id": request_id, "object": "text_completion", "created": created, "model": model,
                          "choices": choices, **extra})

    started: set[int] = set()
    out = None
    async for out in stream:
        if out.error is not None:  # generation failed: say so, then end the stream properly
            yield sse_error(out.error)
            yield SSE_DONE
            return
        for c in out.outputs:
            text = c.delta_text
            if c.index not in started:
                started.add(c.index)
                text = echo + text
            if text or c.finished:
                yield chunk([{"index": c.index, "text": text, "finish_reason": c.finish_reason, "logprobs": None}])
    if out is not None and body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(out))
    yield SSE_DONE
