"""Plain Python functions as tools: the JSON schema of the arguments comes from the type hints
(through pydantic, which also checks the model's arguments before the call) and the
descriptions from the docstring (its first paragraph, and `name: text` lines under `Args:`)."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic

from qwenkit.errors import QwenkitError

_ARG_LINE = re.compile(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, parameter -> description) from a Google-style docstring."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    sections = re.split(r"\n\s*(?=(?:Args|Arguments|Parameters|Returns|Raises|Example|Examples):\s*\n)", doc)
    description = sections[0].strip().split("\n\n")[0].replace("\n", " ")
    params: dict[str, str] = {}
    for section in sections[1:]:
        header, _, body = section.partition("\n")
        if header.strip().rstrip(":") not in ("Args", "Arguments", "Parameters"):
            continue
        last, body_indent = None, 0
        for line in body.splitlines():
            match = _ARG_LINE.match(line)
            if match and (last is None or len(line) - len(line.lstrip()) <= body_indent):
                last = match.group(1)
                params[last] = match.group(2).strip()
                body_indent = len(line) - len(line.lstrip())
            elif last and line.strip():  # a continuation line
                params[last] += " " + line.strip()
    return description, params


def _strip_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any] | Callable[..., Awaitable[Any]]
    timeout: float | None = None  # seconds; None: the agent's default
    validator: type[pydantic.BaseModel] | None = field(default=None, repr=False)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None,
                      timeout: float | None = None) -> "Tool":
        signature = inspect.signature(fn)
        hints = get_type_hints(fn)
        doc_description, doc_params = parse_docstring(fn.__doc__)
        fields: dict[str, Any] = {}
        for pname, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise QwenkitError(f"tool {fn.__name__}: *args/**kwargs cannot be described to the model")
            annotation = hints.get(pname, Any)
            default = ... if param.default is param.empty else param.default
            fields[pname] = (annotation, pydantic.Field(default, description=doc_params.get(pname)))
        try:
            model = pydantic.create_model(f"{fn.__name__}_arguments", **fields)
            schema = _strip_titles(model.model_json_schema())
        except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError, TypeError) as exc:
            raise QwenkitError(f"tool {fn.__name__}: its parameters cannot be described as JSON schema ({exc})") from None
        schema.setdefault("properties", {})
        return cls(name or fn.__name__, description or doc_description, schema, fn, timeout, model)

    def openai_schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def check_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The arguments as the function takes them (validated and converted by the type hints)."""
        if self.validator is None:
            return arguments
        model = self.validator.model_validate(arguments)
        return {name: getattr(model, name) for name in type(model).model_fields}


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    return obj if isinstance(obj, Tool) else Tool.from_function(obj)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, timeout: float | None = None):
    """Decorator: `@tool` or `@tool(timeout=5)` turns a function into a Tool."""
    def wrap(f):
        return Tool.from_function(f, name=name, timeout=timeout)
    return wrap(fn) if fn is not None else wrap


def result_text(value: Any) -> str:
    """What the model reads back: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)
