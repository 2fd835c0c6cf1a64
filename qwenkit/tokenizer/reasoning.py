"""Split Qwen3-style output into its <think> reasoning and the answer."""

from __future__ import annotations

from qwenkit.tokenizer.output_parser import THINK_CLOSE, THINK_OPEN, parse_output

__all__ = ["THINK_CLOSE", "THINK_OPEN", "prompt_opens_thinking", "split_reasoning"]


def split_reasoning(text: str, thinking_open: bool = False, reasoning: bool = True) -> tuple[str | None, str]:
    """(reasoning or None, answer). `thinking_open`: the prompt already opened the <think> block;
    `reasoning`: the model writes <think> blocks at all (see OutputParser).

    Reasoning that never closes (cut by max_tokens) is all reasoning.
    """
    parsed = parse_output(text, thinking_open, parse_tools=False, reasoning=reasoning)
    return parsed.reasoning, parsed.content


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the prompt ends inside an unclosed <think> block."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)
