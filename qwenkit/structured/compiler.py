"""Compile GuidedDecoding specs into xgrammar grammars for one tokenizer, cached by spec.

xgrammar was measured against llguidance on this CPU (benchmarks/grammar_engines.py): llguidance
fills a batch-16 bitmask faster, but applying a bitmask to the logits needs its torch.compile
kernel (37 s first call on 2 cores) where xgrammar ships a native CPU kernel, and xgrammar builds
its tokenizer index in a tenth of the time and has the structural tags (lazy tool-call grammars)
built in. JSON is compiled with fixed separators `", "` / `": "` (the model's own style): free
whitespace lets a small model loop on newlines forever inside a valid document.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import xgrammar as xgr

from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.structured.spec import GuidedDecoding
    from qwenkit.tokenizer.tokenizer import Tokenizer

JSON_SEPARATORS = (", ", ": ")
CACHE_SIZE = 256


def _encoded_vocab(tokenizer: Tokenizer) -> list[str]:
    """Byte-level token strings; special tokens as "" (xgrammar never allows those inside text,
    so a JSON string cannot contain <|im_end|>), and so are the padding entries past the last
    added token (a GGUF vocabulary lists them as "[PAD151700]"). Added tokens that are not
    special, such as <tool_call>, keep their text so structural tags can match them."""
    vocab = [tokenizer.id_to_token(i) or "" for i in range(tokenizer.vocab_size)]
    added = tokenizer.backend.get_added_tokens_decoder()
    for token_id, token in added.items():
        if token.special and token_id < len(vocab):
            vocab[token_id] = ""
    if added:
        vocab[max(added) + 1 :] = [""] * (len(vocab) - max(added) - 1)
    return vocab


class GrammarCompiler:
    """One per tokenizer (see `compiler_for`); thread-safe, LRU-cached by spec."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.info = xgr.TokenizerInfo(
            _encoded_vocab(tokenizer), xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
            stop_token_ids=sorted(tokenizer.stop_token_ids),
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[GuidedDecoding, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GuidedDecoding) -> xgr.CompiledGrammar:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            compiled = self._compile(spec)
        except QwenkitError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with a reason
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise QwenkitError(f"the {spec.kind.replace('_', ' ')} cannot be compiled: {reason}") from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GuidedDecoding) -> xgr.CompiledGrammar:
        c = self._compiler
        if spec.json_schema is not None:
            return c.compile_json_schema(spec.json_schema, any_whitespace=False, separators=JSON_SEPARATORS)
        if spec.json_object:
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=JSON_SEPARATORS)
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choice))
        if spec.grammar is not None:
            if "::=" in spec.grammar:
                return c.compile_grammar(spec.grammar)
            return c.compile_lark(spec.grammar)
        return c.compile_structural_tag(spec.structural_tag)


_compilers: weakref.WeakKeyDictionary[Tokenizer, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer) -> GrammarCompiler:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return compiler
