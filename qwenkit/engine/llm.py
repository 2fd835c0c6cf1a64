"""The Python API: `LLM` (synchronous, batched) and `AsyncLLM` (streaming, one engine thread)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

from qwenkit.engine.llm_engine import EngineConfig, LLMEngine
from qwenkit.engine.outputs import RequestOutput
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.weights.loader import LoadedModel, load_model

Prompt = str | list[int]
Messages = list[dict[str, Any]]


def _engine(model: str | LoadedModel | None, dtype: str | None, engine_config: EngineConfig | None, **load_options) -> LLMEngine:
    # load_options: load_model's keywords (max_model_len, rope_scaling, revision, source, quantize)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, **load_options)
    return LLMEngine(loaded, engine_config or EngineConfig())


class LLM:
    """`LLM().generate(prompts)`: every prompt in one continuously batched run; results in order."""

    def __init__(self, model: str | LoadedModel | None = None, dtype: str | None = None, engine_config: EngineConfig | None = None, **load_options):
        self.engine = _engine(model, dtype, engine_config, **load_options)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora: str | None = None,
    ) -> list[RequestOutput]:
        """`lora` names an adapter added with `engine.add_lora` (None: the base model)."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        per_prompt = params if isinstance(params, list) else [params] * len(batch)
        ids = [self.engine.add_request(p, sp, lora_name=lora) for p, sp in zip(batch, per_prompt)]
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def chat(
        self,
        messages: Messages | list[Messages],
        params: SamplingParams | list[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        lora: str | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [render_chat(self.tokenizer, c, tools, **template_kwargs) for c in conversations]
        return self.generate(prompts, params, lora)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, lora: str | None = None) -> Iterator[RequestOutput]:
        """One request, yielding an output each time it produces tokens (the CLI uses this)."""
        request_id = self.engine.add_request(prompt, params, lora_name=lora)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)  # a no-op once finished; frees blocks if abandoned


def render_chat(tokenizer, messages: Messages, tools=None, **template_kwargs) -> str:
    return tokenizer.chat_template.render(messages, tools=tools, add_generation_prompt=True, **template_kwargs)


class AsyncLLM:
    """Asyncio front end: the engine steps in its own thread; each request streams through a queue."""

    def __init__(self, model: str | LoadedModel | None = None, dtype: str | None = None, engine_config: EngineConfig | None = None):
        self.engine = _engine(model, dtype, engine_config)
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            block = not self.engine.has_unfinished_requests()
            try:
                while True:
                    command = self._commands.get(block=block)
                    block = False
                    if command is None:
                        return
                    command()
            except queue.Empty:
                pass
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the shared forward failed: every request in flight ends with the error
                traceback.print_exc()
                outputs = self.engine.fail_all(exc)
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput | BaseException, request_id: str | None = None) -> None:
        key = request_id or out.request_id
        stream = self._streams.get(key)
        if stream is None:
            return
        loop, q = stream
        loop.call_soon_threadsafe(q.put_nowait, out)

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, lora: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"async-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)

        def add():
            try:
                self.engine.add_request(prompt, params, request_id, lora)
            except Exception as exc:  # reported to the caller, not to the engine thread
                self._deliver(exc, request_id)

        self._commands.put(add)
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                if out.error is not None:
                    finished = True
                    raise RuntimeError(out.error)
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (disconnect, cancel): free its blocks
                self.abort(request_id)

    async def chat(self, messages: Messages, params: SamplingParams | None = None, tools=None, request_id=None, lora=None, **template_kwargs):
        prompt = render_chat(self.tokenizer, messages, tools, **template_kwargs)
        async for out in self.generate(prompt, params, request_id, lora):
            yield out

    def abort(self, request_id: str) -> None:
        def abort():
            out = self.engine.abort_request(request_id)
            if out is not None:
                self._deliver(out)

        self._commands.put(abort)

    def call_in_engine_thread(self, fn) -> "asyncio.Future":
        """Run fn() between engine steps (for consistent reads of engine state)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run():
            try:
                result = fn()
                loop.call_soon_threadsafe(future.set_result, result)
            except Exception as exc:
                loop.call_soon_threadsafe(future.set_exception, exc)

        self._commands.put(run)
        return future

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=10)
