"""The OpenAI-compatible HTTP server (FastAPI) on top of AsyncLLM."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qwenkit import __version__
from qwenkit.engine.llm import AsyncLLM
from qwenkit.server.chat import chat_completions, template_message
from qwenkit.server.completions import completions
from qwenkit.server.embeddings import router as embeddings_router
from qwenkit.server.errors import error_response, install_error_handlers
from qwenkit.server.ollama import router as ollama_router
from qwenkit.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from qwenkit.server.state import ServerConfig, ServerState


class BodySizeLimit:
    """Refuse bodies over the limit with 413, whether or not they declare a Content-Length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.limit} bytes", "body_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    state = ServerState(llm, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        llm.shutdown()  # after uvicorn has drained the requests in flight

    app = FastAPI(title="qwenkit", version=__version__, lifespan=lifespan)
    app.state.qwenkit = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)

    app.include_router(embeddings_router)
    app.include_router(ollama_router)

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatCompletionRequest, request: Request):
        return await chat_completions(state, body, request)

    @app.post("/v1/completions")
    async def _completions(body: CompletionRequest, request: Request):
        return await completions(state, body, request)

    @app.get("/v1/models")
    async def _models(request: Request):
        state.authenticate(request)
        return {"object": "list", "data": state.model_cards()}

    @app.post("/tokenize")
    async def _tokenize(body: TokenizeRequest, request: Request):
        state.authenticate(request)
        state.check_model(body.model)
        if body.messages is not None:
            text = state.tokenizer.apply_chat_template([template_message(m) for m in body.messages],
                                                       add_generation_prompt=body.add_generation_prompt)
        else:
            text = body.prompt or ""
        tokens = state.tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def _detokenize(body: DetokenizeRequest, request: Request):
        state.authenticate(request)
        state.check_model(body.model)
        if any(not 0 <= t < state.tokenizer.vocab_size for t in body.tokens):
            return error_response(400, "token ids out of the vocabulary range", "invalid_value", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def _health():
        engine = state.engine
        return {"status": "ok", "model": config.served_model_name, "queue_depth": len(engine.scheduler.waiting),
                "running": len(engine.scheduler.running), "kv_cache_usage": engine.block_manager.usage}

    @app.get("/metrics")
    async def _metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
