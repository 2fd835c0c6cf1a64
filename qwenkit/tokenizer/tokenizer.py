"""The model's own tokenizer (from tokenizer.json or from GGUF metadata) and its chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.chat_template import ChatTemplate
from qwenkit.tokenizer.gguf_vocab import byte_level_bpe
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.formats.safetensors_dir import read_json

# Tokens that end an assistant turn in every Qwen chat format, whatever the checkpoint's eos says.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


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

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
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
