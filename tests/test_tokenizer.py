"""Tokenizer ids against transformers' own tokenizer, from GGUF metadata and from tokenizer.json."""

import pytest
from transformers import AutoTokenizer

from qwenkit.tokenizer.detokenizer import IncrementalDetokenizer
from qwenkit.tokenizer.tokenizer import Tokenizer
from qwenkit.weights.default_model import ensure_assembled
from qwenkit.formats.gguf_reader import GGUFFile

CORPUS = [
    "Hello, world! I'm here; you'll see. DON'T PANIC.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな。",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "Привет, мир! Ёжик в тумане.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 ❤️‍🔥",
    "spaces:     four then eight        end   ",
    "\n\n\n  \n\t\t\r\n mixed whitespace \u3000 ideographic space",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>",
    "naïve café résumé — “quotes” … ½ ° ©",
    "a" * 50 + " " + "🙂" * 5,
]


@pytest.fixture(scope="module")
def gguf_path():
    return ensure_assembled()


@pytest.fixture(scope="module")
def reference(gguf_path):
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def from_gguf(gguf_path):
    return Tokenizer.from_gguf(GGUFFile(gguf_path))


@pytest.mark.parametrize("text", CORPUS)
def test_gguf_tokenizer_matches_transformers(text, reference, from_gguf):
    expected = reference(text)["input_ids"]
    assert from_gguf.encode(text) == expected
    assert from_gguf.decode(expected) == reference.decode(expected)


def test_tokenizer_json_matches_transformers(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for text in CORPUS:
        assert ours.encode(text) == saved(text)["input_ids"], text
    assert ours.eos_token_id == saved.eos_token_id
    assert ours.chat_template.source == saved.chat_template


def test_special_tokens(from_gguf):
    assert from_gguf.eos_token_id == 151645  # <|im_end|>
    assert from_gguf.id_to_token(151644) == "<|im_start|>"
    assert {151643, 151645} <= from_gguf.stop_token_ids
    assert from_gguf.encode("<|im_end|>") == [151645]


@pytest.mark.parametrize("text", [CORPUS[2], CORPUS[3], CORPUS[7], CORPUS[11]])
def test_incremental_detokenizer_never_breaks_utf8(text, from_gguf):
    ids = from_gguf.encode(text)
    detok = IncrementalDetokenizer(from_gguf)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # Some byte-level tokens end mid-character; the detokenizer must have held text back at least once.
    if any(len(c.encode()) > 1 for c in text):
        assert any(p == "" for p in pieces[:-1]) or len(pieces) - 1 < len(text)


def test_detokenizer_flush_gives_a_cut_character_as_the_full_decode_does(from_gguf):
    """max_tokens can cut a multi-byte character: the deltas must still add up to the full decode."""
    ids = from_gguf.encode("ok 🚀🔥")
    cut = next(n for n in range(1, len(ids)) if from_gguf.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(from_gguf)
    pieces = [detok.add(i) for i in ids[:cut]] + [detok.flush()]
    assert "".join(pieces) == from_gguf.decode(ids[:cut])
