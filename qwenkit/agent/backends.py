"""Where the agent's model runs: the local engine (qwenkit.engine.llm.LLM), or any
OpenAI-compatible chat server (qwenkit's own, vLLM, llama-server, OpenAI) over HTTP.

Both stream one assistant turn as events and return the turn as an OpenAI message dict
(content, tool_calls with JSON-text arguments)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import httpx

from qwenkit.agent.events import AgentEvent, ReasoningDelta, TextDelta, ToolCallEvent
from qwenkit.errors import QwenkitError


class ChatBackend(Protocol):
    def turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Iterator[AgentEvent | dict[str, Any]]:
        """Yield events while the model writes; yield the finished assistant message last."""


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them (tool-call arguments as objects)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                args = c["function"]["arguments"]
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    pass
                calls.append({**c, "function": {**c["function"], "arguments": args}})
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


class LocalBackend:
    """The in-process engine; tool calls are grammar-constrained (valid against their schemas)."""

    def __init__(self, llm, max_tokens: int = 512, temperature: float = 0.0, **sampling: Any):
        from qwenkit.engine.sampling_params import SamplingParams

        self.llm = llm
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling)

    def turn(self, messages, tools):
        from qwenkit.structured.tools import tool_call_guidance
        from qwenkit.tokenizer.output_parser import OutputParser

        # Tool results are text from outside: encode_chat keeps any control-token string in them as text.
        prompt_ids = self.llm.tokenizer.encode_chat(template_messages(messages), tools or None)
        guidance = tool_call_guidance(tools)
        params = self.params.with_changes(logits_processors=(*self.params.logits_processors, guidance)) if guidance else self.params
        declared = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
        parser = None
        content, calls = "", []
        for out in self.llm.stream(prompt_ids, params):
            c = out.outputs[0]
            if c.finish_reason == "error":
                raise QwenkitError(f"the model failed: {out.error}")
            parser = parser or OutputParser(c.thinking_open, bool(tools), tools=declared)
            deltas = parser.feed(c.delta_text) + (parser.finish() if c.finished else [])
            for d in deltas:
                if d.reasoning:
                    yield ReasoningDelta(d.reasoning)
                if d.content:
                    content += d.content
                    yield TextDelta(d.content)
                if d.tool_call is not None:
                    call = {"id": _call_id(), "type": "function", "function": {"name": d.tool_call.name, "arguments": d.tool_call.arguments}}
                    calls.append(call)
                    yield ToolCallEvent(call["id"], d.tool_call.name, d.tool_call.arguments)
        message: dict[str, Any] = {"role": "assistant", "content": content if content.strip() or not calls else None}
        if calls:
            message["tool_calls"] = calls
        yield message


class OpenAIBackend:
    """Any server speaking OpenAI's /v1/chat/completions, streamed."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 600.0,
                 http_client: httpx.Client | None = None, **body: Any):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.body = model, body
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = http_client or httpx.Client(timeout=timeout)

    def turn(self, messages, tools):
        body = {"model": self.model, "messages": messages, "stream": True, **self.body}
        if tools:
            body["tools"] = tools
        content, calls = "", {}
        with self.client.stream("POST", self.url, json=body, headers=self.headers) as response:
            if response.status_code != 200:
                raise QwenkitError(f"{self.url} answered {response.status_code}: {response.read().decode(errors='replace')[:300]}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise QwenkitError(f"{self.url}: {chunk['error'].get('message', chunk['error'])}")
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        yield ReasoningDelta(delta["reasoning_content"])
                    if delta.get("content"):
                        content += delta["content"]
                        yield TextDelta(delta["content"])
                    for tc in delta.get("tool_calls") or []:
                        entry = calls.setdefault(tc.get("index", 0), {"id": None, "name": "", "arguments": ""})
                        entry["id"] = tc.get("id") or entry["id"]
                        fn = tc.get("function") or {}
                        entry["name"] += fn.get("name") or ""
                        entry["arguments"] += fn.get("arguments") or ""
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = []
            for _, entry in sorted(calls.items()):
                call_id = entry["id"] or _call_id()
                message["tool_calls"].append({"id": call_id, "type": "function",
                                              "function": {"name": entry["name"], "arguments": entry["arguments"] or "{}"}})
                yield ToolCallEvent(call_id, entry["name"], entry["arguments"] or "{}")
        yield message
