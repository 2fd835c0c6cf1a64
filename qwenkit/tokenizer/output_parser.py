"""Split Qwen chat output, as it streams, into reasoning, answer text and tool calls.

Qwen writes reasoning as `<think>...</think>` (Qwen3) and tool calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5 and Qwen3). The parser takes
text in arbitrary pieces (token by token while streaming, or all at once) and gives the same
result either way: text that might be the start of a tag is held back until it is decided. A
tool call whose JSON does not parse is handed back as ordinary content, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object


@dataclass(frozen=True)
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_call: ToolCall | None = None


def _partial_tag_at_end(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_call(body: str) -> ToolCall | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit the arguments already serialised
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            return None
        return ToolCall(call["name"], arguments)
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class OutputParser:
    def __init__(self, thinking_open: bool = False, parse_tools: bool = True, prefix: str = ""):
        """`thinking_open`: the prompt already opened <think>. `prefix`: text the prompt put in the
        model's mouth (e.g. "<tool_call>\\n" to force a call), parsed as if the model wrote it."""
        self.mode = "reasoning" if thinking_open else "start"
        self.parse_tools = parse_tools
        self.buffer = ""
        self.saw_reasoning = thinking_open
        self.after_think = False  # strip the blank lines that follow </think>
        self._prefix = prefix

    def feed(self, text: str) -> list[Delta]:
        if self._prefix:
            text, self._prefix = self._prefix + text, ""
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        deltas = self.feed("")
        return deltas + self._drain(final=True)

    def _drain(self, final: bool) -> list[Delta]:
        """Emit what is decided. Each pass either returns or moves to another mode, so it ends."""
        out: list[Delta] = []
        while True:
            if self.mode == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer = stripped[len(THINK_OPEN) :].lstrip("\n")
                    self.mode, self.saw_reasoning = "reasoning", True
                elif not final and THINK_OPEN.startswith(stripped):
                    return out  # still could become <think>
                else:
                    self.mode = "content"
            elif self.mode == "reasoning":
                end = self.buffer.find(THINK_CLOSE)
                if end < 0:
                    out += self._emit("reasoning", 0 if final else _partial_tag_at_end(self.buffer, THINK_CLOSE))
                    return out
                out.append(Delta(reasoning=self.buffer[:end]))
                self.buffer = self.buffer[end + len(THINK_CLOSE) :]
                self.mode, self.after_think = "content", True
            elif self.mode == "content":
                if self.after_think:
                    self.buffer = self.buffer.lstrip("\n")
                    if not self.buffer and not final:
                        return out
                    self.after_think = False
                start = self.buffer.find(TOOL_OPEN) if self.parse_tools else -1
                if start < 0:
                    partial = self.parse_tools and not final
                    out += self._emit("content", _partial_tag_at_end(self.buffer, TOOL_OPEN) if partial else 0)
                    return out
                if start:
                    out.append(Delta(content=self.buffer[:start]))
                self.buffer = self.buffer[start + len(TOOL_OPEN) :]
                self.mode = "tool"
            else:  # inside <tool_call>
                end = self.buffer.find(TOOL_CLOSE)
                if end < 0 and not final:
                    return out
                body = self.buffer if end < 0 else self.buffer[:end]
                closed = end >= 0
                self.buffer = self.buffer[end + len(TOOL_CLOSE) :] if closed else ""
                call = parse_tool_call(body.strip())
                if call is not None:
                    out.append(Delta(tool_call=call))
                else:  # malformed: give the text back as it was written
                    out.append(Delta(content=TOOL_OPEN + body + (TOOL_CLOSE if closed else "")))
                self.mode = "content"

    def _emit(self, kind: str, keep: int) -> list[Delta]:
        """Emit the buffer but its last `keep` characters (a possible partial tag)."""
        cut = len(self.buffer) - keep
        if cut <= 0:
            return []
        text, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return [Delta(reasoning=text) if kind == "reasoning" else Delta(content=text)]


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str
    tool_calls: list[ToolCall]


def parse_output(text: str, thinking_open: bool = False, parse_tools: bool = True, prefix: str = "") -> ParsedOutput:
    parser = OutputParser(thinking_open, parse_tools, prefix)
    deltas = parser.feed(text) + parser.finish()
    reasoning = "".join(d.reasoning for d in deltas)
    return ParsedOutput(
        reasoning.strip("\n") if parser.saw_reasoning else None,
        "".join(d.content for d in deltas),
        [d.tool_call for d in deltas if d.tool_call is not None],
    )
