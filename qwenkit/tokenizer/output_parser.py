"""Split Qwen chat output, as it streams, into reasoning, answer text and tool calls.

Qwen writes reasoning as `<think>...</think>` (Qwen3) and tool calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5 and Qwen3) or, with
Qwen3-Coder's template, `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`.
Small Qwen2.5 models often drop the tags and answer a bare `{"name": ..., "arguments": ...}`: when
the request declared tools, a reply that starts with such an object naming a declared tool is a
call too, also pretty-printed in a ```json code block as they often write it (and so are further
objects after it, one per line or joined by commas, and the objects of a JSON list
`[{"name": ...}, {"name": ...}]`, their form for parallel calls). The parser takes
text in arbitrary pieces (token by token while streaming, or all at once) and gives the same
result either way: text that might be the start of a tag is held back until it is decided. A
tool call whose JSON does not parse is handed back as ordinary content, never dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
BARE_CALL_START = '{"name":"'  # with whitespace removed
FENCES, FENCE_CLOSE = ("```json\n", "```\n"), "```"  # a bare call may come in a code block
_BARE_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


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


def _xml_value(raw: str, schema: Any) -> Any:
    """A Qwen3-Coder parameter value: text for string parameters, else JSON when it parses."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    declared = schema.get("type") if isinstance(schema, dict) else None
    if declared == "string" or (isinstance(declared, list) and "string" in declared):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_xml_tool_call(body: str, tools: Mapping[str, Any] | None = None) -> ToolCall | None:
    """Qwen3-Coder's `<function=NAME><parameter=P>value</parameter></function>`."""
    match = _XML_FUNCTION.search(body)
    if match is None or body[: match.start()].strip():
        return None
    name = match.group(1).strip()
    properties = ((tools or {}).get(name) or {}).get("properties", {}) if isinstance((tools or {}).get(name), dict) else {}
    arguments = {p.group(1).strip(): _xml_value(p.group(2), properties.get(p.group(1).strip()))
                 for p in _XML_PARAMETER.finditer(match.group(2))}
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def parse_tool_call(body: str, tools: Mapping[str, Any] | None = None) -> ToolCall | None:
    if body.startswith("<function="):
        return parse_xml_tool_call(body, tools)
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


def _bare_call(buffer: str, tools: Mapping[str, Any], final: bool) -> ToolCall | tuple[ToolCall, str] | str:
    """A bare call at the start of `buffer`, possibly in a ```json code fence: (call, rest),
    "maybe" (undecided yet) or "no"."""
    fence = next((f for f in FENCES if buffer.startswith(f)), None)
    if fence is not None:
        found = _bare_object(buffer[len(fence) :], tools, final)
        if not isinstance(found, tuple):
            return found
        call, rest = found
        after = rest.lstrip()
        if after.startswith(FENCE_CLOSE):
            return call, after[len(FENCE_CLOSE) :]
        if not final and FENCE_CLOSE.startswith(after):
            return "maybe"
        return call, rest  # the fence is never closed: the call stands, what follows is text
    if not final and buffer and any(f.startswith(buffer) for f in FENCES):
        return "maybe"
    return _bare_object(buffer, tools, final)


def _bare_object(buffer: str, tools: Mapping[str, Any], final: bool) -> tuple[ToolCall, str] | str:
    match = _BARE_NAME.match(buffer)
    if match is None:
        compact = "".join(buffer.split())
        if compact.startswith(BARE_CALL_START):  # the name is still being written
            partial = compact[len(BARE_CALL_START) :]
            undecided = any(name.startswith(partial) for name in tools)
        else:
            undecided = BARE_CALL_START.startswith(compact)
        return "maybe" if undecided and not final else "no"
    try:
        name = json.loads('"' + match.group(1) + '"')
    except json.JSONDecodeError:
        return "no"
    if name not in tools:
        return "no"
    try:
        call, end = json.JSONDecoder().raw_decode(buffer)
    except json.JSONDecodeError:
        return "no" if final else "maybe"
    parsed = parse_tool_call(json.dumps(call)) if isinstance(call, dict) and set(call) <= {"name", "arguments", "parameters"} else None
    return (parsed, buffer[end:]) if parsed is not None else "no"


class OutputParser:
    def __init__(self, thinking_open: bool = False, parse_tools: bool = True, prefix: str = "",
                 tools: Mapping[str, Any] | None = None, reasoning: bool = True):
        """`thinking_open`: the prompt already opened <think>. `prefix`: text the prompt put in the
        model's mouth (e.g. "<tool_call>\\n" to force a call), parsed as if the model wrote it.
        `tools`: the declared tools (name -> parameters schema): a reply that starts with a bare
        JSON call of one of them is a call, and XML parameters are typed by the schema.
        `reasoning`: the model writes <think> blocks (its vocabulary has the token); a model that does
        not (Qwen2.5, its Coder) may still write the text "<think>", e.g. when editing code that holds
        it, and that is content."""
        self.mode = "reasoning" if thinking_open else "start"
        self.reasoning = reasoning or thinking_open
        self.parse_tools = parse_tools
        self.tools = dict(tools or {})
        self.bare = parse_tools and bool(self.tools)  # bare calls are still possible here
        self.bare_calls = 0
        self.in_list = False  # inside a JSON list of bare calls, after its first call
        self.buffer = ""
        self.saw_reasoning = thinking_open
        self.after_think = False  # strip the blank lines that follow </think>
        self.after_call = False  # and the whitespace after a tool call (between calls, or before text)
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
                if not self.reasoning:
                    self.mode = "content"
                elif stripped.startswith(THINK_OPEN):
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
                if self.after_call:
                    self.buffer = self.buffer.lstrip()
                    if not self.buffer and not final:
                        return out
                    self.after_call = False
                if self.bare:
                    # A separator or a list's bracket is consumed only with the call that follows
                    # it: text such as "[1, 2]" or ", then" stays as written.
                    text, opens_list = self.buffer.lstrip(), False
                    if self.in_list and text.startswith("]"):  # the list is closed; text may follow
                        self.buffer, self.in_list, self.bare, self.after_call = text[1:], False, False, True
                        continue
                    if not self.bare_calls and text.startswith("["):
                        text, opens_list = text[1:].lstrip(), True
                    elif self.bare_calls and text.startswith(","):
                        text = text[1:].lstrip()
                    found = _bare_call(text, self.tools, final)
                    if found == "maybe":
                        return out
                    if found == "no":
                        self.bare = False
                        if self.bare_calls:  # the text after bare calls starts on its own line
                            self.buffer = self.buffer.lstrip()
                    else:
                        self.bare_calls += 1
                        self.in_list = self.in_list or opens_list
                        call, rest = found
                        out.append(Delta(tool_call=call))
                        self.buffer = rest.lstrip()  # further bare calls may follow, one per line
                        if not self.buffer and final:
                            return out
                        continue
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
                call = parse_tool_call(body.strip(), self.tools)
                if call is not None:
                    out.append(Delta(tool_call=call))
                    self.after_call = True
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


def parse_output(text: str, thinking_open: bool = False, parse_tools: bool = True, prefix: str = "",
                 tools: Mapping[str, Any] | None = None, reasoning: bool = True) -> ParsedOutput:
    parser = OutputParser(thinking_open, parse_tools, prefix, tools, reasoning)
    deltas = parser.feed(text) + parser.finish()
    reasoning = "".join(d.reasoning for d in deltas)
    return ParsedOutput(
        reasoning.strip("\n") if parser.saw_reasoning else None,
        "".join(d.content for d in deltas),
        [d.tool_call for d in deltas if d.tool_call is not None],
    )
