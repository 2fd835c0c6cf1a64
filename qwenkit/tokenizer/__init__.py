from qwenkit.tokenizer.chat_template import ChatTemplate
from qwenkit.tokenizer.detokenizer import IncrementalDetokenizer
from qwenkit.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "IncrementalDetokenizer", "Tokenizer"]
