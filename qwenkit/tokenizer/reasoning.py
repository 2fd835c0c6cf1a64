"""Split Qwen3-style output into its <think> reasoning and the answer."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, thinking_open: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer).

    `thinking_open` says the prompt already opened the block (some templates end with "<think>\\n"),
    so the output starts inside it. Reasoning that never closes (cut by max_tokens) is all reasoning.
    """
    body = text
    if not thinking_open:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        body = stripped[len(THINK_OPEN) :]
    if THINK_CLOSE not in body:
        return body.strip("\n"), ""
    reasoning, answer = body.split(THINK_CLOSE, 1)
    return reasoning.strip("\n"), answer.lstrip("\n")


def prompt_opens_thinking(prompt_text: str) -> bool:
    """True when the prompt ends inside an unclosed <think> block."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)
