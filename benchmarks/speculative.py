"""Speculative decoding (prompt lookup) on code edits and on free-form stories, beside llama.cpp.

Code edits: each prompt gives a real file of this repository and asks for an edited version (add
type hints, rename a variable, add docstrings, fix a described bug), so the answer copies long
spans of its input. Stories copy nothing. Everything is greedy at batch 1 with 2 threads on the
embedded default GGUF, each runtime in its own process:

- qwenkit without speculation and with `speculative="ngram"` (outputs compared token by token);
- llama-cpp-python (if installed: pip install -e ".[bench]") plainly and with its
  `LlamaPromptLookupDecoding` for each `num_pred_tokens` in --pred-tokens (the best is reported).

Decode tok/s counts the tokens after the first over the time after the first (prefill excluded),
summed over a workload's prompts. Prints a table with ratios.

    python benchmarks/speculative.py [--max-tokens 256] [--num-prompts 10] [--pred-tokens 2,4,6,8,10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent

# (file, what to do). Files are read at run time: the prompts are this repository as it stands.
EDITS = [
    ("qwenkit/engine/text_output.py", "Add a docstring to every method that lacks one."),
    ("qwenkit/engine/outputs.py", "Rename the field `delta_text` to `new_text` everywhere."),
    ("qwenkit/engine/sequence.py", "Add type hints to every function and method that lacks them."),
    ("qwenkit/tokenizer/detokenizer.py", "Rename `_held` to `_pending` everywhere."),
    ("qwenkit/engine/benchmark.py", "Add a docstring to every function and property that lacks one."),
    ("qwenkit/cli/generate.py", "Add type hints to every function."),
    ("qwenkit/engine/model_runner.py", "Rename the variable `prefills` to `prefill_slices` everywhere."),
    ("qwenkit/tokenizer/reasoning.py", "Add a module-level constant THINK_TAGS = (THINK_OPEN, THINK_CLOSE) and use it."),
    ("qwenkit/cli/bench.py", "Add a --warmup flag (int, default 0) that runs that many requests before measuring."),
]
# (file, the text to break, the broken text, the bug report)
BUGS = [
    ("qwenkit/engine/text_output.py", "len(self.text) - self.hold_back)", "len(self.text) + self.hold_back)",
     "A stop string that starts in text produced by an earlier token is never found."),
    ("qwenkit/engine/sequence.py", "return self.token_ids[self.num_prompt_tokens :]", "return self.token_ids[self.num_prompt_tokens - 1 :]",
     "output_token_ids includes the last prompt token."),
]
STORIES = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Write a long story about a city where it never stops raining.",
    "Write a long fairy tale about a fox who wants to learn to fly.",
]


def code_edit_messages(num: int) -> list[str]:
    prompts = []
    for path, ask in EDITS:
        source = (ROOT / path).read_text()
        prompts.append(f"{ask} Return the whole file.\n\n`{path}`:\n```python\n{source}```")
    for path, good, bad, report in BUGS:
        source = (ROOT / path).read_text()
        if good in source:  # the file may have moved on; then this prompt is skipped
            prompts.append(f"Fix this bug: {report} Return the whole corrected file.\n\n`{path}`:\n```python\n{source.replace(good, bad)}```")
    return prompts[:num]


def workloads(num: int) -> dict[str, list[list[int]]]:
    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.tokenizer.tokenizer import Tokenizer
    from qwenkit.weights.default_model import ensure_assembled

    tok = Tokenizer.from_gguf(GGUFFile(ensure_assembled()))
    chat = lambda text: tok.encode_chat([{"role": "user", "content": text}])  # noqa: E731
    return {"code edits": [chat(m) for m in code_edit_messages(num)], "stories": [chat(s) for s in STORIES[: max(1, num // 3)]]}


def decode_rate(runs: list[tuple[int, float]]) -> float:
    """(tokens after the first, seconds after the first) per prompt -> tokens per second overall."""
    return sum(n for n, _ in runs) / sum(s for _, s in runs)


def run_qwenkit(prompts: dict[str, list[list[int]]], max_tokens: int, num_speculative_tokens: int) -> dict:
    import torch

    from qwenkit.engine import LLM, EngineConfig, SamplingParams
    from qwenkit.weights.loader import load_model

    torch.set_num_threads(THREADS)
    loaded = load_model(None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    # No prefix caching: a prompt whose head one engine has cached prefills in other chunks, and
    # chunk sizes move the last bits of the numbers (the comparison of outputs would show that).
    engines = {
        "qwenkit": LLM(loaded, engine_config=EngineConfig(enable_prefix_caching=False)),
        "qwenkit ngram": LLM(loaded, engine_config=EngineConfig(
            enable_prefix_caching=False, speculative="ngram", num_speculative_tokens=num_speculative_tokens)),
    }
    for llm in engines.values():  # warm up
        llm.generate(prompts["stories"][0], params.with_changes(max_tokens=8))
    result = {}
    for name, llm in engines.items():
        for workload, batch in prompts.items():
            runs, outputs = [], []
            speculator = llm.engine.speculator
            stats = speculator.stats if speculator is not None and speculator.drafter is not None else None
            before = (stats.num_verifications, stats.num_draft_tokens, stats.num_accepted_tokens) if stats else None
            for ids in batch:
                out = llm.generate(ids, params)[0]
                times = out.token_times[0]
                runs.append((len(times) - 1, times[-1] - times[0]))
                outputs.append(out.outputs[0].token_ids)
            row = {"rate": decode_rate(runs), "outputs": outputs, "tokens": sum(len(o) for o in outputs)}
            if stats:
                v, d, a = (x - y for x, y in zip((stats.num_verifications, stats.num_draft_tokens, stats.num_accepted_tokens), before))
                row["note"] = f"accepted {a / max(d, 1):.0%} of drafts, {1 + a / max(v, 1):.2f} tokens/verification"
            result[(name, workload)] = row
    return result


def run_llama_cpp(prompts: dict[str, list[list[int]]], max_tokens: int, pred_tokens: list[int], stop_ids: list[int]) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from qwenkit.weights.default_model import ensure_assembled

    settings = dict(n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)
    result = {}
    for n in [0, *pred_tokens]:
        draft = LlamaPromptLookupDecoding(num_pred_tokens=n) if n else None
        llm = Llama(str(ensure_assembled()), draft_model=draft, logits_all=draft is not None, **settings)  # lookup needs every logit
        name = "llama.cpp" if not n else f"llama.cpp lookup {n}"
        for workload, batch in prompts.items():
            runs, outputs = [], []
            for ids in batch:
                stamps, tokens = [], []
                for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                    stamps.append(time.monotonic())
                    tokens.append(token)
                    if token in stop_ids or len(tokens) >= max_tokens:
                        break
                runs.append((len(stamps) - 1, stamps[-1] - stamps[0]))
                outputs.append(tokens)
            result[(name, workload)] = {"rate": decode_rate(runs), "outputs": outputs, "tokens": sum(len(o) for o in outputs)}
        del llm
    return result


def isolated(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=11, help="code-edit prompts (at most 11)")
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--pred-tokens", default="2,4,6,8,10", help="llama.cpp prompt lookup settings to try")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args()
    prompts = workloads(args.num_prompts)
    rows = isolated(run_qwenkit, prompts, args.max_tokens, args.num_speculative_tokens)
    try:
        import llama_cpp  # noqa: F401

        have_llama = not args.skip_llama_cpp
    except ImportError:
        have_llama = False
    if have_llama:
        from qwenkit.formats.gguf_reader import GGUFFile
        from qwenkit.tokenizer.tokenizer import Tokenizer
        from qwenkit.weights.default_model import ensure_assembled

        stop_ids = sorted(Tokenizer.from_gguf(GGUFFile(ensure_assembled())).stop_token_ids)
        pred = [int(x) for x in args.pred_tokens.split(",") if x]
        rows.update(isolated(run_llama_cpp, prompts, args.max_tokens, pred, stop_ids))
    print(f"\ngreedy, batch 1, {THREADS} threads, up to {args.max_tokens} tokens per prompt; decode tok/s (prefill excluded)")
    for workload, batch in prompts.items():
        base = rows[("qwenkit", workload)]
        names = ["qwenkit", "qwenkit ngram"]
        if have_llama:
            lookups = [name for name, w in rows if w == workload and name.startswith("llama.cpp lookup")]
            best = max(lookups, key=lambda name: rows[(name, workload)]["rate"]) if lookups else None
            names += ["llama.cpp"] + ([best] if best else [])
        print(f"\n{workload} ({len(batch)} prompts)")
        print(f"{'runtime':24}{'tok/s':>8}{'vs qwenkit':>12}{'vs llama.cpp':>14}{'vs lookup':>11}  notes")
        for name in names:
            r = rows[(name, workload)]
            cells = [f"{r['rate'] / base['rate']:.2f}x"]
            for anchor in (("llama.cpp", best) if have_llama else (None, None)):
                cells.append(f"{r['rate'] / rows[(anchor, workload)]['rate']:.2f}x" if anchor else "-")
            note = r.get("note", "")
            if name == "qwenkit ngram":
                same = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
                note += f"; {same}/{len(batch)} outputs token-identical to qwenkit"
            print(f"{name:24}{r['rate']:>8.1f}{cells[0]:>12}{cells[1]:>14}{cells[2]:>11}  {note} ({r['tokens']} tokens)")
        if have_llama:
            print("llama.cpp lookup: " + ", ".join(f"{name.split()[-1]}: {rows[(name, workload)]['rate']:.1f}" for name in lookups))


if __name__ == "__main__":
    main()
