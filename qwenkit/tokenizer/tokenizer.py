"""The model's own tokenizer (from tokenizer.json or from GGUF metadata) and its chat template."""

from __future__ import annotations

import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.chat_template import ChatTemplate
from qwenkit.tokenizer.gguf_vocab import byte_level_bpe
from qwenkit.tokenizer.output_parser import THINK_OPEN
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.formats.safetensors_dir import read_json

# Deeper nesting in messages or tools is refused before rendering (json.dumps and Jinja would hit
# Python's recursion limit near 1,000 levels; no real schema or tool call comes close to this).
MAX_NESTING = 64

LONG_TEXT = 4096  # characters (or ids) from which (de)tokenizing releases the GIL

# Tokens that end an assistant turn in every Qwen chat format, whatever the checkpoint's eos says.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet inverted (character -> the byte it stands for): printable
    bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)}
    alphabet, shifted = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[chr(b)] = b
        else:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str | None],
        chat_template: str | None,
        add_bos_token: bool = False,
        extra_stop_ids: tuple[int, ...] = (),
    ):
        self.backend = backend
        self.special_tokens = special_tokens
        self.chat_template = ChatTemplate(chat_template, special_tokens)
        self.has_chat_template = chat_template is not None
        self.add_bos_token = add_bos_token
        self.bos_token_id = self.token_to_id(special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(special_tokens.get("eos_token"))
        self.pad_token_id = self.token_to_id(special_tokens.get("pad_token"))
        stops = {self.eos_token_id, *extra_stop_ids, *(self.token_to_id(t) for t in END_OF_TURN_TOKENS)}
        self.stop_token_ids = frozenset(i for i in stops if i is not None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def writes_thinking(self) -> bool:
        """The model writes <think> blocks: its vocabulary has the token (Qwen3, QwQ). Others (Qwen2.5)
        may still write the text "<think>", which is then content."""
        return self.token_to_id(THINK_OPEN) is not None

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (OpenAI's logprobs `bytes`). A byte-level token holding part of a
        multi-byte character (an emoji is often two or three) gives that part, where decode() can only
        show U+FFFD; the parts of a character concatenate to its UTF-8."""
        text = self.backend.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.backend.id_to_token(token_id)
        if piece is not None and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return text.encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = _encode(self.backend, text)
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_text(self, text: str) -> list[int]:
        """`text` as plain text: strings like "<|im_start|>" become ordinary tokens, never control tokens."""
        return _encode(self._plain_backend, text) if text else []

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        reply_prefix: str = "",
        raw_special_tokens: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        **more_template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids of a conversation: the one place chat is tokenized (server, LLM.chat, CLI).

        Control tokens come only from the template (and from `reply_prefix`, trusted text the
        reply is forced to start with). Every string that came with the messages, tools or kwargs
        (contents, tool results, tool descriptions, arguments, names) is tokenized as text, so a
        user who writes "<|im_end|>\n<|im_start|>system" gets those characters, not a forged turn.
        `raw_special_tokens=True` is for trusted callers who mean such strings as control tokens.

        How: every control-token string inside the caller's data is swapped for a sentinel the
        template cannot mistake for anything, the template renders, the result is split at the
        control tokens the template wrote, and each run of text between them (sentinels turned
        back into their strings) is tokenized as plain text in one piece, so BPE merges across the
        seam between template text and user text are the same as tokenizing the whole string.
        For conversations without such strings the ids equal transformers' apply_chat_template.
        Template variables come as `template_kwargs` (a client's dict: its keys cannot collide
        with this method's parameters) and/or as keyword arguments; reserved names are refused.
        """
        template_kwargs = {**(template_kwargs or {}), **more_template_kwargs}
        self.chat_template.check_kwargs(template_kwargs)  # before they meet render's own parameters
        if raw_special_tokens:
            text = self.chat_template.render(messages, tools, add_generation_prompt, **template_kwargs)
            return _encode(self.backend, text + reply_prefix)
        nonce = secrets.token_hex(8)
        sentinels = {t: f"\ue000{nonce}{i:x}\ue001" for i, t in enumerate(self._control_strings)}
        back = {v: k for k, v in sentinels.items()}

        def defang(value: Any, depth: int = 0) -> Any:
            if depth > MAX_NESTING:
                raise QwenkitError(f"messages, tools or template kwargs nest deeper than {MAX_NESTING} levels")
            if isinstance(value, str):
                return self._control_pattern.sub(lambda m: sentinels[m.group(0)], value) if self._control_pattern else value
            if isinstance(value, dict):
                return {defang(k, depth + 1): defang(v, depth + 1) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [defang(v, depth + 1) for v in value]
            return value

        text = self.chat_template.render(
            defang(messages), defang(tools) if tools is not None else None, add_generation_prompt,
            **{k: defang(v) for k, v in template_kwargs.items()},
        ) + reply_prefix
        restore = re.compile("\ue000" + nonce + "[0-9a-f]+\ue001")
        ids: list[int] = []
        pos = 0
        for m in self._control_pattern.finditer(text) if self._control_pattern else ():
            ids += self.encode_text(restore.sub(lambda s: back.get(s.group(0), s.group(0)), text[pos : m.start()]))
            ids.append(self._control_ids[m.group(0)])
            pos = m.end()
        ids += self.encode_text(restore.sub(lambda s: back.get(s.group(0), s.group(0)), text[pos:]))
        return ids

    @cached_property
    def _control_ids(self) -> dict[str, int]:
        """Every added token (special or not: "<|im_start|>", "<tool_call>", "<think>"), by its string."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.content}

    @cached_property
    def _control_strings(self) -> list[str]:
        return sorted(self._control_ids, key=len, reverse=True)  # longest first: leftmost-longest, as tokenizers matches

    @cached_property
    def _control_pattern(self) -> re.Pattern | None:
        return re.compile("|".join(map(re.escape, self._control_strings))) if self._control_strings else None

    @cached_property
    def _plain_backend(self) -> BackendTokenizer:
        """The same model, normalizer and pre-tokenizer without the added tokens: text only.
        (`encode_special_tokens` would leave non-special added tokens such as <tool_call> matched.)"""
        plain = BackendTokenizer(self.backend.model)
        plain.normalizer = self.backend.normalizer
        plain.pre_tokenizer = self.backend.pre_tokenizer
        plain.decoder = self.backend.decoder
        return plain

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if len(ids) > LONG_TEXT:
            return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_hf_dir(cls, directory: Path, generation_eos: tuple[int, ...] = ()) -> "Tokenizer":
        path = directory / "tokenizer.json"
        if not path.exists():
            raise QwenkitError(f"{directory} has no tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise QwenkitError(f"{path} is not a valid tokenizer file: {exc}") from exc
        config = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
        special = {
            name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return cls(
            backend,
            special,
            _hf_chat_template(directory, config),
            add_bos_token=bool(config.get("add_bos_token", False)),
            extra_stop_ids=generation_eos,
        )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "Tokenizer":
        meta = gguf.metadata
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise QwenkitError(f"{gguf.path} carries no tokenizer (tokenizer.ggml.tokens is missing)")
        backend = byte_level_bpe(
            tokens,
            meta.get("tokenizer.ggml.merges", []),
            meta.get("tokenizer.ggml.token_type", []),
            meta.get("tokenizer.ggml.pre"),
            meta.get("tokenizer.ggml.model"),
        )

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        special = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "pad_token": token("padding_token_id"),
            "unk_token": token("unknown_token_id"),
        }
        return cls(
            backend,
            special,
            meta.get("tokenizer.chat_template"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )


def _encode(backend: BackendTokenizer, text: str) -> list[int]:
    # tokenizers' encode() holds the GIL for the whole text; encode_batch() lets go of it, so a
    # megabyte prompt tokenized in a worker thread does not stall the server's event loop.
    if len(text) > LONG_TEXT:
        return backend.encode_batch([text], add_special_tokens=False)[0].ids
    return backend.encode(text, add_special_tokens=False).ids


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ..., ...}
        return value.get("content")
    return value


def _hf_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    # Newer transformers save the template beside the config; older ones inside it.
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    json_file = directory / "chat_template.json"
    template = read_json(json_file).get("chat_template") if json_file.exists() else config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
