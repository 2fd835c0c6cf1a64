"""POST /v1/completions: raw text completion (no chat template)."""

from __future__ import annotations

import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwenkit.engine.outputs import CompletionOutput
from qwenkit.server.chat import usage
from qwenkit.server.errors import APIError
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


async def completions(state: ServerState, body: CompletionRequest, request: Request):
    key = state.authenticate(request)
    model = state.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (batched string prompts are not supported)", "invalid_value", "prompt")
        prompt = prompt[0]
    prompt_ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if body.suffix is not None:  # fill in the middle: the prompt is the code before the cursor
        if not isinstance(prompt, str):
            raise APIError(400, "suffix needs a text prompt (the code before the cursor)", "invalid_value", "suffix")
        prompt_ids = fim_ids(state, prompt, body.suffix)
    max_tokens = state.admit(key, prompt_ids, body.max_tokens or 16)
    params = with_guidance(state, body, state.sampling_params(body, max_tokens, logprobs=body.logprobs))
    request_id = new_id("cmpl")
    state.engine.validate_request(prompt_ids, params)  # errors become a 400 before any streaming starts
    stream = state.generate(key, prompt_ids, params, request_id, model)
    echo = state.tokenizer.decode(prompt_ids) if body.echo else ""
    if body.stream:
        return StreamingResponse(stream_completion(state, stream, request_id, model, body, echo), media_type="text/event-stream")
    out = await final_output(request, stream)
    choices = [{"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
                "logprobs": legacy_logprobs(state, c) if body.logprobs is not None else None} for c in out.outputs]
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(out)}


async def stream_completion(state, stream, request_id, model, body: CompletionRequest, echo: str):
    created = int(time.time())
    started: set[int] = set()
    out = None
    async for out in stream:
        for c in out.outputs:
            text = c.delta_text
            if c.index not in started:
                started.add(c.index)
                text = echo + text
            if text or c.finished:
                choice = {"index": c.index, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                yield "data: " + json.dumps({"id": request_id, "object": "text_completion", "created": created,
                                             "model": model, "choices": [choice]}) + "\n\n"
    if out is not None and body.stream_options and body.stream_options.include_usage:
        yield "data: " + json.dumps({"id": request_id, "object": "text_completion", "created": created,
                                     "model": model, "choices": [], "usage": usage(out)}) + "\n\n"
    yield "data: [DONE]\n\n"
