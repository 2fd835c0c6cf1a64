"""FIM prompts: the token layout against the model's own tokenizer on the hand-written text, and
a clear error for a model without FIM tokens."""

import pytest

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.infill import ContextFile, fim_prompt_ids


@pytest.fixture(scope="module")
def tokenizer():
    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.tokenizer.tokenizer import Tokenizer
    from qwenkit.weights.default_model import ensure_assembled

    return Tokenizer.from_gguf(GGUFFile(ensure_assembled()))


def test_layout_equals_the_hand_written_prompt(tokenizer):
    # The tokenizer splits its special tokens out of plain text, so the hand-written prompt is the reference.
    got = fim_prompt_ids(tokenizer, "def f(x):\n    ", "\n    return y\n", middle_start="y =")
    assert got == tokenizer.encode("<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>y =")
    got = fim_prompt_ids(tokenizer, "a", "b", [ContextFile("x.py", "X = 1\n"), ContextFile("y.py", "Y = 2\n")], filename="z.py")
    hand = "<|repo_name|>myproject\n<|file_sep|>x.py\nX = 1\n<|file_sep|>y.py\nY = 2\n<|file_sep|>z.py\n<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    assert got == tokenizer.encode(hand)


def test_model_without_fim_tokens_is_refused(tmp_path):
    from tiny_models import tiny_tokenizer

    from qwenkit.tokenizer.tokenizer import Tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(QwenkitError, match="no fill-in-the-middle tokens"):
        fim_prompt_ids(Tokenizer.from_hf_dir(tmp_path), "a", "b")
