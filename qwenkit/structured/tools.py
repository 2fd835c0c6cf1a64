"""Grammars that make tool calls parse: built from the declared tools' JSON schemas as xgrammar
structural tags, in the JSON-in-<tool_call> form of the Qwen2.5/Qwen3 chat templates.

- `auto`: free text, but once the model starts a call (`<tool_call>`, or a bare `{"name": "` as
  small Qwen2.5 models write it) it must name a declared tool and give arguments valid against
  that tool's schema; the rest of the text stays free (a lazy grammar).
- `required` and a named function: the server already put the opening of the call in the
  model's mouth (`forced_prefix`); the grammar continues from there.
"""

from __future__ import annotations

import json
from typing import Any

from xgrammar.structural_tag import (
    ConstStringFormat, JSONSchemaFormat, OrFormat, SequenceFormat, StructuralTag, TagFormat, TriggeredTagsFormat,
)

from qwenkit.structured.spec import GuidedDecoding

TOOL_OPEN = "<tool_call>"
TAGGED_START = TOOL_OPEN + '\n{"name": "'
BARE_START = '{"name": "'
ARGUMENTS = '", "arguments": '
TAGGED_END = "}\n</tool_call>"


def _parameters(tool: dict[str, Any]) -> tuple[str, dict[str, Any] | bool]:
    function = tool.get("function", tool)
    return function["name"], function.get("parameters") or {"type": "object", "properties": {}}


def _name(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)[1:-1]  # as it appears inside the JSON string


def _arguments(parameters) -> JSONSchemaFormat:
    return JSONSchemaFormat(json_schema=parameters, max_whitespace_cnt=1)


def _tagged_tags(tools: list[dict[str, Any]]) -> list[TagFormat]:
    return [TagFormat(begin=TAGGED_START + _name(n) + ARGUMENTS, content=_arguments(p), end=TAGGED_END)
            for n, p in map(_parameters, tools)]


def tool_call_guidance(tools: list[dict[str, Any]], forced_prefix: str = "", parallel: bool = True) -> GuidedDecoding | None:
    """The grammar for a reply that may (`forced_prefix` "") or must (the prefix opened a call)
    call the tools; None when the prefix is not one this module knows how to continue."""
    if not tools:
        return None
    # The opening the server forces for a named function (its name JSON-escaped, ASCII only).
    named = {TAGGED_START + json.dumps(n)[1:-1] + ARGUMENTS: (n, p) for n, p in map(_parameters, tools)}
    more = [TriggeredTagsFormat(triggers=[TOOL_OPEN], tags=_tagged_tags(tools))] if parallel else []
    if forced_prefix == "":
        bare = [TagFormat(begin=BARE_START + _name(n) + ARGUMENTS, content=_arguments(p), end="}")
                for n, p in map(_parameters, tools)]
        fmt = TriggeredTagsFormat(triggers=[TOOL_OPEN, BARE_START], tags=_tagged_tags(tools) + bare,
                                  stop_after_first=not parallel)
    elif forced_prefix == TAGGED_START:  # tool_choice "required": any declared tool
        first = OrFormat(elements=[
            SequenceFormat(elements=[ConstStringFormat(value=_name(n) + ARGUMENTS), _arguments(p), ConstStringFormat(value=TAGGED_END)])
            for n, p in map(_parameters, tools)
        ])
        fmt = SequenceFormat(elements=[first, *more]) if more else first
    elif forced_prefix in named:  # a named function: only its arguments are left to write
        _, p = named[forced_prefix]
        call = SequenceFormat(elements=[_arguments(p), ConstStringFormat(value=TAGGED_END)])
        fmt = SequenceFormat(elements=[call, *more]) if more else call
    else:
        return None
    return GuidedDecoding(structural_tag=StructuralTag(format=fmt).model_dump_json())
