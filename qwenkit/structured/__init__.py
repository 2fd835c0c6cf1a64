"""Grammar-constrained decoding: JSON schemas, regexes, choices, grammars and tool-call tags."""

from qwenkit.structured.spec import GuidedDecoding

__all__ = ["GuidedDecoding"]
