"""`qwenkit batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch file through the engine's continuous batching.

Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/embeddings",
"body": {...}}; each output line is {"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}, with the body the server would have answered. Chat requests run together (up to
a window of them queued in the engine at once, so a large file does not sit in memory); each output
line is written and flushed as its request finishes, in finishing order. A rerun skips the
custom_ids already in OUTPUT, so a killed job resumes where it stopped. A line that cannot be
run gets an output line saying why; the others go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from qwenkit.cli.common import add_engine_flags, add_model_flags, load_llm
from qwenkit.errors import QwenkitError

URLS = ("/v1/chat/completions", "/v1/embeddings")
BATCH_KEY = "batch"  # the rate limiter's key (the limiter is off in a batch)


def register(subparsers) -> None:
    p = subparsers.add_parser("batch", help="run an OpenAI Batch file of chat and embedding requests (resumable)")
    p.add_argument("input", type=Path, help="JSONL: one request per line, OpenAI Batch format")
    p.add_argument("output", type=Path, help="JSONL results, appended; a rerun skips custom_ids already there")
    add_model_flags(p)
    add_engine_flags(p)
    p.add_argument("--served-model-name", default=None, help="the model name in the responses (default: from the checkpoint)")
    p.add_argument("--window", type=int, default=None,
                   help="requests queued in the engine at once (default: 4 x --max-num-seqs)")
    p.set_defaults(func=run)


@dataclass
class Line:
    """One input line, parsed as far as the batch envelope; `error` says why it cannot run."""
    number: int
    custom_id: str
    url: str | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


def parse_line(number: int, text: str) -> Line:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Line(number, f"line-{number}", error=f"line {number} is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return Line(number, f"line-{number}", error=f"line {number} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        # Named after its line, so a rerun finds it done like any other.
        return Line(number, f"line-{number}", error=f"line {number} has no custom_id (a non-empty string)")
    if obj.get("method", "POST") != "POST":
        return Line(number, custom_id, error=f"method must be POST, not {obj.get('method')!r}")
    if obj.get("url") not in URLS:
        return Line(number, custom_id, error=f"url must be one of {', '.join(URLS)}, not {obj.get('url')!r}")
    if not isinstance(obj.get("body"), dict):
        return Line(number, custom_id, error="body must be a JSON object")
    return Line(number, custom_id, obj["url"], obj["body"])


def finished_ids(path: Path) -> set[str]:
    """custom_ids already answered in OUTPUT. A last line cut short (the job was killed while
    writing it) is removed, so its request runs again."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with path.open("r+b") as f:
            f.truncate(complete)
    done = set()
    for number, raw in enumerate(data[:complete].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            done.add(json.loads(raw)["custom_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QwenkitError(f"{path} line {number} is not a batch output line; give a new OUTPUT file") from None
    return done


@dataclass
class ChatJob:
    custom_id: str
    body: Any  # ChatCompletionRequest
    parse_tools: bool
    prefix: str


class BatchRunner:
    """Turns lines into engine requests (or embedding passes) and finished requests into output lines."""

    def __init__(self, llm, model_name: str, out: IO[str]):
        from qwenkit.server.state import ServerConfig, ServerState

        self.llm, self.engine, self.out = llm, llm.engine, out
        self.state = ServerState(llm, ServerConfig(served_model_name=model_name))
        self.model_name = model_name
        self.jobs: dict[str, ChatJob] = {}
        self.written = self.errors = 0

    def submit(self, line: Line) -> None:
        from qwenkit.server.errors import APIError, error_body

        if line.error is not None:
            return self._write(line.custom_id, None, {"code": "invalid_request", "message": line.error})
        try:
            if line.url == "/v1/embeddings":
                self._embed(line)
            else:
                self._add_chat(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            self._respond(line.custom_id, 400, error_body(400, f"{first['msg']} ({where})", "invalid_request", where or None))
        except APIError as exc:
            self._respond(line.custom_id, exc.status, error_body(exc.status, exc.message, exc.code, exc.param))
        except QwenkitError as exc:
            self._respond(line.custom_id, 400, error_body(400, str(exc), "invalid_request"))

    def _add_chat(self, line: Line) -> None:
        from qwenkit.server.chat import chat_prompt_with_media
        from qwenkit.server.errors import APIError
        from qwenkit.server.guided import with_guidance
        from qwenkit.server.protocol import ChatCompletionRequest

        body = ChatCompletionRequest.model_validate(line.body)
        if body.stream:
            raise APIError(400, "stream is not available in a batch", "invalid_value", "stream")
        prompt_ids, parse_tools, prefix, media = chat_prompt_with_media(self.state, body)  # images as data: URLs
        max_tokens = self.state.max_tokens(BATCH_KEY, len(prompt_ids), body.max_completion_tokens or body.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.state.sampling_params(body, max_tokens, logprobs=logprobs, thinking_budget=body.thinking_budget)
        params = with_guidance(self.state, body, params, prefix)
        request_id = f"batch_req_{uuid.uuid4().hex[:24]}"
        self.engine.add_request(prompt_ids, params, request_id, media=media)
        self.jobs[request_id] = ChatJob(line.custom_id, body, parse_tools, prefix)

    def _embed(self, line: Line) -> None:
        from qwenkit.engine.embedding import embed_token_ids, fit_to_context
        from qwenkit.server.embeddings import EmbeddingRequest, embeddings_body, token_lists

        body = EmbeddingRequest.model_validate(line.body)
        ids = fit_to_context(token_lists(self.state, body.input), self.engine.max_model_len, body.truncate)
        vectors = embed_token_ids(self.engine.loaded.model, ids, body.pooling, body.dimensions, body.normalize)
        n = sum(len(x) for x in ids)
        self._respond(line.custom_id, 200, embeddings_body(vectors, n, self.model_name, body.encoding_format))

    def step(self) -> None:
        from qwenkit.server.chat import chat_completion_body
        from qwenkit.server.errors import error_body
        from qwenkit.server.state import new_id

        for out in self.engine.step():
            if not out.finished:
                continue
            job = self.jobs.pop(out.request_id)
            if out.error is not None:  # this request failed alone; the others go on
                self._respond(job.custom_id, 500, error_body(500, out.error, "generation_failed"), out.request_id)
                continue
            body = chat_completion_body(self.state, job.body, out, new_id("chatcmpl"), self.model_name,
                                        job.parse_tools, job.prefix)
            self._respond(job.custom_id, 200, body, out.request_id)

    def _respond(self, custom_id: str, status: int, body: dict, request_id: str | None = None) -> None:
        request_id = request_id or f"batch_req_{uuid.uuid4().hex[:24]}"
        self._write(custom_id, {"status_code": status, "request_id": request_id, "body": body}, None)

    def _write(self, custom_id: str, response: dict | None, error: dict | None) -> None:
        line = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id, "response": response, "error": error}
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.out.flush()  # a kill loses at most the line being written
        self.written += 1
        self.errors += error is not None or response["status_code"] != 200


def pending_lines(path: Path, done: set[str]) -> tuple[list[Line], int]:
    """(lines still to run, number already done). Blank lines are ignored; a custom_id used by an
    earlier line makes the later one an error line."""
    lines: list[Line] = []
    seen: set[str] = set()
    skipped = 0
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            line = parse_line(number, text)
            if line.custom_id in seen:
                line = Line(number, f"line-{number}", error=f"line {number}: custom_id {line.custom_id!r} is used by an earlier line")
            seen.add(line.custom_id)
            if line.custom_id in done:
                skipped += 1
            else:
                lines.append(line)
    return lines, skipped


@dataclass
class BatchSummary:
    done: int  # output lines written by this run
    failed: int  # of which errors (an error line, or a response with a 4xx status)
    skipped: int  # lines already answered in OUTPUT


def run_batch(llm, input_path: Path, output_path: Path, model_name: str, window: int | None = None) -> BatchSummary:
    """Run every line of INPUT not yet answered in OUTPUT, appending the answers to OUTPUT."""
    from tqdm import tqdm

    if not input_path.is_file():
        raise QwenkitError(f"{input_path} does not exist")
    if output_path.resolve() == input_path.resolve():
        raise QwenkitError("OUTPUT must be a different file from INPUT")
    todo, skipped = pending_lines(input_path, finished_ids(output_path))
    if skipped:
        print(f"{skipped} requests already in {output_path}: skipped", file=sys.stderr)
    window = window or 4 * llm.engine.config.max_num_seqs
    lines = iter(todo)
    with output_path.open("a", encoding="utf-8") as out, tqdm(total=len(todo), unit="req", file=sys.stderr) as bar:
        runner = BatchRunner(llm, model_name, out)
        exhausted = False
        while not (exhausted and not runner.jobs):
            before = runner.written
            while not exhausted and len(runner.jobs) < window:  # keep the engine's queue topped up
                line = next(lines, None)
                if line is None:
                    exhausted = True
                else:
                    runner.submit(line)
            if runner.jobs:
                runner.step()
            bar.update(runner.written - before)
    print(f"{runner.written} requests done ({runner.errors} failed) -> {output_path}", file=sys.stderr)
    return BatchSummary(runner.written, runner.errors, skipped)


def run(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        raise QwenkitError(f"{args.input} does not exist")
    llm = load_llm(args)
    path = llm.engine.loaded.path
    name = args.served_model_name or (path.stem if path.is_file() else path.name)
    run_batch(llm, args.input, args.output, name, args.window)
    return 0
