"""What a request constrains its output to: a JSON schema, any JSON object, a regex, one of a few
strings, a grammar (EBNF or Lark) or a structural tag (tool calls).

A GuidedDecoding is hashable (schemas are held as JSON text) so compiled grammars are
cached by it, and it is itself a logits-processor factory: put it in
`SamplingParams.logits_processors` and every sample of the request gets its own grammar matcher
(the engine needs no special case for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.engine.logits_process import ProcessorContext
    from qwenkit.structured.processor import GrammarProcessor


def canonical_json(value: Any, what: str) -> str:
    """One JSON text per value, for hashing. Key order is kept: a schema's `properties` order is the
    order the output writes them in (as OpenAI's structured outputs do), so it is part of the value."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise QwenkitError(f"{what} is not valid JSON: {exc}") from None
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise QwenkitError(f"{what} cannot be written as JSON: {exc}") from None


@dataclass(frozen=True)
class GuidedDecoding:
    json_schema: str | None = None  # canonical JSON text of the schema
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF (GBNF-style, `::=`) or Lark (`:`) text
    structural_tag: str | None = None  # xgrammar structural tag, JSON text (tool calls)

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise QwenkitError("guided choice must be a non-empty list of strings")
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise QwenkitError(f"give exactly one kind of guided decoding, got {given or 'none'}")

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any] | str | bool) -> "GuidedDecoding":
        if not isinstance(schema, dict | str | bool):
            raise QwenkitError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(json_schema=canonical_json(schema, "the JSON schema"))

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    def __call__(self, ctx: ProcessorContext) -> GrammarProcessor:
        """The factory protocol of SamplingParams.logits_processors: one matcher per sample."""
        from qwenkit.structured.processor import grammar_processor  # processor imports this module

        return grammar_processor(self, ctx)
