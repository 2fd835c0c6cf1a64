"""Map a request's structured-output fields (OpenAI `response_format`, vLLM `structured_outputs`
and `guided_*`) and its tools to a GuidedDecoding on its SamplingParams, compiled up front so a
spec that cannot compile is a 400 naming why before anything runs."""

from __future__ import annotations

import json
from typing import Any

from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.errors import QwenkitError
from qwenkit.server.errors import APIError
from qwenkit.server.protocol import ChatCompletionRequest, SamplingFields
from qwenkit.server.state import ServerState
from qwenkit.structured import GuidedDecoding
from qwenkit.structured.compiler import compiler_for
from qwenkit.structured.tools import tool_call_guidance


def _requested(body: SamplingFields) -> list[tuple[str, GuidedDecoding]]:
    """(field, spec) for every structured-output field the request set."""
    found: list[tuple[str, GuidedDecoding]] = []
    so = body.structured_outputs
    if so is not None:
        given = so.model_dump(exclude_none=True, by_alias=True)
        if len(given) != 1:
            raise QwenkitError(f"structured_outputs must set exactly one of json, regex, choice, grammar, json_object, structural_tag; got {sorted(given) or 'none'}")
        (key, value), = given.items()
        spec = {"json": lambda v: GuidedDecoding.from_json_schema(v), "regex": lambda v: GuidedDecoding(regex=v),
                "choice": lambda v: GuidedDecoding(choice=tuple(v)), "grammar": lambda v: GuidedDecoding(grammar=v),
                "json_object": lambda v: GuidedDecoding(json_object=True) if v else None,
                "structural_tag": lambda v: GuidedDecoding(structural_tag=v if isinstance(v, str) else json.dumps(v))}[key](value)
        if spec is not None:
            found.append((f"structured_outputs.{key}", spec))
    if body.guided_json is not None:
        found.append(("guided_json", GuidedDecoding.from_json_schema(body.guided_json)))
    if body.guided_regex is not None:
        found.append(("guided_regex", GuidedDecoding(regex=body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", GuidedDecoding(choice=tuple(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GuidedDecoding(grammar=body.guided_grammar)))
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", GuidedDecoding(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema object", "invalid_value", "response_format")
        found.append(("response_format", GuidedDecoding.from_json_schema(fmt.json_schema.schema_)))
    return found


def declared_tools(body: ChatCompletionRequest) -> dict[str, Any]:
    """name -> parameters schema of the tools the reply may call (none with tool_choice "none")."""
    if not body.tools or body.tool_choice == "none":
        return {}
    return {t.function.name: t.function.parameters for t in body.tools}


def with_guidance(state: ServerState, body: SamplingFields, params: SamplingParams, forced_prefix: str = "") -> SamplingParams:
    """`params` with the request's grammar added; `forced_prefix`: the opening of a tool call the
    prompt already put in the model's mouth (chat with tool_choice "required" or a named one)."""
    try:
        found = _requested(body)
        if len(found) > 1:
            raise QwenkitError(f"ask for one kind of structured output, got {', '.join(f for f, _ in found)}")
        spec = found[0][1] if found else None
        if isinstance(body, ChatCompletionRequest) and (spec is None or forced_prefix):
            if spec is not None:
                raise QwenkitError("a forced tool call cannot be combined with a response format or guided decoding")
            tools = [t.model_dump() for t in body.tools] if declared_tools(body) else []
            spec = tool_call_guidance(tools, forced_prefix, body.parallel_tool_calls)
        if spec is None:
            return params
        compiler_for(state.tokenizer).compile(spec)  # raises the reason now; cached for the engine
    except QwenkitError as exc:
        raise APIError(400, str(exc), "invalid_value") from None
    return params.with_changes(logits_processors=(*params.logits_processors, spec))
