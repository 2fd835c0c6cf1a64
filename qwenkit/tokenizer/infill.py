"""Fill-in-the-middle prompts with the model's own FIM tokens (Qwen2.5-Coder, Qwen3-Coder).

Single file:  <|fim_prefix|>PREFIX<|fim_suffix|>SUFFIX<|fim_middle|>
With repository context (Qwen2.5-Coder's repo-level format, as llama.cpp's /infill builds it):
  <|repo_name|>REPO\\n<|file_sep|>PATH\\nTEXT ... <|file_sep|>CURRENT\\n<|fim_prefix|>...<|fim_middle|>
The pieces of text are tokenized one by one and the special tokens inserted by id, so the
structure never depends on how the text around a special token would merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.tokenizer.tokenizer import Tokenizer

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
REPO_NAME, FILE_SEP = "<|repo_name|>", "<|file_sep|>"
DEFAULT_REPO, DEFAULT_FILENAME = "myproject", "filename"  # llama.cpp's placeholders


@dataclass(frozen=True)
class ContextFile:
    """Another file of the repository, shown to the model before the one being edited."""
    filename: str
    text: str


def _special(tokenizer: Tokenizer, token: str) -> int | None:
    return tokenizer.token_to_id(token)


def fim_prompt_ids(
    tokenizer: Tokenizer, prefix: str, suffix: str, extra: Sequence[ContextFile] = (),
    middle_start: str = "", repo_name: str = DEFAULT_REPO, filename: str = DEFAULT_FILENAME,
) -> list[int]:
    """Token ids of a FIM prompt; `middle_start`: text already typed at the cursor (the model
    continues it). Raises QwenkitError for a model without FIM tokens."""
    ids = {t: _special(tokenizer, t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, REPO_NAME, FILE_SEP)}
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if ids[t] is None]
    if missing:
        raise QwenkitError(f"this model has no fill-in-the-middle tokens ({', '.join(missing)} missing from its vocabulary)")

    def text(s: str) -> list[int]:  # the caller's code stays text: a "<|fim_middle|>" in it is no control token
        return tokenizer.encode_text(s)

    out: list[int] = []
    if extra and ids[REPO_NAME] is not None and ids[FILE_SEP] is not None:
        out += [ids[REPO_NAME], *text(repo_name + "\n")]
        for f in extra:
            out += [ids[FILE_SEP], *text(f.filename + "\n" + f.text)]
        out += [ids[FILE_SEP], *text(filename + "\n")]
    elif extra:  # no repository tokens: the context goes in as plain text before the prefix
        out += text("".join(f"// {f.filename}\n{f.text}\n" for f in extra))
    out += [ids[FIM_PREFIX], *text(prefix), ids[FIM_SUFFIX], *text(suffix), ids[FIM_MIDDLE], *text(middle_start)]
    return out
