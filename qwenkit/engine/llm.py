"""The Python API: `LLM` (synchronous, batched) and `AsyncLLM` (streaming, one engine thread)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from qwenkit.engine.embedding import embed_token_ids, embedding_token_ids, fit_to_context
from qwenkit.engine.llm_engine import EngineConfig, LLMEngine, tensor_parallel_worker
from qwenkit.engine.media_chat import MediaContext, chat_media
from qwenkit.engine.media_inputs import MediaItem, accepted_kinds
from qwenkit.engine.outputs import RequestOutput
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.multimodal.processor import MediaOptions
from qwenkit.multimodal.sources import LIBRARY_POLICY, MediaPolicy
from qwenkit.engine.speculative import SpeculationStats
from qwenkit.engine.tensor_parallel import tensor_parallel_group
from qwenkit.weights.loader import LoadedModel, load_model

Prompt = str | list[int]
Messages = list[dict[str, Any]]


def media_context(engine: LLMEngine, policy: MediaPolicy, options: dict[str, Any] | None = None) -> MediaContext:
    """How requests to this engine read their media (`options`: per-request min_pixels, max_pixels, fps)."""
    loaded = engine.loaded
    return MediaContext(loaded.processor, accepted_kinds(loaded.config), policy, MediaOptions.from_dict(options))


def _engine(
    model: str | LoadedModel | None, dtype: str | None, engine_config: EngineConfig | None, tensor_parallel_size: int = 1,
    **load_options,
) -> LLMEngine:
    """The engine; with tensor_parallel_size > 1 (under torchrun), rank 0's, while on the other
    ranks this serves rank 0's steps and then ends the process (it never returns there)."""
    # load_options: load_model's keywords (max_model_len, rope_scaling, revision, source, quantize)
    group = tensor_parallel_group(tensor_parallel_size)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, tensor_parallel=group, **load_options)
    config = engine_config or EngineConfig()
    if not group.is_main:
        tensor_parallel_worker(loaded, config, group)
        group.close()
        raise SystemExit(0)
    return LLMEngine(loaded, config, group)


class LLM:
    """`LLM().generate(prompts)`: every prompt in one continuously batched run; results in order.

    `LLM(model, tensor_parallel_size=N)` in a script launched by `torchrun --nproc-per-node N`
    shards the model over the N processes; only rank 0's call returns (see `_engine`)."""

    def __init__(
        self, model: str | LoadedModel | None = None, dtype: str | None = None, engine_config: EngineConfig | None = None,
        tensor_parallel_size: int = 1, **load_options,
    ):
        self.engine = _engine(model, dtype, engine_config, tensor_parallel_size, **load_options)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        lora: str | None = None,
        media: list[list[MediaItem]] | list[MediaItem] | None = None,
    ) -> list[RequestOutput]:
        """`lora` names an adapter added with `engine.add_lora` (None: the base model); `media[i]` are
        prompt i's preprocessed images/videos/audio in prompt order (see LLMEngine.add_request), or
        for a single prompt, its media list."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        per_prompt = params if isinstance(params, list) else [params] * len(batch)
        if single and media and isinstance(media[0], MediaItem):  # one prompt: its media as a flat list
            media = [media]
        per_media = media if media is not None else [None] * len(batch)
        ids = [self.engine.add_request(p, sp, lora_name=lora, media=m) for p, sp, m in zip(batch, per_prompt, per_media)]
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
        mm_processor_kwargs: dict[str, Any] | None = None,
        media_policy: MediaPolicy = LIBRARY_POLICY,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, through the model's chat template (Tokenizer.encode_chat:
        text in the messages stays text, even when it spells a control token). Contents may be lists
        of OpenAI-style parts with images, video and audio (engine/media_chat.py); the media are read
        as `media_policy` allows (by default: local paths, data: and http(s) URLs) and preprocessed
        with the checkpoint's settings, overridden by `mm_processor_kwargs` (min_pixels, max_pixels, fps)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ctx = media_context(self.engine, media_policy, mm_processor_kwargs)
        prompts, media = [], []
        for conversation in conversations:
            rendered, items = chat_media(conversation, ctx)
            prompts.append(self.tokenizer.encode_chat(rendered, tools, **template_kwargs))
            media.append(items)
        return self.generate(prompts, params, lora, media)

    def embed(
        self,
        inputs: Prompt | list[Prompt],
        pooling: str = "last",
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = False,
    ):
        """Embeddings [len(inputs), dimensions or hidden_size] (float32): last-token pooling and L2
        normalisation as Qwen3-Embedding does, or pooling="mean"; `dimensions` truncates (Matryoshka)."""
        single = isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int))
        batch = [inputs] if single else list(inputs)
        ids = [embedding_token_ids(self.tokenizer, p) if isinstance(p, str) else list(p) for p in batch]
        ids = fit_to_context(ids, self.engine.max_model_len, truncate)
        return embed_token_ids(self.engine.loaded.model, ids, pooling, dimensions, normalize)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, lora: str | None = None, media: list[MediaItem] | None = None
    ) -> Iterator[RequestOutput]:
        """One request, yielding an output each time it produces tokens (the CLI uses this)."""
        request_id = self.engine.add_request(prompt, params, lora_name=lora, media=media)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)  # a no-op once finished; frees blocks if abandoned


@dataclass(frozen=True)
class EngineStats:
    """What the engine looked like after its last step, published by the engine thread: the event
    loop reads this (for /health and /metrics) instead of the scheduler the engine is mutating."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    speculation: SpeculationStats | None = None  # totals, when the engine speculates


class AsyncLLM:
    """Asyncio front end: the engine steps in its own thread; each request streams through a queue.

    A request's outputs end with one whose `finished` is set; if generation failed (the request's
    own sampling, or the shared forward: see LLMEngine.step and fail_all), that last output has
    `error` set and finish_reason "error". Nothing is raised mid-stream.
    """

    def __init__(
        self, model: str | LoadedModel | None = None, dtype: str | None = None, engine_config: EngineConfig | None = None,
        tensor_parallel_size: int = 1, **load_options,
    ):
        self.engine = _engine(model, dtype, engine_config, tensor_parallel_size, **load_options)
        self.tokenizer = self.engine.tokenizer
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self.stats = EngineStats()
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
            self._publish_stats()  # before delivering: a client that has its final output sees the state after it
            for out in outputs:
                self._deliver(out)

    def _publish_stats(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        speculator = self.engine.speculator
        self.stats = EngineStats(len(scheduler.running), len(scheduler.waiting), blocks.usage, blocks.stats.hit_rate,
                                 None if speculator is None else replace(speculator.stats))

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        loop, q = stream
        loop.call_soon_threadsafe(q.put_nowait, out)
        if out.finished:  # nothing more will come (and a consumer that never started cannot leak it)
            self._streams.pop(out.request_id, None)

    async def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, lora: str | None = None,
        media: list[MediaItem] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and wait until the engine has accepted it: a request the engine refuses
        (LLMEngine.validate_request: empty or too long prompt, ids outside the vocabulary...) raises
        its QwenkitError here, before anything is streamed. Returns the request's outputs."""
        request_id = request_id or f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._streams[request_id] = (loop, q)

        def settle(error: Exception | None) -> None:
            if accepted.done():
                return
            if error is None:
                accepted.set_result(None)
            else:
                accepted.set_exception(error)

        def add():
            try:
                self.engine.add_request(prompt, params, request_id, lora, media)
            except Exception as exc:  # reported to the caller, not to the engine thread
                loop.call_soon_threadsafe(settle, exc)
            else:
                loop.call_soon_threadsafe(settle, None)

        self._commands.put(add)
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # cancelled while queued: a no-op unless the engine took it after all
            raise
        return self._outputs(request_id, q)

    async def _outputs(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out = await q.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (disconnect, cancel): free its blocks
                self.abort(request_id)

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, lora: str | None = None,
        media: list[MediaItem] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """add_request and its outputs in one call (a refused request raises on the first iteration)."""
        stream = await self.add_request(prompt, params, request_id, lora, media)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # now, not at garbage collection: an abandoned request is aborted at once

    async def chat(self, messages: Messages, params: SamplingParams | None = None, tools=None, request_id=None, lora=None,
                   mm_processor_kwargs: dict[str, Any] | None = None, media_policy: MediaPolicy = LIBRARY_POLICY, **template_kwargs):
        """As LLM.chat, for one conversation (media parts read in a worker thread)."""
        ctx = media_context(self.engine, media_policy, mm_processor_kwargs)
        rendered, media = await asyncio.to_thread(chat_media, messages, ctx)
        prompt = self.tokenizer.encode_chat(rendered, tools, **template_kwargs)
        async for out in self.generate(prompt, params, request_id, lora, media):
            yield out

    def abort(self, request_id: str) -> None:
        def abort():
            out = self.engine.abort_request(request_id)
            if out is not None:
                self._deliver(out)

        self._commands.put(abort)

    def abort_all(self) -> None:
        """End every request in flight with finish_reason "abort" (a drain that ran out of time)."""
        def abort_all():
            for request_id in list(self.engine.requests):
                out = self.engine.abort_request(request_id)
                if out is not None:
                    self._deliver(out)

        self._commands.put(abort_all)

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
        self.engine.close()  # after the engine thread: the other ranks' collectives come from one thread at a time
