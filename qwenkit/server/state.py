"""What every route needs: the engine front end, the limits, keys, metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from qwenkit.engine.llm import AsyncLLM
from qwenkit.engine.llm_engine import PromptTooLong
from qwenkit.engine.outputs import RequestOutput
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.server.errors import APIError, generation_failed
from qwenkit.server.media import MediaServerConfig
from qwenkit.server.metrics import ServerMetrics
from qwenkit.server.protocol import SamplingFields
from qwenkit.server.security import RateLimiter, check_api_key

T = TypeVar("T")

# Characters of prompt text allowed per token of context before tokenizing at all: a token covers
# a few characters on average and rarely more than a few dozen, so a prompt over this is refused
# without spending seconds of CPU on text that could never fit.
CHARS_PER_CONTEXT_TOKEN = 32


@dataclass
class ServerConfig:
    served_model_name: str = "qwenkit"
    api_keys: list[str] = field(default_factory=list)
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_body_bytes: int = 4 << 20
    max_messages: int = 512
    max_tokens_limit: int | None = None  # default: the model's context
    max_prompt_chars: int | None = None  # default: CHARS_PER_CONTEXT_TOKEN x the context
    metrics_require_key: bool = False  # /metrics is open by default (for scrapers on loopback)
    media: MediaServerConfig = field(default_factory=MediaServerConfig)  # multimodal models: where media may come from


class ServerState:
    def __init__(self, llm: AsyncLLM, config: ServerConfig):
        self.llm = llm
        self.config = config
        self.engine = llm.engine  # read-only after start-up (lora_adapters, vocabulary): no per-step state
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.max_prompt_chars = config.max_prompt_chars or CHARS_PER_CONTEXT_TOKEN * self.max_model_len
        self.metrics = ServerMetrics(lambda: llm.stats)
        self.rate_limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self.created = int(time.time())

    # ---- FastAPI dependencies ---------------------------------------------------------------------

    def authenticate(self, request: Request) -> str:
        """The caller's key (401 without a right one). A dependency, so it runs before the body is validated."""
        return check_api_key(request.headers.get("authorization"), self.config.api_keys)

    def authorize(self, request: Request) -> str:
        """authenticate, then count the request against the key's requests per minute (429). Every
        authenticated request to a rate-limited route is counted, whether it then succeeds or not."""
        key = self.authenticate(request)
        self.rate_limiter.take_request(key)
        return key

    # ---- checks -----------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str:
        """The served name the request asked for: the base model's, or a LoRA adapter's."""
        if model in (None, ""):
            return self.config.served_model_name
        if model != self.config.served_model_name and model not in self.engine.lora_adapters:
            raise APIError(404, f"The model `{model}` does not exist.", "model_not_found", "model")
        return model

    def check_prompt_chars(self, n: int, param: str) -> None:
        if n > self.max_prompt_chars:
            raise APIError(
                400,
                f"the prompt has {n} characters; this server takes at most {self.max_prompt_chars} "
                f"(the model's context holds {self.max_model_len} tokens)",
                "context_length_exceeded", param,
            )

    def model_cards(self) -> list[dict]:
        base = {"object": "model", "created": self.created, "owned_by": "qwenkit", "max_model_len": self.max_model_len}
        cards = [{"id": self.config.served_model_name, **base, "root": self.config.served_model_name, "parent": None}]
        for name, directory in self.engine.lora_adapters.items():
            cards.append({"id": name, **base, "root": directory, "parent": self.config.served_model_name})
        return cards

    def max_tokens(self, key: str, num_prompt_tokens: int, requested: int | None) -> int:
        """max_tokens to use; charges the prompt's tokens to the key's tokens per minute (they were
        tokenized, whatever happens next). Whether the prompt fits is the engine's call (PromptTooLong)."""
        self.rate_limiter.take_tokens(key, num_prompt_tokens)
        room = self.max_model_len - num_prompt_tokens
        if room <= 0:
            return 1  # the engine refuses the prompt itself, with both numbers
        limit = min(room, self.config.max_tokens_limit or room)
        if requested is not None and requested > limit:
            raise APIError(
                400,
                f"max_tokens is too large: {requested}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {num_prompt_tokens} prompt tokens "
                f"(at most {limit} completion tokens).",
                "invalid_value", "max_tokens",
            )
        return requested or limit

    def sampling_params(self, body: SamplingFields, max_tokens: int, **extra) -> SamplingParams:
        try:
            return self.engine.default_sampling_params(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
                stop=[body.stop] if isinstance(body.stop, str) else (body.stop or []),
                stop_token_ids=body.stop_token_ids or [],
                seed=body.seed,
                n=body.n,
                min_tokens=min(body.min_tokens or 0, max_tokens),
                ignore_eos=body.ignore_eos,
                speculative=body.speculative,
                **extra,
            )
        except (QwenkitError, ValueError) as exc:
            raise APIError(400, str(exc), "invalid_value") from exc

    # ---- work -------------------------------------------------------------------------------------

    async def off_loop(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """CPU work (template rendering, tokenization, decoding) in a worker thread: the event loop
        keeps answering other clients, /health included, while a large prompt is processed."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except RecursionError:
            raise APIError(400, "the request nests too deeply to process", "invalid_value") from None

    async def start(
        self, key: str, prompt_ids: list[int], params: SamplingParams, request_id: str, model: str, media: list | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and wait for the engine to accept it: a refusal (LLMEngine.validate_request,
        run once, in the engine) is a 400 here, before any response starts. Returns its outputs."""
        lora = model if model in self.engine.lora_adapters else None
        try:
            stream = await self.llm.add_request(prompt_ids, params, request_id, lora, media)
        except PromptTooLong as exc:
            raise APIError(
                400,
                f"This model's maximum context length is {exc.max_model_len} tokens. However, your "
                f"request has {exc.prompt_tokens} prompt tokens. Please reduce the length of the messages or prompt.",
                "context_length_exceeded", "messages",
            ) from exc
        except QwenkitError as exc:
            raise APIError(400, str(exc), "invalid_value") from exc
        return self._counted(key, stream)

    async def _counted(self, key: str, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Whatever way the request ends (done, failed, client gone), it is counted."""
        last = None
        try:
            async for out in stream:
                last = out
                yield out
        finally:
            await stream.aclose()
            if last is None:
                self.metrics.requests.labels("abort").inc()
            else:
                self.metrics.record(last, time.monotonic())
                self.rate_limiter.charge(key, last.num_generated_tokens)


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


async def final_output(request: Request, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Run a request to the end; abort it if the client goes away before then. A request whose
    generation failed is an error answer (see errors.py), not a 200."""
    async def consume():
        last = None
        async for out in stream:
            last = out
        return last

    task = asyncio.create_task(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()  # closing the stream aborts the request and frees its blocks
            break
    out = await task
    if out.error is not None:
        raise generation_failed(out.error)
    return out
