"""SFT data: JSONL records rendered with the model's chat template, labels on assistant tokens only.

A record is `{"messages": [...]}` (optionally with "tools"), or `{"prompt": ..., "completion": ...}`
where each is a string (one user turn, one assistant turn) or a list of messages. Which characters
an assistant wrote is found by rendering the conversation up to and after each assistant turn; the
tokens starting inside those spans get labels, everything else (system, user, tool results, the
template's role headers) is IGNORE_INDEX, which the loss skips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Example:
    token_ids: list[int]
    labels: list[int]  # the token id where it is trained on, IGNORE_INDEX elsewhere


@dataclass
class Dataset:
    examples: list[Example]
    num_truncated: int = 0
    num_dropped: int = 0  # nothing left to train on after truncation


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise QwenkitError(f"data file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QwenkitError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise QwenkitError(f"{path}:{number}: each line must be a JSON object")
        records.append(record)
    if not records:
        raise QwenkitError(f"{path} holds no records")
    return records


def record_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        messages = [*prompt, *completion]
    else:
        raise QwenkitError('a record needs "messages", or "prompt" and "completion"')
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise QwenkitError('"messages" must be a list of objects with a "role"')
    if not any(m["role"] == "assistant" for m in messages):
        raise QwenkitError("a record has no assistant message to train on")
    return messages


def assistant_spans(tokenizer: Tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant wrote (its end-of-turn token included)."""
    text = tokenizer.chat_template.render(messages, tools, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.chat_template.render(messages[:i], tools, add_generation_prompt=True) if i else ""
        through = tokenizer.chat_template.render(messages[: i + 1], tools, add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise QwenkitError(
                "the chat template renders earlier turns differently once later turns follow, so the "
                "assistant's tokens cannot be located; use a template whose renders are prefixes of each other"
            )
        spans.append((len(before), len(through.rstrip())))  # the newline after the end-of-turn is the template's
    return text, spans


def encode_record(tokenizer: Tokenizer, record: dict[str, Any]) -> Example:
    text, spans = assistant_spans(tokenizer, record_messages(record), record.get("tools"))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, labels = list(encoding.ids), []
    for token, (start, _end) in zip(encoding.ids, encoding.offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token if inside else IGNORE_INDEX)
    if tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE_INDEX, *labels]
    return Example(ids, labels)


def load_dataset(path: Path, tokenizer: Tokenizer, max_length: int) -> Dataset:
    dataset = Dataset([])
    for number, record in enumerate(read_jsonl(path), 1):
        try:
            example = encode_record(tokenizer, record)
        except QwenkitError as exc:
            raise QwenkitError(f"{path}, record {number}: {exc}") from exc
        if len(example.token_ids) > max_length:
            example = Example(example.token_ids[:max_length], example.labels[:max_length])
            dataset.num_truncated += 1
        # The first token is never predicted, so a label there alone trains nothing.
        if sum(label != IGNORE_INDEX for label in example.labels[1:]) == 0:
            dataset.num_dropped += 1
            continue
        dataset.examples.append(example)
    if not dataset.examples:
        raise QwenkitError(f"{path}: no record has assistant tokens within {max_length} tokens")
    return dataset
