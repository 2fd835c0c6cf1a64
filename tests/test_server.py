"""The OpenAI-compatible server, driven by the official `openai` client against real server processes."""

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from server_process import ServerProcess, metric
from tiny_models import QWEN3_THINKING_TEMPLATE, save_tiny, tiny_tokenizer

KEY = "sk-test-key"
REF = np.load(Path(__file__).parent / "fixtures" / "default_model_reference.npz")
HAIKU = [{"role": "user", "content": "Write a haiku about the sea"}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def save_tiny_thinking(path: Path):
    save_tiny("qwen3", path)
    tiny_tokenizer(chat_template=QWEN3_THINKING_TEMPLATE).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-thinking")
    save_tiny_thinking(path)
    return path


@pytest.fixture(scope="module")
def tiny_server(tiny_path):
    server = ServerProcess("--model", str(tiny_path), "--api-key", KEY, "--served-model-name", "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def default_server():
    server = ServerProcess("--api-key", KEY, "--served-model-name", "qwen-default")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key=KEY, max_retries=0)


# ---- the embedded default model ------------------------------------------------------------------

@pytest.mark.real_model
def test_plain_chat_matches_transformers(client):
    from transformers import AutoTokenizer

    from qwenkit.weights.default_model import ensure_assembled

    gguf = ensure_assembled()
    expected = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).decode(REF["chat0_greedy_ids"], skip_special_tokens=True)
    r = client.chat.completions.create(model="qwen-default", messages=HAIKU, temperature=0, max_tokens=32)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(REF["chat0_prompt_ids"])
    assert r.usage.completion_tokens == len(REF["chat0_greedy_ids"])
    assert [m.id for m in client.models.list().data] == ["qwen-default"]


@pytest.mark.real_model
def test_streamed_chat_equals_plain(client):
    plain = client.chat.completions.create(model="qwen-default", messages=HAIKU, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model="qwen-default", messages=HAIKU, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [plain.choices[0].finish_reason]


@pytest.mark.real_model
def test_n_seed_logprobs_and_stop(client):
    two = client.chat.completions.create(model="qwen-default", messages=HAIKU, n=2, temperature=1.0, seed=11, max_tokens=12)
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model="qwen-default", messages=HAIKU, n=2, temperature=1.0, seed=11, max_tokens=12)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]

    lp = client.chat.completions.create(model="qwen-default", messages=HAIKU, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    entries = lp.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == lp.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the most likely one
        assert e.logprob <= 0 and e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 3

    stopped = client.chat.completions.create(model="qwen-default", messages=HAIKU, temperature=0, max_tokens=16, stop=["of th"])
    assert stopped.choices[0].message.content == "Whispers " and stopped.choices[0].finish_reason == "stop"


@pytest.mark.real_model
def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    first = client.chat.completions.create(model="qwen-default", messages=messages, tools=WEATHER, tool_choice="required",
                                           temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    second = client.chat.completions.create(model="qwen-default", messages=messages, tools=WEATHER, temperature=0, max_tokens=64)
    assert "18" in second.choices[0].message.content  # the answer uses the tool's result


@pytest.mark.real_model
def test_streamed_tool_call_deltas_reassemble(client):
    stream = client.chat.completions.create(
        model="qwen-default", messages=[{"role": "user", "content": "Weather in Tokyo?"}], tools=WEATHER,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=64, stream=True)
    calls, finish, fragments = {}, None, 0
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    entry["id"], entry["name"] = tc.id, tc.function.name
                    assert entry["arguments"] == ""  # the name comes first
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
                    fragments += 1
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Tokyo"}
    assert fragments >= 2


# ---- a tiny Qwen3 with a Qwen3-style thinking template -------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_with_thinking_on_and_off(tiny_client, stream):
    def ask(**extra):
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=12, **extra)
        if not stream:
            m = tiny_client.chat.completions.create(**kwargs).choices[0].message
            return m.reasoning_content, m.content
        reasoning, content = "", ""
        for chunk in tiny_client.chat.completions.create(stream=True, **kwargs):
            d = chunk.choices[0].delta if chunk.choices else None
            reasoning += (getattr(d, "reasoning_content", None) or "") if d else ""
            content += (d.content or "") if d else ""
        return reasoning or None, content

    # On: the template opens <think>; a budget of 4 tokens makes the engine close it.
    reasoning, content = ask(extra_body={"thinking_budget": 4})
    assert reasoning and "</think>" not in reasoning and "<think>" not in (content or "")
    assert content  # the answer follows the forced </think>
    # Off: an empty think block is in the prompt; everything generated is the answer.
    off_reasoning, off_content = ask(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off_reasoning is None and off_content and "</think>" not in off_content


def test_errors_have_openai_shape_and_server_keeps_serving(tiny_server, tiny_client):
    def still_serving():
        assert tiny_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)

    bad = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "invalid_api_key"
    still_serving()

    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=b'{"messages": [', headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    still_serving()

    with pytest.raises(openai.NotFoundError) as e:
        tiny_client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "gpt-9" in e.value.body["message"]
    still_serving()

    with pytest.raises(openai.BadRequestError) as e:
        tiny_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the " * 200}])
    assert "128" in e.value.body["message"] and "prompt tokens" in e.value.body["message"]
    still_serving()

    with pytest.raises(openai.BadRequestError):
        tiny_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    still_serving()

    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=b"x" * (5 << 20), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413
    still_serving()


def test_rate_limit(tiny_path):
    """Every authenticated request counts, whatever becomes of it (an over-long prompt too), and
    /tokenize and /detokenize are limited like the generation endpoints."""
    server = ServerProcess("--model", str(tiny_path), "--api-key", KEY, "--served-model-name", "tiny", "--rate-limit-rpm", "2")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the " * 200}], max_tokens=1)
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert int(e.value.response.headers["retry-after"]) >= 1
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and "retry-after" in r.headers
        assert server.health()["status"] == "ok"
    finally:
        server.stop()


def test_completions_tokenize_detokenize(tiny_server, tiny_client, tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    r = tiny_client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0, logprobs=2)
    assert r.choices[0].finish_reason in ("length", "stop") and len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(tiny_server.url + "/tokenize", json={"prompt": "the cat sat"}, headers=h).json()
    assert t["tokens"] == tok("the cat sat")["input_ids"]
    d = httpx.post(tiny_server.url + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "the cat sat"


def test_load_then_disconnects_leave_nothing_behind(tiny_server):
    """32 streaming clients for 10 s, then 50 clients that hang up mid-stream."""
    url = tiny_server.url + "/v1/chat/completions"
    h = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(tiny_server.url + "/metrics").text
    results = {"ok": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}

    async def client_loop(deadline):
        async with httpx.AsyncClient(timeout=60) as http:
            while time.monotonic() < deadline:
                body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 8,
                        "stream": True, "stream_options": {"include_usage": True}, "temperature": 1.0}
                try:
                    async with http.stream("POST", url, json=body, headers=h) as r:
                        assert r.status_code == 200
                        usage = None
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                usage = json.loads(line[6:]).get("usage") or usage
                    results["ok"] += 1
                    results["prompt_tokens"] += usage["prompt_tokens"]
                    results["completion_tokens"] += usage["completion_tokens"]
                except Exception as exc:
                    results["failed"] += 1
                    results.setdefault("errors", []).append(repr(exc))

    async def hang_up():
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 100, "stream": True,
                    "ignore_eos": True}
            async with http.stream("POST", url, json=body, headers=h) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # disconnect after the first chunk

    async def main():
        deadline = time.monotonic() + 10
        await asyncio.gather(*(client_loop(deadline) for _ in range(32)))
        await asyncio.gather(*(hang_up() for _ in range(50)))

    asyncio.run(main())
    assert results["failed"] == 0 and results["ok"] > 32, results.get("errors")
    health = tiny_server.wait_idle()
    assert health["running"] == 0 and health["queue_depth"] == 0 and health["kv_cache_usage"] == 0
    after = httpx.get(tiny_server.url + "/metrics").text
    finished = metric(after, "qwenkit_requests_total") - metric(before, "qwenkit_requests_total")
    assert finished == results["ok"] + 50
    aborted = metric(after, 'qwenkit_requests_total{finish_reason="abort"}') - metric(before, 'qwenkit_requests_total{finish_reason="abort"}')
    assert aborted == 50
    counted_prompt = metric(after, "qwenkit_prompt_tokens_total") - metric(before, "qwenkit_prompt_tokens_total")
    assert counted_prompt >= results["prompt_tokens"]  # plus the 50 aborted requests' prompts


def test_sigterm_drains_requests_in_flight(tiny_path):
    server = ServerProcess("--model", str(tiny_path), "--served-model-name", "tiny")
    try:
        result = {}

        def long_request():
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "ignore_eos": True, "temperature": 0})
            result["response"] = r

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)
        server.terminate()
        t.join(60)
        assert result["response"].status_code == 200
        assert result["response"].json()["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the captured SIGTERM once it has drained, so the process ends by that signal.
        assert server.proc.wait(30) in (0, -15)
    finally:
        server.stop()


def test_openapi_schema_fuzzing_finds_no_server_error(tiny_server, tmp_path):
    """Property-based requests generated from the server's own OpenAPI schema: never a 5xx, and
    only the status codes the schema documents (it lists the real ones: 400, not FastAPI's 422)."""
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", tiny_server.url + "/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance", "--max-examples", "15", "--header", f"Authorization: Bearer {KEY}",
         "--exclude-path", "/metrics"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its cache directory goes there
    )
    assert result.returncode == 0, result.stdout[-3000:]


def test_chat_cli_against_server(tiny_server):
    result = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli.main", "chat", "--url", tiny_server.url, "--api-key", KEY, "-p", "hi",
         "--max-tokens", "4", "--temperature", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    direct = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    # With thinking on by default, the CLI prints only content: compare with the API's content.
    assert result.stdout == (direct.choices[0].message.content or "") + "\n"
