"""Code infill: llama.cpp's POST /infill (input_prefix, input_suffix, input_extra), so editor
plugins written for llama-server work unchanged. /v1/completions' `suffix` builds the same FIM
prompt (qwenkit/tokenizer/infill.py)."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from qwenkit.errors import QwenkitError
from qwenkit.server.errors import APIError, documented_errors, sse_error, sse_event
from qwenkit.server.protocol import Model, SamplingFields
from qwenkit.server.state import ServerState, final_output, new_id
from qwenkit.tokenizer.infill import DEFAULT_FILENAME, ContextFile, fim_prompt_ids


class InfillChunk(Model):
    filename: str = "tmp"  # llama.cpp's default
    text: str = ""


class InfillRequest(SamplingFields):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = Field(default_factory=list)
    prompt: str = ""  # text already typed at the cursor
    filename: str = DEFAULT_FILENAME
    n_predict: int | None = None  # llama.cpp's name for max_tokens; -1: until the context is full
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)


def fim_ids(state: ServerState, prefix: str, suffix: str, extra=(), middle_start: str = "", filename: str = DEFAULT_FILENAME) -> list[int]:
    try:
        return fim_prompt_ids(state.tokenizer, prefix, suffix, extra, middle_start, filename=filename)
    except QwenkitError as exc:
        raise APIError(400, str(exc), "invalid_value", "suffix") from None


def add_infill_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/infill", responses=documented_errors(400, 401, 404, 413, 429, 503))
    async def _infill(body: InfillRequest, request: Request, key: str = Depends(state.authorize)):
        model = state.check_model(body.model)
        extra = [ContextFile(c.filename, c.text) for c in body.input_extra]
        state.check_prompt_chars(len(body.input_prefix) + len(body.input_suffix) + sum(len(c.text) for c in extra), "input_prefix")
        prompt_ids = await state.off_loop(fim_ids, state, body.input_prefix, body.input_suffix, extra, body.prompt, body.filename)
        requested = body.n_predict if body.n_predict is not None and body.n_predict > 0 else body.max_tokens
        max_tokens = state.max_tokens(key, len(prompt_ids), requested)
        if body.repeat_penalty is not None and body.repetition_penalty is None:
            body.repetition_penalty = body.repeat_penalty
        params = state.sampling_params(body, max_tokens)
        stream = await state.start(key, prompt_ids, params, new_id("infill"), model)

        def result(text: str, finished: bool, out) -> dict:
            c = out.outputs[0]
            stop_type = {"stop": "eos" if c.stop_reason is None else "word", "length": "limit"}.get(c.finish_reason, "none")
            return {"content": text, "stop": finished, "model": model, "tokens_predicted": out.num_generated_tokens,
                    "tokens_evaluated": out.num_prompt_tokens, "stop_type": stop_type if finished else "none"}

        if body.stream:
            async def events():
                async for out in stream:
                    if out.error is not None:  # generation failed: say so, then end the stream properly
                        yield sse_error(out.error)
                        return
                    c = out.outputs[0]
                    if c.delta_text or c.finished:
                        yield sse_event(result(c.delta_text, c.finished, out))
            return StreamingResponse(events(), media_type="text/event-stream")
        out = await final_output(request, stream)
        return result(out.outputs[0].text, True, out)
