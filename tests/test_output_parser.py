"""Reasoning and tool-call parsing: same result whether the text arrives whole or token by token."""

import json

import pytest

from qwenkit.tokenizer.output_parser import OutputParser, ToolCall, parse_output

CASES = [
    # (text, thinking_open, reasoning, content, tool calls)
    ("<think>\nplan it\n</think>\n\nThe answer.", False, "plan it", "The answer.", []),
    ("plan\n</think>\n\nanswer", True, "plan", "answer", []),
    ("Just an answer with <b>tags</b> and < signs.", False, None, "Just an answer with <b>tags</b> and < signs.", []),
    ("<think>\nunfinished", False, "unfinished", "", []),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        False, None, "Let me check.\n", [ToolCall("get_weather", '{"city": "Paris"}')],
    ),
    (
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": [1, 2]}}\n</tool_call>',
        False, None, "", [ToolCall("a", "{}"), ToolCall("b", '{"x": [1, 2]}')],
    ),
    ('<tool_call>\n{"name": "broken", "arguments": {"city": }\n</tool_call>', False, None,
     '<tool_call>\n{"name": "broken", "arguments": {"city": }\n</tool_call>', []),
    ("<think>\nweigh options\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"日本\"}}\n</tool_call>",
     False, "weigh options", "", [ToolCall("f", '{"q": "日本"}')]),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', False, None, "", [ToolCall("f", '{"a": 1}')]),  # cut at stop
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\nDone.', False, None, "Done.", [ToolCall("f", "{}")]),
]


@pytest.mark.parametrize("text, opened, reasoning, content, calls", CASES)
def test_whole_text(text, opened, reasoning, content, calls):
    parsed = parse_output(text, opened)
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == (reasoning, content, calls)


@pytest.mark.parametrize("text, opened, reasoning, content, calls", CASES)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streamed_in_pieces(text, opened, reasoning, content, calls, piece):
    parser = OutputParser(opened)
    deltas = []
    for i in range(0, len(text), piece):
        deltas += parser.feed(text[i : i + piece])
    deltas += parser.finish()
    got_reasoning = "".join(d.reasoning for d in deltas)
    assert (got_reasoning.strip("\n") if parser.saw_reasoning else None) == reasoning
    assert "".join(d.content for d in deltas) == content
    assert [d.tool_call for d in deltas if d.tool_call] == calls
    for d in deltas:
        if d.tool_call:
            json.loads(d.tool_call.arguments)


def test_forced_tool_call_prefix():
    parsed = parse_output('{"name": "f", "arguments": {"x": 1}}\n</tool_call>', prefix="<tool_call>\n")
    assert parsed.tool_calls == [ToolCall("f", '{"x": 1}')] and parsed.content == ""


def test_tools_not_parsed_when_disabled():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert parse_output(text, parse_tools=False).content == text


WEATHER_TOOLS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}}},
                 "add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "note": {"type": "string"}}}}

TOOL_CASES = [
    # (text, content, tool calls) with the tools above declared
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [ToolCall("get_weather", '{"city": "Paris"}')]),
    ('\n{"name":"get_weather","arguments":{"city":"Paris"}}\n{"name": "add", "arguments": {"a": 1, "b": 2}}',
     "", [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("add", '{"a": 1, "b": 2}')]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}\nI will check.', "I will check.",
     [ToolCall("get_weather", '{"city": "Paris"}')]),
    # Not a declared tool, not at the start, or not a call object: plain content.
    ('{"name": "launch_rockets", "arguments": {}}', '{"name": "launch_rockets", "arguments": {}}', []),
    ('Call: {"name": "get_weather", "arguments": {"city": "Paris"}}', 'Call: {"name": "get_weather", "arguments": {"city": "Paris"}}', []),
    ('{"name": "get_weather", "city": "Paris"}', '{"name": "get_weather", "city": "Paris"}', []),
    ('{"name": "get_weather", "arguments": {"city": ', '{"name": "get_weather", "arguments": {"city": ', []),
    ('{"a": 1}', '{"a": 1}', []),
    # Pretty-printed in a code block, as the small models often write a call; fences that hold no call stay text.
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```', "",
     [ToolCall("get_weather", '{"city": "Paris"}')]),
    ('```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```\n```\n{"name": "add", "arguments": {"a": 3}}\n```\nDone.',
     "Done.", [ToolCall("add", '{"a": 1, "b": 2}'), ToolCall("add", '{"a": 3}')]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [ToolCall("get_weather", '{"city": "Paris"}')]),
    ('```python\nprint(1)\n```', '```python\nprint(1)\n```', []),
    ('```json\n{"name": "launch_rockets", "arguments": {}}\n```', '```json\n{"name": "launch_rockets", "arguments": {}}\n```', []),
    ('``', '``', []),
    # Parallel calls as a JSON list, or joined by commas; lists and commas around anything else stay text.
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]',
     "", [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("add", '{"a": 1, "b": 2}')]),
    ('[\n  {"name": "add", "arguments": {"a": 1}}\n]\nBoth done.', "Both done.", [ToolCall("add", '{"a": 1}')]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}',
     "", [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Rome"}')]),
    ('{"name": "add", "arguments": {"a": 1}}, then I add more.', ", then I add more.", [ToolCall("add", '{"a": 1}')]),
    ('[1, 2, 3]', '[1, 2, 3]', []),
    ('[{"name": "launch_rockets", "arguments": {}}]', '[{"name": "launch_rockets", "arguments": {}}]', []),
    ('[', '[', []),
    # Qwen3-Coder's XML form, parameters typed by the declared schema.
    ('<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n</parameter>\n'
     '<parameter=note>\n42\n</parameter>\n</function>\n</tool_call>',
     "", [ToolCall("add", '{"a": 1, "b": 2, "note": "42"}')]),
    ('Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n</function>\n</tool_call>',
     "Sure.\n", [ToolCall("get_weather", '{"city": "New\\nYork"}')]),
]


@pytest.mark.parametrize("text, content, calls", TOOL_CASES)
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_bare_and_xml_tool_calls(text, content, calls, piece):
    parser = OutputParser(tools=WEATHER_TOOLS)
    deltas = []
    for i in range(0, len(text), piece):
        deltas += parser.feed(text[i : i + piece])
    deltas += parser.finish()
    assert "".join(d.content for d in deltas) == content
    assert [d.tool_call for d in deltas if d.tool_call] == calls


def test_bare_call_needs_declared_tools():
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_output(text).content == text
    assert parse_output(text, tools=WEATHER_TOOLS, parse_tools=False).content == text


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_think_text_of_a_model_without_thinking_is_content(piece):
    """Qwen2.5 (no <think> token) editing code that holds the text "<think>": all of it is the answer;
    a prompt that opened <think> still makes the reply reasoning."""
    text = '<think>\nTHINK_TAGS = ("<think>", "</think>")\n</think>\nrest'
    parser = OutputParser(reasoning=False)
    deltas = [d for i in range(0, len(text), piece) for d in parser.feed(text[i : i + piece])] + parser.finish()
    assert "".join(d.content for d in deltas) == text and not any(d.reasoning for d in deltas)
    assert parse_output(text, reasoning=False).reasoning is None
    assert parse_output("plan</think>answer", thinking_open=True, reasoning=False).reasoning == "plan"
    assert parse_output(text).reasoning == 'THINK_TAGS = ("<think>", "'  # a thinking model's reading, for contrast
