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
from qwenkit.server.errors import APIError
from qwenkit.server.protocol import ChatCompletionRequest, ChatMessage
from qwenkit.server.state import ServerState, final_output, new_id
from qwenkit.tokenizer.output_parser import TOOL_OPEN, Delta, OutputParser, ToolCall, parse_output
from qwenkit.tokenizer.reasoning import prompt_opens_thinking

JSON_OBJECT_HINT = "Respond with a single valid JSON object and nothing else."
ARGUMENT_FRAGMENT = 16  # characters of tool-call arguments per streamed delta


def template_message(m: ChatMessage) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it (text parts joined, tool arguments as objects)."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    content = m.content
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
            calls.append({"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out


def build_prompt(state: ServerState, body: ChatCompletionRequest) -> tuple[str, bool, str]:
    """(prompt text, whether to parse tool calls, text forced at the start of the reply)."""
    if len(body.messages) > state.config.max_messages:
        raise APIError(400, f"too many messages: {len(body.messages)} (limit {state.config.max_messages})", "invalid_value", "messages")
    messages = [template_message(m) for m in body.messages]
    if body.response_format is not None and body.response_format.type == "json_object":
        # Not grammar-constrained: the model is asked for JSON in the system prompt.
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{JSON_OBJECT_HINT}"
        else:
            messages.insert(0, {"role": "system", "content": JSON_OBJECT_HINT})
    choice = body.tool_choice
    tools = [t.model_dump() for t in body.tools] if body.tools and choice != "none" else None
    prefix = ""
    if tools and choice == "required":
        prefix = TOOL_OPEN + '\n{"name": "'  # the model must name one of the tools
    elif tools and choice is not None and not isinstance(choice, str):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools", "invalid_value", "tool_choice")
        prefix = TOOL_OPEN + '\n{"name": ' + json.dumps(choice.function.name) + ', "arguments": '
    prompt = state.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **(body.chat_template_kwargs or {}))
    return prompt + prefix, tools is not None, prefix


def logprobs_json(state: ServerState, entries: list[TokenLogprobs]) -> dict:
    def token(t: int) -> dict:
        text = state.tokenizer.decode([t])
        return {"token": text, "bytes": list(text.encode("utf-8"))}

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


async def chat_completions(state: ServerState, body: ChatCompletionRequest, request: Request):
    key = state.authenticate(request)
    model = state.check_model(body.model)
    prompt, parse_tools, prefix = build_prompt(state, body)
    prompt_ids = state.tokenizer.encode(prompt)
    max_tokens = state.admit(key, prompt_ids, body.max_completion_tokens or body.max_tokens)
    top = body.top_logprobs or 0
    params = state.sampling_params(body, max_tokens, logprobs=top if body.logprobs else None, thinking_budget=body.thinking_budget)
    thinking_open = prompt_opens_thinking(prompt)
    request_id = new_id("chatcmpl")
    state.engine.validate_prompt(prompt_ids, params)  # errors become a 400 before any streaming starts
    stream = state.generate(key, prompt_ids, params, request_id, model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream_chat(state, stream, request_id, model, thinking_open, parse_tools, prefix, body, include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream")
    out = await final_output(request, stream)
    return chat_completion_body(state, body, out, request_id, model, thinking_open, parse_tools, prefix)


def chat_completion_body(state, body: ChatCompletionRequest, out: RequestOutput, request_id, model, thinking_open, parse_tools, prefix) -> dict:
    """The non-streamed response to a finished request (the server's and a batch job's)."""
    choices = []
    for c in out.outputs:
        message, finish = message_for(c, parse_output(c.text, thinking_open, parse_tools, prefix), body.parallel_tool_calls)
        choices.append({"index": c.index, "message": message, "finish_reason": finish,
                        "logprobs": logprobs_json(state, c.logprobs) if body.logprobs else None})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(out)}


async def stream_chat(state, stream, request_id, model, thinking_open, parse_tools, prefix, body, include_usage) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict], **extra) -> str:
        # ASCII-escaped JSON: U+2028 and friends inside a data line would split it for clients
        # that break lines the way str.splitlines() does.
        return "data: " + json.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "choices": choices, **extra}) + "\n\n"

    parsers: dict[int, OutputParser] = {}
    tool_counts: dict[int, int] = {}
    out = None
    async for out in stream:
        for c in out.outputs:
            if c.index not in parsers:
                parsers[c.index] = OutputParser(thinking_open, parse_tools, prefix)
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
            if c.finished:
                finish = "tool_calls" if tool_counts[c.index] else c.finish_reason
                yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if out is not None and include_usage:
        yield chunk([], usage=usage(out))
    yield "data: [DONE]\n\n"


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
