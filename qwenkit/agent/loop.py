"""The agent loop: ask the model, run the tools it calls (a turn's calls concurrently, each with
a timeout), feed the results back, until it answers without calling a tool or the turn limit.

There is deliberately no built-in tool that runs shell commands or code: an agent can only do
what the functions it was given do."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pydantic

from qwenkit.agent.backends import ChatBackend
from qwenkit.agent.events import AgentEvent, FinalAnswer, ToolCallEvent, ToolResultEvent
from qwenkit.agent.tools import Tool, as_tool, result_text
from qwenkit.errors import QwenkitError


@dataclass
class AgentResult:
    answer: str
    messages: list[dict[str, Any]]
    events: list[AgentEvent] = field(default_factory=list)
    turns: int = 0
    stopped_by_turn_limit: bool = False


class Agent:
    def __init__(self, backend: ChatBackend, tools: list[Tool | Callable[..., Any]] = (), system: str | None = None,
                 max_turns: int = 8, tool_timeout: float = 30.0, max_parallel: int = 8):
        self.backend = backend
        self.tools = {t.name: t for t in map(as_tool, tools)}
        if len(self.tools) != len(tools):
            raise QwenkitError("two tools have the same name")
        self.system, self.max_turns, self.tool_timeout = system, max_turns, tool_timeout
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="qwenkit-tool")

    def add_tools(self, tools: list[Tool | Callable[..., Any]]) -> None:
        for t in map(as_tool, tools):
            if t.name in self.tools:
                raise QwenkitError(f"a tool named {t.name!r} is already there")
            self.tools[t.name] = t

    def events(self, prompt: str | list[dict[str, Any]]) -> Iterator[AgentEvent]:
        """Run to an answer, streaming events; the last one is a FinalAnswer."""
        messages = self._start(prompt)
        yield from self._run(messages)

    def run(self, prompt: str | list[dict[str, Any]]) -> AgentResult:
        messages = self._start(prompt)
        events = list(self._run(messages))
        final = events[-1]
        return AgentResult(final.content, messages, events, final.turns, final.stopped_by_turn_limit)

    def _start(self, prompt) -> list[dict[str, Any]]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def _run(self, messages: list[dict[str, Any]]) -> Iterator[AgentEvent]:
        schemas = [t.openai_schema() for t in self.tools.values()]
        for turn in range(1, self.max_turns + 1):
            message = None
            for item in self.backend.turn(messages, schemas):
                if isinstance(item, dict):
                    message = item
                else:
                    yield item
            messages.append(message)
            calls = message.get("tool_calls") or []
            if not calls:
                yield FinalAnswer(message.get("content") or "", turn)
                return
            for result in self._run_calls(calls):
                messages.append({"role": "tool", "tool_call_id": result.id, "name": result.name, "content": result.content})
                yield result
        yield FinalAnswer(next((m.get("content") or "" for m in reversed(messages) if m["role"] == "assistant"), ""),
                          self.max_turns, stopped_by_turn_limit=True)

    def _run_calls(self, calls: list[dict[str, Any]]) -> list[ToolResultEvent]:
        """All of a turn's calls at once; results in the order the model made the calls."""
        futures = []
        for call in calls:
            name, raw = call["function"]["name"], call["function"]["arguments"]
            tool = self.tools.get(name)
            if tool is None:
                futures.append((call, None, f"there is no tool named {name!r}"))
                continue
            try:
                arguments = json.loads(raw) if isinstance(raw, str) else raw
                if not isinstance(arguments, dict):
                    raise ValueError("the arguments must be a JSON object")
                kwargs = tool.check_arguments(arguments)
            except (ValueError, pydantic.ValidationError) as exc:
                futures.append((call, None, f"invalid arguments for {name}: {' '.join(str(exc).split())}"))
                continue
            futures.append((call, self._pool.submit(_call, tool.fn, kwargs), None))
        results = []
        for call, future, error in futures:
            name = call["function"]["name"]
            tool = self.tools.get(name)
            if future is not None:
                timeout = tool.timeout if tool.timeout is not None else self.tool_timeout
                try:
                    content = result_text(future.result(timeout=timeout))
                except FutureTimeout:
                    future.cancel()  # a thread cannot be stopped: a started call runs on, its result dropped
                    error = f"{name} timed out after {timeout:g} s"
                except Exception as exc:  # the tool's own failure is the model's to read, not the loop's
                    error = f"{name} failed: {type(exc).__name__}: {exc}"
            results.append(ToolResultEvent(call["id"], name, error if error else content, error=bool(error)))
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _call(fn, kwargs):
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        return asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable):
    return await awaitable
