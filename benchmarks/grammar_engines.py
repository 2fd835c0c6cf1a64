"""xgrammar vs llguidance on this CPU, with the default model's tokenizer (issue 18).

Per step of a batch of 16 JSON-schema-constrained rows: the time to fill one token bitmask for
all rows (each library's batched call) and to accept the next token, the grammar compile time
(cold, per schema) and the time to apply the mask to fp32 logits [16, vocab]. The token streams
are real: each row replays the tokenization of a JSON document valid against its schema.

    python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import json
import statistics
import time

import llguidance
import llguidance.torch as llg_torch
import torch
import xgrammar as xgr

from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.tokenizer.tokenizer import Tokenizer
from qwenkit.weights.default_model import ensure_assembled

VOCAB = 151936  # the model's logits width (the tokenizer has 151665 entries)
BATCH = 16

SCHEMAS_AND_DOCS = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
      "required": ["name", "age"]}, {"name": "Ada Lovelace", "age": 36}),
    ({"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
      "required": ["city"]}, {"city": "Paris", "unit": "celsius"}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}}},
      "required": ["items"]}, {"items": [{"sku": "A-1", "qty": 2}, {"sku": "B-22", "qty": 10}]}),
    ({"type": "object", "properties": {"value": {"anyOf": [{"type": "number"}, {"type": "string"}]},
                                       "ok": {"type": "boolean"}}, "required": ["value", "ok"]},
     {"value": 3.25, "ok": True}),
]


def documents() -> list[tuple[dict, str]]:
    rows = [SCHEMAS_AND_DOCS[i % len(SCHEMAS_AND_DOCS)] for i in range(BATCH)]
    return [(schema, json.dumps(doc)) for schema, doc in rows]


def run_xgrammar(tok: Tokenizer, rows: list[tuple[dict, list[int]]]) -> dict[str, float]:
    vocab = [tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=sorted(tok.stop_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    tokenizer_s = time.perf_counter() - t0
    compile_ms = []
    compiled = {}
    for schema, _ in SCHEMAS_AND_DOCS:
        t0 = time.perf_counter()
        compiled[json.dumps(schema)] = compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))
        compile_ms.append((time.perf_counter() - t0) * 1e3)
    matchers = [xgr.GrammarMatcher(compiled[json.dumps(s)]) for s, _ in rows]
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    bitmask = xgr.allocate_token_bitmask(BATCH, VOCAB)
    logits = torch.randn(BATCH, VOCAB)
    fill, accept, apply = [], [], []
    for step in range(max(len(ids) for _, ids in rows)):
        live = [i for i, (_, ids) in enumerate(rows) if step < len(ids)]
        t0 = time.perf_counter()
        batch.batch_fill_next_token_bitmask([matchers[i] for i in live], bitmask, indices=live)
        fill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=live)
        apply.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in live:
            assert matchers[i].accept_token(rows[i][1][step]), f"xgrammar rejected row {i} step {step}"
        accept.append(time.perf_counter() - t0)
    return {"tokenizer_info_s": tokenizer_s, "compile_ms_median": statistics.median(compile_ms),
            "fill_ms_median": statistics.median(fill) * 1e3, "fill_ms_max": max(fill) * 1e3,
            "apply_ms_median": statistics.median(apply) * 1e3, "accept_ms_median": statistics.median(accept) * 1e3}


def run_llguidance(tok: Tokenizer, rows: list[tuple[dict, list[int]]]) -> dict[str, float]:
    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=VOCAB, eos_token=sorted(tok.stop_token_ids))
    tokenizer_s = time.perf_counter() - t0
    compile_ms = []
    grammars = {}
    for schema, _ in SCHEMAS_AND_DOCS:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        t0 = time.perf_counter()
        err = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        m = llguidance.LLMatcher(lltok, grammar)  # llguidance compiles lazily: the first mask is part of it
        m.compute_bitmask()
        compile_ms.append((time.perf_counter() - t0) * 1e3)
        assert not err and not m.is_error(), err or m.get_error()
        grammars[json.dumps(schema)] = grammar
    matchers = [llguidance.LLMatcher(lltok, grammars[json.dumps(s)]) for s, _ in rows]
    executor = llguidance.LLExecutor(num_threads=2)
    bitmask = llg_torch.allocate_token_bitmask(BATCH, VOCAB)
    logits = torch.randn(BATCH, VOCAB)
    fill, accept, apply = [], [], []
    for step in range(max(len(ids) for _, ids in rows)):
        live = [i for i, (_, ids) in enumerate(rows) if step < len(ids)]
        t0 = time.perf_counter()
        llg_torch.fill_next_token_bitmask_par(executor, [(matchers[i], i) for i in live], bitmask)
        fill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=live)  # same apply for both (llguidance's needs torch.compile)
        apply.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in live:
            assert matchers[i].consume_token(rows[i][1][step]), f"llguidance rejected row {i} step {step}: {matchers[i].get_error()}"
        accept.append(time.perf_counter() - t0)
    return {"tokenizer_info_s": tokenizer_s, "compile_ms_median": statistics.median(compile_ms),
            "fill_ms_median": statistics.median(fill) * 1e3, "fill_ms_max": max(fill) * 1e3,
            "apply_ms_median": statistics.median(apply) * 1e3, "accept_ms_median": statistics.median(accept) * 1e3}


COVERAGE_SCHEMA = {"type": "object", "properties": {
    "n": {"type": "number", "minimum": -1.5, "exclusiveMaximum": 10}, "k": {"enum": ["a", "b"]},
    "v": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^x+$"}]},
    "l": {"type": "array", "items": {"type": "string", "format": "date"}, "minItems": 1, "maxItems": 2}}, "required": ["n", "k", "v", "l"]}
LARK = 'start: "a" NUM\nNUM: /[0-9]+/'
GBNF = 'root ::= "a" [0-9]+'


def coverage(tok: Tokenizer) -> None:
    """Which features each library compiles here (a feature that raises is a no)."""
    vocab = [tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=sorted(tok.stop_token_ids))
    xc = xgr.GrammarCompiler(info, max_threads=2)
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=VOCAB, eos_token=sorted(tok.stop_token_ids))

    def llg(grammar: str):
        err = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if err:
            raise ValueError(err)
        return llguidance.LLMatcher(lltok, grammar)

    def xgr_jump_forward():
        m = xgr.GrammarMatcher(xc.compile_json_schema(COVERAGE_SCHEMA, any_whitespace=False))
        return m.find_jump_forward_string() == '{"n": '

    def llg_jump_forward():
        m = llg(llguidance.LLMatcher.grammar_from_json_schema(COVERAGE_SCHEMA, defaults={"whitespace_flexible": False}))
        return bool(m.compute_ff_tokens())

    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [
        {"begin": "<tool_call>", "content": {"type": "json_schema", "json_schema": COVERAGE_SCHEMA}, "end": "</tool_call>"}]}}
    lazy_lark = 'start: TEXT | call\nTEXT: /[^{](.|\\n)*/\ncall: %json ' + json.dumps(COVERAGE_SCHEMA)
    checks = {
        "JSON schema (bounds, enum, anyOf, pattern, format)": (lambda: xc.compile_json_schema(COVERAGE_SCHEMA),
                                                               lambda: llg(llguidance.LLMatcher.grammar_from_json_schema(COVERAGE_SCHEMA))),
        "regex": (lambda: xc.compile_regex("[0-9]{3}-[a-z]+"), lambda: llg(llguidance.LLMatcher.grammar_from_regex("[0-9]{3}-[a-z]+"))),
        "EBNF / GBNF": (lambda: xc.compile_grammar(GBNF), lambda: llg(llguidance.LLMatcher.grammar_from_lark(llguidance.gbnf_to_lark.gbnf_to_lark(GBNF)))),
        "Lark": (lambda: xc.compile_lark(LARK), lambda: llg(llguidance.LLMatcher.grammar_from_lark(LARK))),
        "lazy tool-call grammar (trigger)": (lambda: xc.compile_structural_tag(tag), lambda: llg(llguidance.LLMatcher.grammar_from_lark(lazy_lark))),
        "jump-forward (forced text)": (xgr_jump_forward, llg_jump_forward),
    }
    print(f"{'feature':52}{'xgrammar':>10}{'llguidance':>12}")
    for name, (x, l) in checks.items():
        row = []
        for f in (x, l):
            try:
                row.append("yes" if f() is not False else "no")
            except Exception as exc:  # noqa: BLE001 - a library's refusal is the answer here
                row.append("no (" + type(exc).__name__ + ")")
        print(f"{name:52}{row[0]:>10}{row[1]:>12}")


def main() -> None:
    torch.set_num_threads(2)
    tok = Tokenizer.from_gguf(GGUFFile(ensure_assembled()))
    rows = [(schema, tok.encode(text, add_special_tokens=False) + [tok.token_to_id("<|im_end|>")]) for schema, text in documents()]
    print(f"batch {BATCH}, {sum(len(ids) for _, ids in rows) / BATCH:.1f} tokens per row, vocab {VOCAB}", flush=True)
    results = {"xgrammar": run_xgrammar(tok, rows), "llguidance": run_llguidance(tok, rows)}
    keys = list(next(iter(results.values())))
    print(f"{'':22}" + "".join(f"{k:>20}" for k in keys))
    for name, r in results.items():
        print(f"{name:22}" + "".join(f"{r[k]:20.3f}" for k in keys))
    (x, xr), (l, lr) = results.items()
    print(f"fill ratio llguidance/xgrammar: {lr['fill_ms_median'] / xr['fill_ms_median']:.2f}x")
    coverage(tok)


if __name__ == "__main__":
    main()
