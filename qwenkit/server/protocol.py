"""Request bodies of the OpenAI-compatible API (responses are built as plain dicts)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qwenkit.engine.sampling_params import SEED_MAX, SEED_MIN

# OpenAI's rule for function names; it also keeps a name that reaches the forced reply prefix
# (tool_choice) free of anything a tokenizer could read as a control token.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100, le=100)]  # OpenAI's documented range
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]


class Model(BaseModel):
    # Clients send fields we do not use: ignore them as OpenAI does. Floats must be finite.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(Model):
    type: Literal["text"]
    text: str


class MediaURL(Model):
    url: str
    detail: str | None = None  # OpenAI's image detail level: accepted, the pixel budget decides


class ImageURLPart(Model):
    type: Literal["image_url"]
    image_url: MediaURL | str


class InputAudio(Model):
    data: str  # base64
    format: str = "wav"  # the bytes say what they are; wav, mp3, flac... all decode


class InputAudioPart(Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(Model):
    type: Literal["audio_url"]
    audio_url: MediaURL | str


class VideoPart(Model):
    """vLLM's spelling: the video as a list of frame URLs (or one video file URL)."""
    type: Literal["video"]
    video: list[str] | str


class VideoURLPart(Model):
    type: Literal["video_url"]
    video_url: MediaURL | str


CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "audio_url", "video", "video_url")
ContentPart = Annotated[
    TextPart | ImageURLPart | InputAudioPart | AudioURLPart | VideoPart | VideoURLPart, Field(discriminator="type")
]


class FunctionCall(Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, content: Any) -> Any:
        # Named here: otherwise a union's first error ("should be a valid string") hides the real one.
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in CONTENT_PART_TYPES:
                    raise ValueError(f"unsupported content part type {kind!r}; this server takes {', '.join(CONTENT_PART_TYPES)}")
        return content


class FunctionDef(Model):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Model):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None  # the schema is enforced by the grammar either way


class ResponseFormat(Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(Model):
    """vLLM's `structured_outputs` object (exactly one of these)."""
    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None


class StreamOptions(Model):
    include_usage: bool = False


class SamplingFields(Model):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[TokenIdKey, Bias] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    speculative: bool = True  # qwenkit's: False opts this request out of the server's --speculative
    # grammar-constrained output (vLLM's names; see server/guided.py)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(default=None, ge=0)
    # media preprocessing per request (vLLM's name): min_pixels, max_pixels, fps
    mm_processor_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # fill in the middle, between the prompt and this


class TokenizeRequest(Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Model):
    model: str | None = None
    tokens: list[TokenId]
