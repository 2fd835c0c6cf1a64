"""The OpenAI-compatible HTTP server (FastAPI) on top of AsyncLLM."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qwenkit import __version__
from qwenkit.engine.llm import AsyncLLM
from qwenkit.server.body import BodySizeLimit, StrictJSONRoute
from qwenkit.server.chat import chat_completions, template_message
from qwenkit.server.completions import completions
from qwenkit.server.embeddings import router as embeddings_router
from qwenkit.server.errors import APIError, documented_errors, install_error_handlers
from qwenkit.server.infill import add_infill_routes
from qwenkit.server.media import expand_prompt, load_chat_media
from qwenkit.server.ollama import router as ollama_router
from qwenkit.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from qwenkit.server.state import ServerConfig, ServerState


WEB_CHAT_DIR = Path(__file__).parent / "static"  # the browser chat page: plain files, no build step
# The page runs only its own scripts and talks only to this server, whatever a model's reply contains.
WEB_CHAT_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def create_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    state = ServerState(llm, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        llm.shutdown()  # after uvicorn has drained the requests in flight

    app = FastAPI(title="qwenkit", version=__version__, lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    app.state.qwenkit = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)
    # Dependencies run before FastAPI validates the body: a caller without the key learns nothing
    # about the schema. `authorized` also counts the request against the key's rate limit.
    authenticated = Depends(state.authenticate)
    authorized = Depends(state.authorize)

    app.include_router(embeddings_router)
    app.include_router(ollama_router)

    @app.post("/v1/chat/completions", responses=documented_errors(400, 401, 404, 413, 429, 503))
    async def _chat(body: ChatCompletionRequest, request: Request, key: str = authorized):
        return await chat_completions(state, body, request, key)

    @app.post("/v1/completions", responses=documented_errors(400, 401, 404, 413, 429, 503))
    async def _completions(body: CompletionRequest, request: Request, key: str = authorized):
        return await completions(state, body, request, key)

    add_infill_routes(app, state)

    @app.get("/v1/models", responses=documented_errors(401, 429))
    async def _models(_: str = authorized):
        return {"object": "list", "data": state.model_cards()}

    @app.post("/tokenize", responses=documented_errors(400, 401, 404, 413, 429))
    async def _tokenize(body: TokenizeRequest, key: str = authorized):
        """A chat body is tokenized exactly as /v1/chat/completions would (its text stays text); a
        prompt raw, as /v1/completions would (control-token strings in it are control tokens)."""
        state.check_model(body.model)
        if body.messages is not None:
            if len(body.messages) > config.max_messages:
                raise APIError(400, f"too many messages: {len(body.messages)} (limit {config.max_messages})", "invalid_value", "messages")
            # Media are read as chat reads them, and their placeholders expanded: the count is the real one.
            messages, media = await state.off_loop(load_chat_media, state, [template_message(m) for m in body.messages], None)
            state.check_prompt_chars(sum(len(m["content"]) if isinstance(m["content"], str) else 0 for m in messages), "messages")
            tokens = await state.off_loop(state.tokenizer.encode_chat, messages, add_generation_prompt=body.add_generation_prompt)
            tokens = expand_prompt(state, tokens, media)
        else:
            state.check_prompt_chars(len(body.prompt or ""), "prompt")
            tokens = await state.off_loop(state.tokenizer.encode, body.prompt or "")
        state.rate_limiter.take_tokens(key, len(tokens))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    @app.post("/detokenize", responses=documented_errors(400, 401, 404, 413, 429))
    async def _detokenize(body: DetokenizeRequest, key: str = authorized):
        state.check_model(body.model)
        if any(t >= state.tokenizer.vocab_size for t in body.tokens):
            raise APIError(400, "token ids out of the vocabulary range", "invalid_value", "tokens")
        state.rate_limiter.take_tokens(key, len(body.tokens))
        return {"prompt": await state.off_loop(state.tokenizer.decode, body.tokens)}

    @app.get("/health")
    async def _health():
        stats = llm.stats  # published by the engine thread after each step
        return {"status": "ok", "model": config.served_model_name, "queue_depth": stats.waiting,
                "running": stats.running, "kv_cache_usage": stats.kv_cache_usage}

    metrics_auth = [authenticated] if config.metrics_require_key else []

    @app.get("/metrics", dependencies=metrics_auth, responses=documented_errors(401) if metrics_auth else None)
    async def _metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The web chat: the page at / and its files under /ui/; it calls only the API above, with the user's key.
    app.mount("/ui", StaticFiles(directory=WEB_CHAT_DIR), name="web_chat")

    @app.get("/", include_in_schema=False)
    async def _web_chat():
        return FileResponse(WEB_CHAT_DIR / "index.html", headers={"Content-Security-Policy": WEB_CHAT_CSP})

    _document_real_status_codes(app)
    return app


# ---- the OpenAPI schema says what the server really sends ------------------------------------------

def _document_real_status_codes(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this server answers validation errors with 400
    (OpenAI's status), so the schema drops 422 and schema-driven fuzzers test the real contract."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# ---- running it -----------------------------------------------------------------------------------

class DrainingServer(uvicorn.Server):
    """uvicorn, plus: when a drain (SIGTERM/SIGINT) runs out of time, every request still in flight
    is ended by the engine with finish_reason "abort", so each stream closes with its final chunk
    and `data: [DONE]` instead of being cut when uvicorn cancels it."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM, drain_timeout: float):
        super().__init__(config)
        self.llm, self.drain_timeout = llm, drain_timeout
        self._drain_timer: asyncio.TimerHandle | None = None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self._drain_timer is None:
            loop = asyncio.get_event_loop()
            self._drain_timer = loop.call_later(self.drain_timeout, self.llm.abort_all)


def serve(llm: AsyncLLM, config: ServerConfig, host: str, port: int, drain_timeout: float, log_requests: bool) -> None:
    app = create_app(llm, config)
    logging.getLogger("uvicorn.access").disabled = not log_requests
    # uvicorn's own limit comes a little after ours: the aborted streams need a moment to finish.
    uv_config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_timeout + 5)
    DrainingServer(uv_config, llm, drain_timeout).run()
