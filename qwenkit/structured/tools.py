"""Grammars that make tool calls parse: built from the declared tools' JSON schemas as xgrammar
structural tags, in the JSON-in-<tool_call> form of the Qwen2.5/Qwen3 chat templates.

- `auto`: free text, but once the model starts a call it must name a declared tool and give
  arguments valid against that tool's schema (a lazy grammar). A call starts with `<tool_call>`
  anywhere in the reply, or with a bare object opening `{"name": "<a declared tool>"` as small
  Qwen2.5 models write it (on one line, pretty-printed, or in a ```json fence), only at the start
  of the reply (after thinking and whitespace) or right after another bare call: where the output
  parser takes a bare object for a call. `{"name": "` later in the text (an example object in
  prose) stays free, and so does an object naming no declared tool.
- `required` and a named function: the server already put the opening of the call in the
  model's mouth (`forced_prefix`); the grammar continues from there.

"Only at the start" cannot be a trigger (xgrammar's triggers fire anywhere in free text), so the
start of the reply is a choice between the openings that commit to a call (a bare opening naming a
declared tool, `<tool_call>`, `<think>`) and a grammar for every text that has left all of them
behind at its first differing character; free text with `<tool_call>` triggers follows that.
"""

from __future__ import annotations

import json
from typing import Any

from xgrammar.structural_tag import (
    AnyTextFormat, ConstStringFormat, GrammarFormat, JSONSchemaFormat, OptionalFormat, OrFormat, RegexFormat,
    SequenceFormat, StarFormat, StructuralTag, TagFormat, TriggeredTagsFormat,
)

from qwenkit.structured.spec import GuidedDecoding

TOOL_OPEN = "<tool_call>"
TAGGED_START = TOOL_OPEN + '\n{"name": "'
ARGUMENTS = '", "arguments": '
TAGGED_END = "}\n</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
WHITESPACE = " \t\r\n"
FENCES = ("```json\n", "```\n")  # the output parser's too
# (opening up to the name, from the name's closing quote to the arguments, end, whitespace the
# arguments may use): the bare call on one line and pretty-printed with two-space indents, each
# also inside a code fence. The model's own styles; others (a compact `{"name":"`) are held to
# these: the character after `"name":` is forced to be the space (see `_forced`).
BARE_STYLES = [(fence + start, after, end + ("\n```" if fence else ""), spaces)
               for fence in ("", *FENCES)
               for start, after, end, spaces in (('{"name": "', ARGUMENTS, "}", 1),
                                                 ('{\n  "name": "', '",\n  "arguments": ', "\n}", 16))]


def _parameters(tool: dict[str, Any]) -> tuple[str, dict[str, Any] | bool]:
    function = tool.get("function", tool)
    return function["name"], function.get("parameters") or {"type": "object", "properties": {}}


def _name(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)[1:-1]  # as it appears inside the JSON string


def _arguments(parameters, whitespace: int = 1) -> JSONSchemaFormat:
    """At most `whitespace` characters of whitespace in a row: free whitespace lets a small model
    loop on newlines inside a valid document; pretty-printed calls need indents."""
    return JSONSchemaFormat(json_schema=parameters, max_whitespace_cnt=whitespace)


def _tagged_tags(tools: list[dict[str, Any]]) -> list[TagFormat]:
    return [TagFormat(begin=TAGGED_START + _name(n) + ARGUMENTS, content=_arguments(p), end=TAGGED_END)
            for n, p in map(_parameters, tools)]


def _bare_tags(tools: list[dict[str, Any]]) -> list[TagFormat]:
    return [TagFormat(begin=start + _name(n) + after, content=_arguments(p, spaces), end=end)
            for n, p in map(_parameters, tools) for start, after, end, spaces in BARE_STYLES]


def _bare_openings(tools: list[dict[str, Any]]) -> list[str]:
    """The texts that commit a reply to a bare call: each style's opening up to the name's closing quote."""
    return [start + _name(n) + '"' for n, _ in map(_parameters, tools) for start, _, _, _ in BARE_STYLES]


def _forced(prefix: str) -> bool:
    return prefix.endswith('"name":')


def _ebnf_char(c: str) -> str:
    return {"\n": r"\n", "\r": r"\r", "\t": r"\t"}.get(c) or ("\\" + c if c in "\\]^-[" else c)


def divergence_grammar(openings: list[str], not_first: str = WHITESPACE, forced=_forced) -> str:
    """EBNF for the shortest texts that are no prefix of any opening: some prefix of an opening
    (possibly empty), then a character that none of them continues with there. The first
    character is also none of `not_first`; after a prefix for which `forced` holds, the openings'
    next character is the only one allowed. One rule per node of the openings' trie, equal
    subtrees shared (the tool names after each style's `"name": "`): each rule position costs a
    pass over the vocabulary when the grammar is compiled."""
    rules: dict[str, str] = {}  # body -> rule name
    openings_set = set(openings)

    def node(prefix: str, extra: str = "") -> str | None:
        nexts = sorted({o[len(prefix)] for o in openings if o.startswith(prefix) and len(o) > len(prefix)})
        alternatives = [] if forced(prefix) else ["[^" + "".join(_ebnf_char(c) for c in sorted({*nexts, *extra})) + "]"]
        for c in nexts:
            if prefix + c in openings_set:
                continue  # an opening ends here: what follows is the opening's, not free text
            below = node(prefix + c)
            if below is not None:
                alternatives.append(json.dumps(c, ensure_ascii=False) + " " + below)
        if not alternatives:
            return None
        body = " | ".join(alternatives)
        if body not in rules:
            rules[body] = f"diverge{len(rules)}"
        return rules[body]

    top = node("", not_first)
    return "\n".join([f"root ::= {top}", *(f"{name} ::= {body}" for body, name in rules.items())])


def _auto(tools: list[dict[str, Any]], parallel: bool) -> Any:
    tagged, bare = _tagged_tags(tools), _bare_tags(tools)
    ws = RegexFormat(pattern="[ \\t\\r\\n]*")
    openings = [*_bare_openings(tools), TOOL_OPEN, THINK_OPEN]
    # Text that leaves the openings behind at its first character (nearly every reply) is one
    # character class followed by free text: xgrammar fills that mask from its cache (~0.1 ms).
    # Text that starts like an opening and leaves it later ("{\"a\"", "<b>", "```python") goes
    # through the trie grammar; its masks are computed token by token (tens of ms on this CPU),
    # but only until the reply has left the openings behind.
    first = RegexFormat(pattern="[^" + "".join(sorted({_ebnf_char(o[0]) for o in openings} | {_ebnf_char(c) for c in WHITESPACE})) + "]")
    later = GrammarFormat(grammar=divergence_grammar(openings, forced=lambda prefix: prefix == "" or _forced(prefix)))

    def diverged(free: TriggeredTagsFormat) -> list[SequenceFormat]:
        return [SequenceFormat(elements=[first, free]), SequenceFormat(elements=[later, free])]

    if parallel:  # bare calls, then at most: a tagged call or diverged text, then free text
        free = TriggeredTagsFormat(triggers=[TOOL_OPEN], tags=tagged)
        rest = OrFormat(elements=[*diverged(free), SequenceFormat(elements=[OrFormat(elements=tagged), free])])
        answer = SequenceFormat(elements=[StarFormat(content=SequenceFormat(elements=[ws, OrFormat(elements=bare)])),
                                          ws, OptionalFormat(content=rest)])
    else:  # one call, bare or tagged, and nothing after it; or text with at most one tagged call
        free = TriggeredTagsFormat(triggers=[TOOL_OPEN], tags=tagged, stop_after_first=True)
        answer = SequenceFormat(elements=[ws, OptionalFormat(content=OrFormat(elements=[*bare, *tagged, *diverged(free)]))])
    thinking = TagFormat(begin=THINK_OPEN, content=AnyTextFormat(), end=THINK_CLOSE)
    return SequenceFormat(elements=[OptionalFormat(content=thinking), answer])


def tool_call_guidance(tools: list[dict[str, Any]], forced_prefix: str = "", parallel: bool = True) -> GuidedDecoding | None:
    """The grammar for a reply that may (`forced_prefix` "") or must (the prefix opened a call)
    call the tools; None when the prefix is not one this module knows how to continue."""
    if not tools:
        return None
    # The opening the server forces for a named function (its name JSON-escaped, ASCII only).
    named = {TAGGED_START + json.dumps(n)[1:-1] + ARGUMENTS: (n, p) for n, p in map(_parameters, tools)}
    more = [TriggeredTagsFormat(triggers=[TOOL_OPEN], tags=_tagged_tags(tools))] if parallel else []
    if forced_prefix == "":
        fmt = _auto(tools, parallel)
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
