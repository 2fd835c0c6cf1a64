"""Tool calls on the default model (issue 18): 20 prompts with `tool_choice: "auto"` (one tool,
several tools, two calls in one reply, questions that need no tool) through the server's chat
endpoint, driven by the official `openai` client, plain and streamed. Every call that comes back
must name a declared tool and carry arguments valid against its schema (`jsonschema`); the
prompts that need a call must come back as `tool_calls` (the expected tool, and two calls where
two are asked for), the others as content. Greedy: plain and streamed replies are compared too
(a near-tie in free text can flip when the streamed pass hits the prefix cache; --no-prefix-cache).

    python benchmarks/tool_calls.py                      # in process (FastAPI TestClient), default model
    python benchmarks/tool_calls.py --url http://127.0.0.1:8000/v1 --model NAME   # a running server
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import jsonschema
import openai


def tool(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties) if required is None else required}}}


S = {"type": "string"}
WEATHER = tool("get_weather", "Get the current weather in a city",
               {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
TIME = tool("get_time", "Get the current local time in an IANA timezone such as Europe/Paris", {"timezone": S})
CURRENCY = tool("convert_currency", "Convert an amount of money from one currency to another",
                {"amount": {"type": "number", "minimum": 0}, "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                 "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$"}})
SEARCH = tool("search_web", "Search the web and return the top results",
              {"query": S, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}, ["query"])
EMAIL = tool("send_email", "Send an email", {"to": S, "subject": S, "body": S})
ADD = tool("add", "Add two numbers", {"a": {"type": "number"}, "b": {"type": "number"}})
STOCK = tool("get_stock_price", "Get the latest price of a stock by its ticker symbol",
             {"symbol": {"type": "string", "pattern": "^[A-Z]{1,5}$"}})
EVENT = tool("create_event", "Create a calendar event",
             {"title": S, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
              "attendees": {"type": "array", "items": S, "maxItems": 10}}, ["title", "date"])


@dataclass(frozen=True)
class Case:
    prompt: str
    tools: tuple[dict, ...]
    expect: tuple[str, ...]  # the tools the reply should call, in order; () for an answer in text


CASES = [
    # One tool.
    Case("What is the weather in Paris right now? Use the tool.", (WEATHER,), ("get_weather",)),
    Case("What's the weather like in Tokyo today?", (WEATHER,), ("get_weather",)),
    Case("How warm is it in Berlin right now, in fahrenheit?", (WEATHER,), ("get_weather",)),
    Case("What is 1234 plus 5678? Use the add tool.", (ADD,), ("add",)),
    Case("Create a calendar event called Team sync on 2025-03-14 with Bob and Carol.", (EVENT,), ("create_event",)),
    # Several tools, one to pick.
    Case("What time is it in Tokyo right now?", (WEATHER, TIME), ("get_time",)),
    Case("Convert 100 US dollars to euros.", (WEATHER, CURRENCY), ("convert_currency",)),
    Case("Search the web for the latest Python release.", (WEATHER, SEARCH), ("search_web",)),
    Case("Send an email to alice@example.com telling her the meeting moved to 3pm.", (SEARCH, EMAIL), ("send_email",)),
    Case("What is the current stock price of Apple (AAPL)?", (SEARCH, STOCK), ("get_stock_price",)),
    Case("Is it raining in Seattle right now? Check with the tool.", (SEARCH, WEATHER, TIME), ("get_weather",)),
    Case("Add 2.5 and 4.25 with the tool.", (ADD, CURRENCY, WEATHER), ("add",)),
    # Two calls in one reply.
    Case("What is the weather in Paris and in London right now? Call the tool once for each city.", (WEATHER,),
         ("get_weather", "get_weather")),
    Case("Get the weather in Rome and the local time in Europe/Rome.", (WEATHER, TIME), ("get_weather", "get_time")),
    Case("Look up the stock prices of MSFT and GOOG, one call each.", (STOCK, SEARCH), ("get_stock_price", "get_stock_price")),
    # No tool needed.
    Case("What is the capital of France?", (WEATHER,), ()),
    Case("Write a haiku about the sea.", (WEATHER, TIME), ()),
    Case("Hello! Who are you?", (SEARCH,), ()),
    Case("Write a Python function that reverses a string.", (ADD,), ()),
    Case("Translate 'good morning' into Spanish.", (CURRENCY, EMAIL), ()),
]


@dataclass
class Reply:
    content: str
    calls: list[tuple[str, str]]  # (name, arguments JSON text)
    finish: str | None


def ask(client: openai.OpenAI, model: str, case: Case, stream: bool, max_tokens: int) -> Reply:
    kwargs = dict(model=model, messages=[{"role": "user", "content": case.prompt}], tools=list(case.tools),
                  tool_choice="auto", temperature=0, max_tokens=max_tokens)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return Reply(choice.message.content or "", calls, choice.finish_reason)
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                name, arguments = calls.get(tc.index, ("", ""))
                calls[tc.index] = (name + (tc.function.name or ""), arguments + (tc.function.arguments or ""))
            finish = c.finish_reason or finish
    return Reply(content, [calls[k] for k in sorted(calls)], finish)


def problems(case: Case, reply: Reply) -> list[str]:
    """What is wrong with a reply ([] when it is right): invalid calls, a call missed or unasked."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in case.tools}
    found = []
    for name, arguments in reply.calls:
        if name not in schemas:
            found.append(f"undeclared tool {name!r}")
            continue
        try:
            jsonschema.validate(json.loads(arguments), schemas[name])
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            found.append(f"{name} arguments {arguments!r}: {type(exc).__name__}")
    if case.expect:
        if not reply.calls or reply.finish != "tool_calls":
            found.append(f"no tool_calls (finish {reply.finish}, content {reply.content[:80]!r})")
        elif [n for n, _ in reply.calls] != list(case.expect):
            found.append(f"called {[n for n, _ in reply.calls]}, expected {list(case.expect)}")
    elif reply.calls or not reply.content.strip() or reply.finish != "stop":
        found.append(f"expected an answer in text, got calls {reply.calls} / finish {reply.finish}")
    return found


def run(client: openai.OpenAI, model: str, cases: list[Case], max_tokens: int, verbose: bool = True,
        clock=None) -> dict[bool, list[Reply]]:
    """`clock`: a GrammarClock (benchmarks/structured_outputs.py) when the engine runs in process."""
    replies: dict[bool, list[Reply]] = {}
    for stream in (False, True):
        t0 = time.perf_counter()
        before = clock.seconds if clock else 0.0
        replies[stream] = [ask(client, model, case, stream, max_tokens) for case in cases]
        elapsed = time.perf_counter() - t0
        grammar = f"; tool grammar mask fill + apply {(clock.seconds - before) / elapsed * 100:.1f}% of it" if clock else ""
        calls = [c for c in cases if c.expect]
        got = [r for c, r in zip(cases, replies[stream]) if c.expect and not problems(c, r)]
        valid_calls = [r for c, r in zip(cases, replies[stream]) if c.expect and r.calls and r.finish == "tool_calls"
                       and not [p for p in problems(c, r) if "arguments" in p or "undeclared" in p]]
        text = [r for c, r in zip(cases, replies[stream]) if not c.expect and not problems(c, r)]
        label = "streamed" if stream else "plain   "
        print(f"{label}: {len(valid_calls)}/{len(calls)} call prompts came back as tool_calls with schema-valid arguments "
              f"({len(got)}/{len(calls)} with exactly the expected tools); {len(text)}/{len(cases) - len(calls)} no-tool "
              f"questions answered as content; {elapsed:.0f} s{grammar}", flush=True)
        if verbose:
            for case, reply in zip(cases, replies[stream]):
                for p in problems(case, reply):
                    print(f"    {case.prompt[:60]!r}: {p}")
    same = sum(a == b for a, b in zip(replies[False], replies[True]))
    print(f"plain and streamed replies identical: {same}/{len(cases)}")
    for case, a, b in zip(cases, replies[False], replies[True]):
        if a != b and verbose:
            print(f"    {case.prompt[:60]!r}: plain {a}, streamed {b}")
    return replies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running OpenAI-compatible server (default: the default model in process)")
    parser.add_argument("--model", default="m")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="in process: every request prefills its whole prompt (the streamed pass otherwise hits the "
                             "prefix cache, whose shorter prefill can flip a greedy near-tie)")
    args = parser.parse_args()
    if args.url:
        run(openai.OpenAI(base_url=args.url, api_key=args.api_key), args.model, CASES, args.max_tokens)
        return
    from fastapi.testclient import TestClient
    from structured_outputs import GrammarClock  # this directory

    from qwenkit.engine.llm import AsyncLLM
    from qwenkit.engine.llm_engine import EngineConfig
    from qwenkit.server.app import create_app
    from qwenkit.server.state import ServerConfig
    from qwenkit.weights.loader import load_model

    config = EngineConfig(enable_prefix_caching=not args.no_prefix_cache)
    app = create_app(AsyncLLM(load_model(None), engine_config=config), ServerConfig(served_model_name=args.model))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=args.api_key, http_client=http, max_retries=0)
        run(client, args.model, CASES, args.max_tokens, clock=GrammarClock())


if __name__ == "__main__":
    main()
