"""Ollama's API, driven by the official `ollama` Python client (unchanged) against real `qwenkit serve` processes."""

import json
from pathlib import Path

import httpx
import numpy as np
import ollama
import pytest

from server_process import ServerProcess
from tiny_models import QWEN3_THINKING_TEMPLATE, save_tiny, tiny_tokenizer

KEY = "sk-ollama-test"
REF = np.load(Path(__file__).parent / "fixtures" / "default_model_reference.npz")
HAIKU = [{"role": "user", "content": "Write a haiku about the sea"}]
GREEDY_32 = {"temperature": 0, "num_predict": 32}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--api-key", KEY, "--served-model-name", "qwen-default")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def expected_haiku(client):
    """/api/generate's greedy reply, after checking its token ids (`context`) against the transformers
    reference in tests/fixtures: the same conversation as HAIKU through the chat template."""
    r = client.generate(model="qwen-default", prompt=HAIKU[0]["content"], options=GREEDY_32, stream=False)
    assert list(r.context) == [*REF["chat0_prompt_ids"], *REF["chat0_greedy_ids"]]
    check_final_stats(r)
    return r.response


def check_final_stats(r):
    assert r.done and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count == len(REF["chat0_prompt_ids"])
    assert r.eval_count == len(REF["chat0_greedy_ids"])
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0  # nanoseconds
    assert r.total_duration < 600e9


@pytest.mark.real_model
def test_chat(client, expected_haiku):
    r = client.chat(model="qwen-default", messages=HAIKU, options=GREEDY_32, stream=False)
    assert r.message.role == "assistant" and r.message.content == expected_haiku
    check_final_stats(r)


@pytest.mark.real_model
def test_chat_streaming(client, expected_haiku):
    parts = list(client.chat(model="qwen-default:latest", messages=HAIKU, options=GREEDY_32, stream=True))
    assert "".join(p.message.content for p in parts) == expected_haiku
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert len(parts) > 5  # it streamed
    check_final_stats(parts[-1])


@pytest.mark.real_model
def test_generate(client, expected_haiku):
    assert expected_haiku.strip()
    streamed = list(client.generate(model="qwen-default", prompt=HAIKU[0]["content"], options=GREEDY_32, stream=True))
    assert "".join(p.response for p in streamed) == expected_haiku and streamed[-1].done
    # Raw: no template; stop strings and num_predict apply.
    raw = client.generate(model="qwen-default", prompt="def fibonacci(n):", raw=True,
                          options={"temperature": 0, "num_predict": 24, "stop": ["\n\n"]})
    assert raw.response and "\n\n" not in raw.response and raw.context is None


@pytest.mark.real_model
@pytest.mark.parametrize("route", ["chat", "generate"])
def test_format_json_parses(client, route):
    ask = "Give the capital and the population of France as JSON with keys capital and population."
    schema = {"type": "object", "properties": {"capital": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["capital", "population"]}
    for fmt in ("json", schema):
        if route == "chat":
            text = client.chat(model="qwen-default", messages=[{"role": "user", "content": ask}], format=fmt,
                               options={"temperature": 0, "num_predict": 64}).message.content
        else:
            text = client.generate(model="qwen-default", prompt=ask, format=fmt, options={"temperature": 0, "num_predict": 64}).response
        value = json.loads(text)
        assert isinstance(value, dict) and value, text


@pytest.mark.real_model
@pytest.mark.xfail(reason="the 0.5B model's greedy reply to this tool result repeats the call as a bare "
                          '{"name": "get_weather", ...} (then echoes the result), with or without the grammar; by '
                          "issue 18's rule a reply that starts with a bare call of a declared tool is a call", strict=False)
def test_tool_result_round_trip(client):
    """History as Ollama sends it: the assistant's call with arguments as an object, the tool's answer by name."""
    messages = [
        {"role": "user", "content": "What is the weather in Paris right now?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": json.dumps({"temperature_c": 18, "sky": "sunny"}), "tool_name": "get_weather"},
    ]
    r = client.chat(model="qwen-default", messages=messages, tools=WEATHER, options={"temperature": 0, "num_predict": 64})
    assert "18" in r.message.content and not r.message.tool_calls


@pytest.mark.real_model
def test_tags_show_ps_version(client, server):
    (model,) = client.list().models
    assert model.model == "qwen-default" and model.size > 100e6 and model.digest
    assert (model.details.format, model.details.family, model.details.quantization_level) == ("gguf", "qwen2", "Q4_K_M")
    show = client.show("qwen-default")
    assert show.details.family == "qwen2" and "tools" in show.capabilities
    assert show.modelinfo["qwen2.context_length"] == 32768 and show.modelinfo["qwen2.block_count"] == 24
    assert "<|im_start|>" in show.template
    running = client.ps().models
    assert [m.model for m in running] == ["qwen-default"] and running[0].context_length == 32768
    assert httpx.get(server.url + "/api/version").json()["version"]


@pytest.mark.real_model
def test_embed(client, server):
    texts = ["The sea is calm tonight.", "def add(a, b): return a + b"]
    r = client.embed(model="qwen-default", input=texts)
    vectors = np.array(r.embeddings)
    assert vectors.shape == (2, 896)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert r.prompt_eval_count > 0
    # The same vectors through /v1/embeddings and the older /api/embeddings; `dimensions` truncates.
    body = httpx.post(server.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "qwen-default", "input": texts}, timeout=60).json()
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], vectors, atol=1e-5)
    one = client.embeddings(model="qwen-default", prompt=texts[0])
    np.testing.assert_allclose(one.embedding, vectors[0], atol=1e-5)
    short = np.array(client.embed(model="qwen-default", input=texts[0], dimensions=64).embeddings[0])
    np.testing.assert_allclose(short, vectors[0][:64] / np.linalg.norm(vectors[0][:64]), atol=1e-5)


@pytest.mark.real_model
def test_errors_have_ollama_shape(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="missing-model", messages=HAIKU)
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="qwen-default", messages=HAIKU, options={"temperature": -1})
    assert err.value.status_code == 400 and "temperature" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:  # no key
        ollama.Client(host=server.url).list()
    assert err.value.status_code == 401
    r = httpx.post(server.url + "/api/generate", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "qwen-default", "prompt": "x", "options": {"num_predict": 10**7}})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(server.url + "/api/chat", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400 and set(r.json()) == {"error"}
    # An empty prompt only "loads" the model, as in Ollama.
    assert client.generate(model="qwen-default", prompt="").done_reason == "load"
    assert server.wait_idle()["running"] == 0


# ---- thinking, on a tiny Qwen3 with a Qwen3-style template ---------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ollama-thinking")
    save_tiny("qwen3", path)
    tiny_tokenizer(chat_template=QWEN3_THINKING_TEMPLATE).save_pretrained(path)
    s = ServerProcess("--model", str(path), "--served-model-name", "tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_client(tiny_server):
    return ollama.Client(host=tiny_server.url)


@pytest.mark.parametrize("stream", [False, True])
def test_think_on_and_off(tiny_client, stream):
    def ask(think):
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], think=think,
                      options={"temperature": 0, "num_predict": 12})
        if not stream:
            m = tiny_client.chat(**kwargs).message
            return m.thinking, m.content
        parts = list(tiny_client.chat(stream=True, **kwargs))
        return "".join(p.message.thinking or "" for p in parts) or None, "".join(p.message.content for p in parts)

    thinking, _ = ask(True)  # a random model never closes <think>: all of its output is thinking
    assert thinking and "<think>" not in thinking
    thinking, content = ask(False)  # the template writes an empty think block: everything is the answer
    assert thinking is None and content


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_a_list_of_prompts(tiny_server, stream):
    """/v1/completions with several prompts (strings or token arrays): choice i * n + j is prompt i's
    sample j, each what the prompt gives alone."""
    import openai

    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0)
    prompts = ["the cat", "hello there", "a b c d"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts]
    kwargs = dict(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2)
    if not stream:
        r = client.completions.create(**kwargs)
        texts = {c.index: c.text for c in r.choices}
        assert r.usage.completion_tokens <= 6 * 6
    else:
        texts = {}
        for chunk in client.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i * 2 + j: alone[i] for i in range(3) for j in range(2)}
    ids = client.completions.create(model="tiny", prompt=[[10, 11, 12], [13, 14]], max_tokens=3, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5
