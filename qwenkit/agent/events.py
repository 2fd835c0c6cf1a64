"""What an agent run streams: text and reasoning as they are written, each tool call as the
model makes it, each tool result as it comes back, and the final answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class ToolResultEvent:
    id: str
    name: str
    content: str  # what the model reads back
    error: bool = False  # the tool failed, timed out or was called wrongly (content says how)


@dataclass(frozen=True)
class FinalAnswer:
    content: str
    turns: int
    stopped_by_turn_limit: bool = False


AgentEvent = TextDelta | ReasoningDelta | ToolCallEvent | ToolResultEvent | FinalAnswer
