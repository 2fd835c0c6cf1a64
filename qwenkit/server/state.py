"""What every route needs: the engine front end, the limits, keys, metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from qwenkit.engine.llm import AsyncLLM
from qwenkit.engine.outputs import RequestOutput
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.server.errors import APIError
from qwenkit.server.metrics import ServerMetrics
from qwenkit.server.protocol import SamplingFields
from qwenkit.server.security import RateLimiter, check_api_key


@dataclass
class ServerConfig:
    served_model_name: str = "qwenkit"
    api_keys: list[str] = field(default_factory=list)
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_body_bytes: int = 4 << 20
    max_messages: int = 512
    max_tokens_limit: int | None = None  # default: the model's context
    log_requests: bool = False


class ServerState:
    def __init__(self, llm: AsyncLLM, config: ServerConfig):
        self.llm = llm
        self.config = config
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.metrics = ServerMetrics(llm.engine)
        self.rate_limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self.created = int(time.time())

    def authenticate(self, request: Request) -> str:
        return check_api_key(request.headers.get("authorization"), self.config.api_keys)

    def check_model(self, model: str | None) -> str:
        """The served name the request asked for: the base model's, or a LoRA adapter's."""
        if model in (None, ""):
            return self.config.served_model_name
        if model != self.config.served_model_name and model not in self.engine.lora_adapters:
            raise APIError(404, f"The model `{model}` does not exist.", "model_not_found", "model")
        return model

    def model_cards(self) -> list[dict]:
        base = {"object": "model", "created": self.created, "owned_by": "qwenkit", "max_model_len": self.max_model_len}
        cards = [{"id": self.config.served_model_name, **base, "root": self.config.served_model_name, "parent": None}]
        for name, directory in self.engine.lora_adapters.items():
            cards.append({"id": name, **base, "root": directory, "parent": self.config.served_model_name})
        return cards

    def admit(self, key: str, prompt_ids: list[int], requested_max_tokens: int | None) -> int:
        """Check the prompt and output lengths and the rate limit; return max_tokens to use."""
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {n} prompt tokens. Please reduce the length of the messages or prompt.",
                "context_length_exceeded", "messages",
            )
        room = self.max_model_len - n
        limit = min(room, self.config.max_tokens_limit or room)
        if requested_max_tokens is not None and requested_max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens is too large: {requested_max_tokens}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {n} prompt tokens "
                f"(at most {limit} completion tokens).",
                "invalid_value", "max_tokens",
            )
        self.rate_limiter.admit(key, n)
        return requested_max_tokens or limit

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
                **extra,
            )
        except (QwenkitError, ValueError) as exc:
            raise APIError(400, str(exc), "invalid_value") from exc

    async def generate(
        self, key: str, prompt_ids: list[int], params: SamplingParams, request_id: str, model: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's stream for one request; whatever way it ends (done, client gone), it is counted."""
        last = None
        try:
            lora = model if model in self.engine.lora_adapters else None
            async for out in self.llm.generate(prompt_ids, params, request_id, lora):
                last = out
                yield out
        finally:
            if last is None:
                self.metrics.requests.labels("abort").inc()
            else:
                self.metrics.record(last, time.monotonic())
                self.rate_limiter.charge(key, last.num_generated_tokens)


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


async def final_output(request: Request, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Run a request to the end; abort it if the client goes away before then."""
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
    return await task
