"""The agent loop: tool schemas from plain functions, concurrent calls with timeouts, a local
MCP server process, and the default model calling two tools in sequence."""

import json
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import pytest

from qwenkit.agent import Agent, FinalAnswer, LocalBackend, Tool, ToolCallEvent, ToolResultEvent
from qwenkit.agent.mcp import MCPTools
from qwenkit.errors import QwenkitError


def get_weather(city: str, unit: Literal["C", "F"] = "C", days: int | None = None) -> str:
    """Get the current weather in a city.

    Longer explanation that the model does not need.

    Args:
        city: The city name,
            for example Paris.
        unit: Temperature unit.
    """
    return f"sunny in {city}"


def test_schema_from_type_hints_and_docstring():
    tool = Tool.from_function(get_weather)
    assert tool.name == "get_weather" and tool.description == "Get the current weather in a city."
    assert tool.parameters == {  # written out by hand from the signature
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city name, for example Paris."},
            "unit": {"type": "string", "enum": ["C", "F"], "default": "C", "description": "Temperature unit."},
            "days": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        },
        "required": ["city"],
    }
    assert tool.check_arguments({"city": "Oslo", "days": "3"}) == {"city": "Oslo", "unit": "C", "days": 3}
    with pytest.raises(QwenkitError, match="kwargs"):
        Tool.from_function(lambda **kw: None)


class ScriptedModel:
    """A model that answers from a script (the tool-running part of the loop is under test)."""

    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def turn(self, messages, tools):
        self.seen.append([dict(m) for m in messages])
        yield self.replies.pop(0)


def call(name, arguments, i):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def test_parallel_calls_run_concurrently_each_with_a_timeout():
    started = threading.Barrier(2, timeout=5)  # both calls must be running at once to pass it

    def slow_add(a: int, b: int) -> int:
        started.wait()
        return a + b

    def hang() -> str:
        time.sleep(3)
        return "too late"

    async def async_echo(text: str) -> dict:
        return {"echo": text}

    model = ScriptedModel([
        {"role": "assistant", "content": None, "tool_calls": [
            call("slow_add", {"a": 1, "b": 2}, 1), call("slow_add", {"a": 3, "b": 4}, 2),
            call("hang", {}, 3), call("async_echo", {"text": "hi"}, 4), call("nope", {}, 5),
            call("slow_add", {"a": "x"}, 6)]},
        {"role": "assistant", "content": "done"},
    ])
    agent = Agent(model, [slow_add, Tool.from_function(hang, timeout=0.5), async_echo])
    t0 = time.perf_counter()
    events = list(agent.events("go"))
    assert time.perf_counter() - t0 < 2.5  # the hanging call was given up after its timeout
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert [(r.content, r.error) for r in results[:4]] == [("3", False), ("7", False), ("hang timed out after 0.5 s", True),
                                                           ('{"echo": "hi"}', False)]
    assert results[4].error and "no tool named 'nope'" in results[4].content
    assert results[5].error and "invalid arguments for slow_add" in results[5].content
    assert events[-1] == FinalAnswer("done", 2)
    fed_back = [m for m in model.seen[1] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in fed_back] == [f"call_{i}" for i in range(1, 7)]


def test_turn_limit():
    loop_forever = [{"role": "assistant", "content": "again", "tool_calls": [call("get_weather", {"city": "Oslo"}, i)]}
                    for i in range(3)]
    result = Agent(ScriptedModel(loop_forever), [get_weather], max_turns=3).run("go")
    assert result.stopped_by_turn_limit and result.turns == 3 and result.answer == "again"


def test_mcp_tool_from_a_local_server_process():
    with MCPTools(command=[sys.executable, str(Path(__file__).parent / "mcp_echo_server.py")]) as mcp:
        (multiply,) = mcp.tools
        assert multiply.name == "multiply" and multiply.parameters["properties"]["a"]["type"] == "integer"
        model = ScriptedModel([{"role": "assistant", "content": None, "tool_calls": [call("multiply", {"a": 6, "b": 7}, 1)]},
                               {"role": "assistant", "content": "42"}])
        result = Agent(model, mcp.tools).run("6 times 7?")
    assert [e.content for e in result.events if isinstance(e, ToolResultEvent)] == ["42"]


@pytest.mark.real_model
def test_default_model_calls_two_tools_in_sequence(gguf_model):
    from qwenkit.engine.llm import LLM

    calls = []

    def get_user_city(user: str) -> str:
        """Find the city a user lives in.

        Args:
            user: The user's name.
        """
        calls.append(("get_user_city", user))
        return "Lyon"

    def get_weather(city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: The city name.
        """
        calls.append(("get_weather", city))
        return {"city": city, "sky": "sunny", "temperature_c": 23}

    agent = Agent(LocalBackend(LLM(gguf_model), max_tokens=40), [get_user_city, get_weather], max_turns=3)
    events = list(agent.events("Which city does Alice live in, and what is the weather there right now? Use the tools."))
    assert calls[0] == ("get_user_city", "Alice")
    assert ("get_weather", "Lyon") in calls[1:]  # a later call used the first one's result
    assert any(isinstance(e, ToolCallEvent) for e in events) and isinstance(events[-1], FinalAnswer)
