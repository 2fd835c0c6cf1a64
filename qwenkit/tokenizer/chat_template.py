"""Render a model's own Jinja chat template the way transformers' `apply_chat_template` does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenkit.errors import QwenkitError

# Used when a checkpoint carries no template: plain ChatML, Qwen's native format.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


TEMPLATE_GLOBALS = ("raise_exception", "strftime_now")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML and non-ASCII characters; chat templates expect neither.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training tools; it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise QwenkitError(f"the chat template does not compile: {exc}") from exc


class ChatTemplate:
    def __init__(self, source: str | None, special_tokens: dict[str, str | None]):
        self.source = source or CHATML_TEMPLATE
        self.special_tokens = special_tokens

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text. `template_kwargs` reach the template as variables (e.g. enable_thinking)."""
        self.check_kwargs(template_kwargs)
        try:
            return _compile(self.source).render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **template_kwargs,
            )
        except jinja2.TemplateError as exc:
            raise QwenkitError(f"the chat template rejected these messages: {exc}") from exc
        except RecursionError:  # e.g. tool-call arguments nested a thousand levels deep, through tojson
            raise QwenkitError("the messages are nested too deeply to render") from None
        except QwenkitError:
            raise
        except Exception as exc:  # the template is data: its Python errors on a caller's values are the caller's
            raise QwenkitError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from exc

    def check_kwargs(self, template_kwargs: dict[str, Any]) -> None:
        reserved = sorted(set(template_kwargs) & self.reserved_names)
        if reserved:
            raise QwenkitError(f"chat template variables {', '.join(reserved)} are set by qwenkit and cannot be passed as template kwargs")

    @property
    def reserved_names(self) -> frozenset[str]:
        """Template variables qwenkit sets itself: a caller's kwargs may not replace them."""
        return frozenset({"messages", "tools", "add_generation_prompt", *self.special_tokens, *TEMPLATE_GLOBALS})
