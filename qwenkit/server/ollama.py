"""Ollama's API (/api/*), so tools written for Ollama (the `ollama` libraries, Open WebUI, editor
plugins) talk to qwenkit unchanged.

Requests are translated into the OpenAI request models and run through the same helpers as
/v1/chat/completions (chat template, admission, sampling parameters, the output parser), then
answered in Ollama's shapes: NDJSON streaming by default, durations in nanoseconds, tool-call
arguments as objects, errors as {"error": "..."}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from qwenkit import __version__
from qwenkit.engine.outputs import CompletionOutput, RequestOutput
from qwenkit.errors import QwenkitError
from qwenkit.server.chat import chat_prompt_with_media
from qwenkit.server.completions import completion_prompt
from qwenkit.server.embeddings import authorized_key, embed, token_lists
from qwenkit.server.errors import APIError
from qwenkit.server.guided import with_guidance
from qwenkit.server.infill import fim_ids
from qwenkit.server.protocol import ChatCompletionRequest, Model, SamplingFields, Tool
from qwenkit.server.state import ServerState, final_output, new_id
from qwenkit.tokenizer.infill import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from qwenkit.tokenizer.output_parser import Delta, OutputParser, ToolCall, parse_output

# The Ollama release whose API this follows; clients gate features on /api/version.
OLLAMA_API_VERSION = "0.12.0"


class OllamaRoute(APIRoute):
    """Errors as Ollama shapes them ({"error": "..."} with a 4xx), not OpenAI's error object."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return ollama_error(400, _validation_message(exc.errors()))
            except ValidationError as exc:
                return ollama_error(400, _validation_message(exc.errors()))
            except APIError as exc:
                return ollama_error(exc.status, exc.message, exc.headers)
            except QwenkitError as exc:
                return ollama_error(400, str(exc))

        return route


def ollama_error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(errors) -> str:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "invalid JSON in the request body"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{first.get('msg', 'invalid request')}" + (f" ({where})" if where else "")


class OllamaErrorBody(BaseModel):
    error: str


# What the routes really answer besides 200, so the OpenAPI schema (and schema-driven fuzzers) tell the truth.
_ERRORS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model", 413: "Body too large",
           429: "Rate limit reached", 503: "Generation failed (retry)"}
router = APIRouter(prefix="/api", route_class=OllamaRoute,
                   responses={s: {"model": OllamaErrorBody, "description": d} for s, d in _ERRORS.items()})


# ---- request bodies --------------------------------------------------------------------------------

class Options(Model):
    """The Modelfile parameters that map onto sampling; the rest (num_thread, num_gpu, ...) are ignored."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None  # -1: until the context is full
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None  # the context is the model's (or --max-model-len); a smaller one is not enforced


class OllamaFunction(Model):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaToolCall(Model):
    function: OllamaFunction


class OllamaMessage(Model):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class GenerationFields(Model):
    model: str = ""
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    keep_alive: float | str | None = None  # the model stays loaded for the server's life


class OllamaChatRequest(GenerationFields):
    messages: list[OllamaMessage] = []
    tools: list[Tool] | None = None


class OllamaGenerateRequest(GenerationFields):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaEmbedRequest(Model):
    model: str = ""
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(Model):
    model: str = ""
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaShowRequest(Model):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool = False


# ---- translation -----------------------------------------------------------------------------------

def served_model(state: ServerState, name: str) -> str:
    """The served name an Ollama model name means (":latest" is Ollama's default tag)."""
    name = name.removesuffix(":latest")
    try:
        return state.check_model(name)
    except APIError:
        raise APIError(404, f'model "{name}" not found, try pulling it first') from None


def sampling_fields(body: GenerationFields) -> dict[str, Any]:
    o = body.options or Options()
    return {
        "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k, "min_p": o.min_p,
        "max_tokens": o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
        "stop": o.stop, "seed": o.seed, "repetition_penalty": o.repeat_penalty,
        "presence_penalty": o.presence_penalty, "frequency_penalty": o.frequency_penalty,
    }


def openai_message(m: OllamaMessage) -> dict[str, Any]:
    content: str | list[dict[str, Any]] = m.content or ""
    if m.images:  # Ollama sends bare base64: as OpenAI image parts before the text (server/media.py decides)
        content = [{"type": "image_url", "image_url": {"url": "data:image;base64," + image}} for image in m.images]
        content.append({"type": "text", "text": m.content or ""})
    out: dict[str, Any] = {"role": m.role, "content": content, "reasoning_content": m.thinking}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": c.function.model_dump()} for c in m.tool_calls]
    if m.tool_name:
        out["name"] = m.tool_name
    return out


def format_fields(fmt) -> dict[str, Any]:
    """Ollama's `format` ("json" or a JSON schema) as vLLM's structured_outputs: grammar-constrained."""
    if not fmt:
        return {}
    return {"structured_outputs": {"json": fmt} if isinstance(fmt, dict) else {"json_object": True}}


def chat_request(body: OllamaChatRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    kwargs = {"enable_thinking": bool(body.think)} if body.think is not None else None
    return ChatCompletionRequest.model_validate({
        **sampling_fields(body), **format_fields(body.format), "messages": messages,
        "tools": [t.model_dump() for t in body.tools] if body.tools else None, "chat_template_kwargs": kwargs,
    })


# ---- running a request -----------------------------------------------------------------------------

def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def timings(out: RequestOutput, started: float) -> dict[str, int]:
    """Ollama's final-chunk statistics, in nanoseconds (the model is loaded before serving: load 0)."""
    m = out.metrics
    end = m.finished_time or time.monotonic()
    first = m.first_token_time or end
    ns = lambda seconds: max(0, int(seconds * 1e9))  # noqa: E731
    return {"total_duration": ns(time.monotonic() - started), "load_duration": 0,
            "prompt_eval_count": out.num_prompt_tokens, "prompt_eval_duration": ns(first - m.arrival_time),
            "eval_count": out.num_generated_tokens, "eval_duration": ns(end - first)}


async def start(state: ServerState, key: str, model: str, prompt_ids: list[int], fields: SamplingFields,
                prefix: str = "", media: list | None = None) -> AsyncIterator[RequestOutput]:
    """Submit the request (refusals are 400s before anything streams); `prefix`: a forced tool-call opening."""
    max_tokens = state.max_tokens(key, len(prompt_ids), fields.max_tokens)
    params = await state.off_loop(with_guidance, state, fields, state.sampling_params(fields, max_tokens), prefix)
    return await state.start(key, prompt_ids, params, new_id("ollama"), model, media)


def tool_call_json(call: ToolCall) -> dict:
    return {"function": {"name": call.name, "arguments": json.loads(call.arguments)}}


def message_fields(deltas: list[Delta]) -> dict[str, Any]:
    """One chunk's message: its text, thinking and complete tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(d.content for d in deltas)}
    thinking = "".join(d.reasoning for d in deltas)
    if thinking:
        message["thinking"] = thinking
    calls = [tool_call_json(d.tool_call) for d in deltas if d.tool_call is not None]
    if calls:
        message["tool_calls"] = calls
    return message


async def ndjson(model: str, stream: AsyncIterator[RequestOutput], new_parser: Callable[[CompletionOutput], OutputParser],
                 started: float, chunk: Callable[[dict], dict], final: Callable[[RequestOutput], dict]) -> AsyncIterator[str]:
    """The stream as Ollama sends it: one JSON object per line, the last with done and the statistics.
    `chunk` shapes a message into the route's fields; an error mid-stream is a line {"error": ...}.
    `new_parser(completion)` makes the output parser once the engine says whether the prompt opened <think>
    and whether the model writes <think> blocks at all."""
    out, parser = None, None
    try:
        async for out in stream:
            if out.error is not None:
                yield json.dumps({"error": out.error}) + "\n"
                return
            c = out.outputs[0]
            parser = parser or new_parser(c)
            deltas = parser.feed(c.delta_text) + (parser.finish() if c.finished else [])
            message = message_fields(deltas)
            if len(message) > 2 or message["content"]:
                yield json.dumps({"model": model, "created_at": created_at(), **chunk(message), "done": False}) + "\n"
    except Exception as exc:  # the engine failed: Ollama's clients raise this as a ResponseError
        yield json.dumps({"error": str(exc)}) + "\n"
        return
    if out is not None:
        yield json.dumps({"model": model, "created_at": created_at(), **chunk({"role": "assistant", "content": ""}),
                          "done": True, "done_reason": out.outputs[0].finish_reason, **final(out),
                          **timings(out, started)}) + "\n"


def loaded_reply(model: str, shape: dict) -> dict:
    """An empty prompt only loads the model in Ollama; here it is always loaded."""
    return {"model": model, "created_at": created_at(), **shape, "done": True, "done_reason": "load"}


# ---- routes ------------------------------------------------------------------------------------------

def _state(request: Request) -> ServerState:
    return request.app.state.qwenkit


def _authenticated(request: Request) -> str:
    return _state(request).authenticate(request)


authorized, authenticated = Depends(authorized_key), Depends(_authenticated)


@router.post("/chat")
async def chat(body: OllamaChatRequest, request: Request, key: str = authorized):
    started = time.monotonic()
    state = _state(request)
    model = served_model(state, body.model)
    if not body.messages:
        return loaded_reply(model, {"message": {"role": "assistant", "content": ""}})
    oai = chat_request(body, [openai_message(m) for m in body.messages])
    prompt_ids, parse_tools, prefix, media = await state.off_loop(chat_prompt_with_media, state, oai)
    stream = await start(state, key, model, prompt_ids, oai, prefix, media)
    tools = {t.function.name: t.function.parameters for t in oai.tools or []}
    if body.stream:
        lines = ndjson(model, stream, lambda c: OutputParser(c.thinking_open, parse_tools, prefix, tools, c.reasoning),
                       started, lambda m: {"message": m}, lambda out: {})
        return StreamingResponse(lines, media_type="application/x-ndjson")
    out = await final_output(request, stream)
    c = out.outputs[0]
    parsed = parse_output(c.text, c.thinking_open, parse_tools, prefix, tools, c.reasoning)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning:
        message["thinking"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = [tool_call_json(c) for c in parsed.tool_calls]
    return {"model": model, "created_at": created_at(), "message": message, "done": True,
            "done_reason": c.finish_reason, **timings(out, started)}


@router.post("/generate")
async def generate(body: OllamaGenerateRequest, request: Request, key: str = authorized):
    started = time.monotonic()
    state = _state(request)
    model = served_model(state, body.model)
    if body.images and (body.raw or body.suffix):
        raise APIError(400, "images go through the chat template: send them without raw or suffix")
    if body.template:
        raise APIError(400, "template overrides (Go templates) are not supported; send raw=true with a formatted prompt")
    if not body.prompt and not body.suffix and not body.images:
        return loaded_reply(model, {"response": ""})
    fields = SamplingFields.model_validate({**sampling_fields(body), **format_fields(body.format)})
    prompt, media = body.prompt or "", None
    if body.suffix:  # fill in the middle, with the model's FIM tokens (a 400 for a model without them)
        state.check_prompt_chars(len(prompt) + len(body.suffix), "prompt")
        ids = await state.off_loop(fim_ids, state, prompt, body.suffix)
    elif body.raw:  # the caller wrote the whole prompt, control tokens included
        ids = await state.off_loop(completion_prompt, state, prompt)
    else:  # one user turn (images before its text, as /api/chat), through the chat template
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append(openai_message(OllamaMessage(role="user", content=prompt, images=body.images)))
        kwargs = {"enable_thinking": bool(body.think)} if body.think is not None else None
        oai = ChatCompletionRequest.model_validate({"messages": messages, "chat_template_kwargs": kwargs})
        ids, _, _, media = await state.off_loop(chat_prompt_with_media, state, oai)
    prompt_ids = list(body.context or []) + ids
    stream = await start(state, key, model, prompt_ids, fields, media=media)

    def final(out: RequestOutput) -> dict:  # the conversation so far, for the next request's `context`
        return {} if body.raw else {"context": out.prompt_token_ids + out.outputs[0].token_ids}

    def chunk(message: dict) -> dict:
        return {"response": message["content"], **({"thinking": message["thinking"]} if "thinking" in message else {})}

    if body.stream:
        lines = ndjson(model, stream, lambda c: OutputParser(c.thinking_open, False, reasoning=c.reasoning), started, chunk, final)
        return StreamingResponse(lines, media_type="application/x-ndjson")
    out = await final_output(request, stream)
    c = out.outputs[0]
    parsed = parse_output(c.text, c.thinking_open, False, reasoning=c.reasoning)
    reply: dict[str, Any] = {"model": model, "created_at": created_at(), "response": parsed.content}
    if parsed.reasoning:
        reply["thinking"] = parsed.reasoning
    return {**reply, "done": True, "done_reason": out.outputs[0].finish_reason, **final(out), **timings(out, started)}


@router.post("/embed")
async def embed_route(body: OllamaEmbedRequest, request: Request, key: str = authorized):
    started = time.monotonic()
    state = _state(request)
    model = served_model(state, body.model)
    out = await embed(state, key, model, await state.off_loop(token_lists, state, body.input), dimensions=body.dimensions, truncate=body.truncate)
    return {"model": model, "embeddings": out.vectors.tolist(), "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": 0, "prompt_eval_count": out.num_tokens}


@router.post("/embeddings")
async def embeddings_route(body: OllamaEmbeddingsRequest, request: Request, key: str = authorized):
    """The older single-text endpoint."""
    state = _state(request)
    model = served_model(state, body.model)
    out = await embed(state, key, model, await state.off_loop(token_lists, state, body.prompt), truncate=True)
    return {"embedding": out.vectors[0].tolist()}


@router.get("/tags")
async def tags(request: Request, _: str = authenticated):
    state = _state(request)
    facts = model_facts(request)
    return {"models": [{"name": name, "model": name, **facts["listing"]} for name in served_names(state)]}


@router.get("/ps")
async def ps(request: Request, _: str = authenticated):
    state = _state(request)
    facts = model_facts(request)
    return {"models": [{"name": name, "model": name, **facts["listing"], "expires_at": "2318-01-01T00:00:00Z",
                        "size_vram": 0, "context_length": state.max_model_len} for name in served_names(state)]}


@router.post("/show")
async def show(body: OllamaShowRequest, request: Request, _: str = authenticated):
    state = _state(request)
    model = served_model(state, body.model or body.name or "")
    facts = model_facts(request)
    parameters = "\n".join(f"{k:<30} {v}" for k, v in state.engine.loaded.generation_config.items()
                           if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"))
    details = dict(facts["listing"]["details"])
    if model != state.config.served_model_name:
        details["parent_model"] = state.config.served_model_name
    return {"modelfile": f"# served by qwenkit {__version__}\nFROM {state.engine.loaded.path}\n",
            "parameters": parameters, "template": state.tokenizer.chat_template.source, "details": details,
            "model_info": facts["model_info"], "capabilities": facts["capabilities"],
            "modified_at": facts["listing"]["modified_at"]}


@router.get("/version")
async def version():
    return {"version": OLLAMA_API_VERSION}


# ---- what /api/tags and /api/show say about the model ------------------------------------------------

def served_names(state: ServerState) -> list[str]:
    return [state.config.served_model_name, *state.engine.lora_adapters]


def model_facts(request: Request) -> dict[str, Any]:
    """Computed once per server: reading a GGUF header takes a moment."""
    facts = getattr(request.app.state, "ollama_model_facts", None)
    if facts is None:
        facts = request.app.state.ollama_model_facts = _model_facts(_state(request))
    return facts


def _model_facts(state: ServerState) -> dict[str, Any]:
    loaded = state.engine.loaded
    cfg, path = loaded.config, loaded.path
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    size = sum(p.stat().st_size for p in files)
    mtime = max((p.stat().st_mtime for p in files), default=time.time())
    if path.suffix == ".gguf":
        from qwenkit.formats.gguf_reader import GGUFFile

        gguf = GGUFFile(path)
        count = sum(int(_product(t.shape)) for t in gguf.tensors.values())
        level = _gguf_file_type(gguf.metadata.get("general.file_type"))
        fmt = "gguf"
    else:
        count = sum(p.numel() for p in loaded.model.parameters())
        level = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}.get(str(loaded.model.dtype), "")
        fmt = "safetensors"
    arch = cfg.model_type
    template = state.tokenizer.chat_template.source
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    if "<think>" in template:
        capabilities.append("thinking")
    if all(state.tokenizer.token_to_id(t) is not None for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)):
        capabilities.append("insert")
    return {
        "listing": {
            "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": size,
            # An identifier of the checkpoint (path, size, time), not a hash of its bytes (that would read them all).
            "digest": hashlib.sha256(f"{path.resolve()}:{size}:{mtime}".encode()).hexdigest(),
            "details": {"parent_model": "", "format": fmt, "family": arch, "families": [arch],
                        "parameter_size": _human_count(count), "quantization_level": level},
        },
        "model_info": {
            "general.architecture": arch, "general.parameter_count": count,
            f"{arch}.context_length": state.max_model_len, f"{arch}.embedding_length": cfg.hidden_size,
            f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.feed_forward_length": cfg.intermediate_size,
            f"{arch}.attention.head_count": cfg.num_attention_heads, f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
            f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps, f"{arch}.rope.freq_base": cfg.rope.theta,
            f"{arch}.vocab_size": cfg.vocab_size,
        },
        "capabilities": capabilities,
    }


def _product(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _gguf_file_type(value) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return ""


def _human_count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
