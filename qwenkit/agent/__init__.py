"""An agent loop over the local engine or any OpenAI-compatible server, with plain Python
functions (and MCP servers' tools) as its tools."""

from qwenkit.agent.backends import LocalBackend, OpenAIBackend
from qwenkit.agent.events import FinalAnswer, ReasoningDelta, TextDelta, ToolCallEvent, ToolResultEvent
from qwenkit.agent.loop import Agent, AgentResult
from qwenkit.agent.tools import Tool, tool

__all__ = ["Agent", "AgentResult", "FinalAnswer", "LocalBackend", "OpenAIBackend", "ReasoningDelta", "TextDelta",
           "Tool", "ToolCallEvent", "ToolResultEvent", "tool"]
