"""POST /v1/chat/completions: the model's chat template, reasoning, tool calls, streaming."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from qwenkit.engine.outputs import CompletionOutput, RequestOutput
from qwenkit.engine.sampler import TokenLogprobs
from qwenkit.errors import QwenkitError
from qwenkit.server.errors import SSE_DONE, APIError, sse_error, sse_event
from qwenkit.server.guided import declared_tools, with_guidance
from qwenkit.server.media import expand_prompt, load_chat_media
from qwenkit.server.protocol import ChatCompletionRequest, ChatMessage
from qwenkit.server.state import ServerState, final_output, new_id
from qwenkit.tokenizer.output_parser import TOOL_OPEN, Delta, OutputParser, ToolCall, parse_output

ARGUMENT_FRAGMENT = 16  # characters of tool-call arguments per streamed delta


def template_message(m: ChatMessage) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it (text parts joined, tool arguments as objects)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
    if isinstance(content, list) and any(p.type != "text" for p in content):
        out["content"] = [p.model_dump(exclude_none=True) for p in content]  # media: see server/media.py
    else:
        out["content"] = "".join(p.text for p in content) if isinstance(content, list) else (content or "")
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            arguments = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass  # the template renders it as given
                except RecursionError:
                    raise APIError(400, "tool call arguments nest too deeply", "invalid_value", "messages") from None
            calls.append({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def _chars(value: Any) -> int:
    """Characters of text in a JSON-like value (its strings, keys included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(k) + _chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def chat_prompt_with_media(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], bool, str, list]:
    """(prompt ids, whether to parse tool calls, text forced at the start of the reply, the
    request's media preprocessed; the ids have one placeholder per encoder output).

    CPU work: the server runs it in a worker thread (ServerState.off_loop). Tokenizer.encode_chat
    keeps every string from the request as text: only the template writes control tokens.
    """
    messages, media = load_chat_media(state, [template_message(m) for m in body.messages], body.mm_processor_kwargs)
    choice = body.tool_choice
    tools = [t.model_dump() for t in body.tools] if body.tools and choice != "none" else None
    kwargs = body.chat_template_kwargs or {}
    state.check_prompt_chars(_chars(messages) + _chars(tools) + _chars(kwargs), "messages")
    prefix = ""
    if tools and choice == "required":
        prefix = TOOL_OPEN + '\n{"name": "'  # the model must name one of the tools
    elif tools and choice is not None and not isinstance(choice, str):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools", "invalid_value", "tool_choice")
        # The name matches FUNCTION_NAME (letters, digits, _ and -): safe inside the trusted prefix.
        prefix = TOOL_OPEN + '\n{"name": ' + json.dumps(choice.function.name) + ', "arguments": '
    try:
        ids = state.tokenizer.encode_chat(messages, tools, add_generation_prompt=True, reply_prefix=prefix, template_kwargs=kwargs)
    except QwenkitError as exc:
        raise APIError(400, str(exc), "invalid_value", "chat_template_kwargs" if "template kwargs" in str(exc) else "messages") from exc
    return expand_prompt(state, ids, media), tools is not None, prefix, media


def logprobs_json(state: ServerState, entries: list[TokenLogprobs]) -> dict:
    def token(t: int) -> dict:
        return {"token": state.tokenizer.decode([t]), "bytes": list(state.tokenizer.token_bytes(t))}

    return {"content": [
        {**token(e.token_id), "logprob": e.logprob,
         "top_logprobs": [{**token(t), "logprob": lp} for t, lp in e.top]}
        for e in entries
    ]}


def message_for(completion: CompletionOutput, parsed, parallel: bool) -> tuple[dict, str]:
    calls: list[ToolCall] = parsed.tool_calls[: 1 if not parallel else None]
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning}
    finish = completion.finish_reason
    if calls:
        message["tool_calls"] = [
            {"id": new_id("call", "_"), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
        if not parsed.content.strip():
            message["content"] = None
        finish = "tool_calls"
    return message, finish


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_generated_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_generated_tokens,
            "prompt_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens}}


async def chat_completions(state: ServerState, body: ChatCompletionRequest, request: Request, key: str):
    model = state.check_model(body.model)
    if len(body.messages) > state.config.max_messages:
        raise APIError(400, f"too many messages: {len(body.messages)} (limit {state.config.max_messages})", "invalid_value", "messages")
    prompt_ids, parse_tools, prefix, media = await state.off_loop(chat_prompt_with_media, state, body)
    max_tokens = state.max_tokens(key, len(prompt_ids), body.max_completion_tokens or body.max_tokens)
    top = body.top_logprobs or 0
    params = state.sampling_params(body, max_tokens, logprobs=top if body.logprobs else None, thinking_budget=body.thinking_budget)
    params = await state.off_loop(with_guidance, state, body, params, prefix)  # compiling a grammar takes a moment
    request_id = new_id("chatcmpl")
    stream = await state.start(key, prompt_ids, params, request_id, model, media)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream_chat(state, stream, request_id, model, parse_tools, prefix, body, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    out = await final_output(request, stream)
    return chat_completion_body(state, body, out, request_id, model, parse_tools, prefix)


def chat_completion_body(state, body: ChatCompletionRequest, out: RequestOutput, request_id, model, parse_tools, prefix) -> dict:
    """The non-streamed response to a finished request (the server's and a batch job's)."""
    choices = []
    for c in out.outputs:
        parsed = parse_output(c.text, c.thinking_open, parse_tools, prefix, declared_tools(body), c.reasoning)
        message, finish = message_for(c, parsed, body.parallel_tool_calls)
        choices.append({"index": c.index, "message": message, "finish_reason": finish,
                        "logprobs": logprobs_json(state, c.logprobs) if body.logprobs else None})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(out)}


async def stream_chat(state, stream, request_id, model, parse_tools, prefix, body, include_usage) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        return sse_event({"id": request_id, "object": "chat.completion.chunk", "created": created,
                          "model": model, "choices": choices, **extra})

    parsers: dict[int, OutputParser] = {}
    tool_counts: dict[int, int] = {}
    out = None
    async for out in stream:
        if out.error is not None:  # generation failed: say so, then end the stream properly
            yield sse_error(out.error)
            yield SSE_DONE
            return
        for c in out.outputs:
            if c.index not in parsers:
                parsers[c.index] = OutputParser(c.thinking_open, parse_tools, prefix, declared_tools(body), c.reasoning)
                tool_counts[c.index] = 0
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            deltas = parsers[c.index].feed(c.delta_text)
            if c.finished:
                deltas += parsers[c.index].finish()
            lp = logprobs_json(state, c.logprobs[-len(c.delta_token_ids):]) if body.logprobs and c.delta_token_ids else None
            for delta in _openai_deltas(deltas, c.index, tool_counts, body.parallel_tool_calls):
                yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                lp = None
            if lp is not None:
                yield chunk([{"index": c.index, "delta": {}, "logprobs": lp, "finish_reason": None}])
            if c.finished:  # "abort" too, when a drain ran out of time
                finish = "tool_calls" if tool_counts[c.index] else c.finish_reason
                yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if out is not None and include_usage:
        yield chunk([], usage=usage(out))
    yield SSE_DONE


def _openai_deltas(deltas: list[Delta], index: int, tool_counts: dict[int, int], parallel: bool) -> list[dict]:
    """OpenAI stream deltas: text as is; a tool call as its name first, then its arguments in fragments."""
    out = []
    for d in deltas:
        if d.reasoning:
            out.append({"reasoning_content": d.reasoning})
        if d.content:
            out.append({"content": d.content})
        if d.tool_call is not None:
            if tool_counts[index] and not parallel:
                continue
            k = tool_counts[index]
            tool_counts[index] += 1
            out.append({"tool_calls": [{"index": k, "id": new_id("call", "_"), "type": "function",
                                        "function": {"name": d.tool_call.name, "arguments": ""}}]})
            args = d.tool_call.arguments
            for i in range(0, len(args), ARGUMENT_FRAGMENT):
                out.append({"tool_calls": [{"index": k, "function": {"arguments": args[i : i + ARGUMENT_FRAGMENT]}}]})
    return out
