"""`qwenkit batch`: OpenAI Batch files through the engine's continuous batching.

On the default model, a 64-line job run 16 sequences at a time (the rest wait their turn) gives what the same requests give one by one. That run uses
the exact float32 model: with GGUF blocks in place, a prompt prefilled among many others takes the
dense bfloat16 path and one alone the int8 dot products, so greedy replies can legitimately part
at a near tie; float32 is the same arithmetic either way. The command itself (a real kill -9,
resuming, bad lines) runs on a tiny model, where a job takes seconds.
"""

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from tiny_models import save_tiny

N = 200  # lines of the tiny model's job
N_REAL = 64  # lines of the default model's
SUBJECTS = ["the sea", "a cat", "Python", "rain", "the moon", "coffee", "a bicycle", "winter", "chess", "a library"]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Fact {i} about {SUBJECTS[i % len(SUBJECTS)]}, in a few words."}]


def batch_line(i: int, max_tokens: int = 8) -> str:
    body = {"model": "qwen-default", "messages": messages(i), "max_tokens": max_tokens, "temperature": 0}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def read_output(path) -> dict:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    assert len(by_id) == len(lines), "a custom_id was answered twice"
    return by_id


@pytest.mark.real_model
def test_batch_equals_one_by_one(default_model, tmp_path):
    from qwenkit.cli.batch import run_batch
    from qwenkit.engine.llm import LLM
    from qwenkit.engine.llm_engine import EngineConfig
    from qwenkit.engine.sampling_params import SamplingParams

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(batch_line(i) for i in range(N_REAL)) + "\n")
    engine_config = EngineConfig(kv_cache_memory=256 << 20, max_num_seqs=16)  # lines wait to be admitted
    summary = run_batch(LLM(default_model, engine_config=engine_config), inp, out, "qwen-default")
    assert (summary.done, summary.failed, summary.skipped) == (N_REAL, 0, 0)
    results = read_output(out)
    assert set(results) == {f"req-{i}" for i in range(N_REAL)}

    alone = LLM(default_model, engine_config=EngineConfig(kv_cache_memory=64 << 20, enable_prefix_caching=False))
    greedy = SamplingParams(max_tokens=8, temperature=0)
    for i in random.Random(0).sample(range(N_REAL), 10):
        reference = alone.chat(messages(i), greedy)[0].outputs[0]  # nothing else in the engine
        body = results[f"req-{i}"]["response"]["body"]
        assert results[f"req-{i}"]["response"]["status_code"] == 200
        assert body["choices"][0]["message"]["content"] == reference.text, i
        assert body["choices"][0]["finish_reason"] == reference.finish_reason
        assert body["usage"]["completion_tokens"] == len(reference.token_ids)


def test_killed_batch_resumes_and_bad_lines_get_error_lines(tmp_path):
    model = tmp_path / "tiny"
    save_tiny("qwen2", model)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = ['{"custom_id": "broken", "method": "POST", "url": ', "[1, 2]",
           json.dumps({"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {"max_tokens": 4}}),
           json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/files", "body": {}}),
           json.dumps({"custom_id": "req-3", "method": "POST", "url": "/v1/chat/completions", "body": {}}),  # a duplicate id
           json.dumps({"custom_id": "embed-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": ["hi", "sea"], "dimensions": 8}})]
    inp.write_text("\n".join([batch_line(i, 16) for i in range(N // 2)] + bad + [batch_line(i, 16) for i in range(N // 2, N)]) + "\n")
    command = [sys.executable, "-m", "qwenkit.cli.main", "batch", str(inp), str(out), "--model", str(model),
               "--served-model-name", "tiny", "--max-num-seqs", "16", "--window", "32"]

    # Killed (SIGKILL: no cleanup) once some lines are written; the last one may be half-written.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 30:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = out.read_text()
    complete = first[: first.rfind("\n") + 1]
    done_first = len(complete.splitlines())
    assert 30 <= done_first < N, "the job was not stopped part-way"
    with out.open("a") as f:
        f.write('{"id": "batch_req_x", "custom_id": "req-1')  # as if killed in the middle of a write

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_first} requests already in" in rerun.stderr
    assert f"{N + len(bad) - done_first} requests done" in rerun.stderr
    assert out.read_text().startswith(complete)  # what was done stays, nothing is redone
    results = read_output(out)
    assert set(results) == {f"req-{i}" for i in range(N)} | {"line-101", "line-102", "no-messages", "wrong-url", "line-105", "embed-1"}
    for i in range(N):
        r = results[f"req-{i}"]
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert r["response"]["body"]["object"] == "chat.completion" and r["response"]["body"]["model"] == "tiny"

    assert results["line-101"]["response"] is None and "not valid JSON" in results["line-101"]["error"]["message"]
    assert results["line-102"]["error"]["code"] == "invalid_request"
    assert "url must be" in results["wrong-url"]["error"]["message"]
    assert "used by an earlier line" in results["line-105"]["error"]["message"]
    assert results["no-messages"]["response"]["status_code"] == 400
    assert "messages" in results["no-messages"]["response"]["body"]["error"]["message"]
    assert [len(d["embedding"]) for d in results["embed-1"]["response"]["body"]["data"]] == [8, 8]

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # all done: nothing runs
    assert again.returncode == 0 and "0 requests done" in again.stderr
