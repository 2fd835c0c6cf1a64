"""Run models through the engine, alone or as one rank of a torchrun tensor parallel group.

`run(case, group)` on rank 0 returns a prompt's prefill logits (every position) and greedy
generations; the other ranks serve rank 0's steps. Under torchrun:
    python -m torch.distributed.run --nproc-per-node 2 tests/tensor_parallel_run.py CASES.json OUT.pt
runs each case of CASES.json ([{"path": ..., "dtype" or "quantize": ..., "speculative": ...,
"shard_after_load": ..., "native": false, "pause": SECONDS}]) and rank 0 saves the results (prefill logits, greedy
tokens, every engine step's logits, which steps took the one-call decode stack). Each process reads only its shard of the
checkpoint (the loader is given the group), unless the case asks to load the whole model and
shard it in place (what `LLM(loaded_model, tensor_parallel_size=N)` does).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from qwenkit.distributed import ProcessGroup
from qwenkit.engine.llm_engine import EngineConfig, LLMEngine, tensor_parallel_worker
from qwenkit.engine.model_runner import StepInputs
from qwenkit.engine.paged_attention import PrefillSlice
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.model import qwen
from qwenkit.weights.loader import load_model

PROMPT = [5, 17, 250, 3, 99, 42, 7, 180, 64, 11, 299, 0, 128, 77, 31, 2, 260, 45, 90, 13]
# n=2 forks a sample at its first token: the copy of its partial KV block must reach every rank.
PROMPTS = [(PROMPT, 1), (PROMPT[:7], 2), ([1, 2, 3], 1)]
CONFIG = EngineConfig(block_size=4, kv_cache_memory=1 << 20, max_num_batched_tokens=16)


def prefill_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids`, one prefill through the engine's runner (slots 0..T-1)."""
    t = torch.arange(len(ids))
    step = StepInputs(torch.tensor(ids), t, t, torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long),
                      torch.zeros(0, dtype=torch.long), [PrefillSlice(slice(0, len(ids)), t, t)], list(range(len(ids))), {}, {})
    return engine.runner.execute(step)


@contextmanager
def decode_stack(enabled: bool, taken: list[bool]):
    """The one-call native decode stack as it is (each call's use recorded in `taken`), or never."""
    native = qwen.native_decode_layers

    def spy(*args):
        out = native(*args) if enabled else None
        taken.append(out is not None)
        return out

    qwen.native_decode_layers = spy
    try:
        yield
    finally:
        qwen.native_decode_layers = native


def run(case: dict, group: ProcessGroup) -> dict | None:
    taken: list[bool] = []
    with decode_stack(case.get("native", True), taken):
        return _run(case, group, taken)


def _run(case: dict, group: ProcessGroup, taken: list[bool]) -> dict | None:
    shard_on_load = group if not case.get("shard_after_load") else ProcessGroup()
    loaded = load_model(case["path"], case.get("dtype"), quantize=case.get("quantize", "auto"), tensor_parallel=shard_on_load)
    config = replace(CONFIG, speculative=case.get("speculative"))
    if not group.is_main:
        tensor_parallel_worker(loaded, config, group)
        return None
    engine = LLMEngine(loaded, config, group)
    steps, execute = [], engine.runner.execute
    engine.runner.execute = lambda step: steps.append(execute(step)) or steps[-1]  # every step's logits
    try:
        logits = prefill_logits(engine, PROMPT)
        time.sleep(case.get("pause", 0))  # an idle server: the other processes wait for the next step
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, n=n, ignore_eos=True)) for p, n in PROMPTS]
        done = {}
        while engine.has_unfinished_requests():
            done.update({out.request_id: out for out in engine.step() if out.finished})
        tokens = [[c.token_ids for c in done[i].outputs] for i in ids]
        drafts = engine.speculator.stats.num_draft_tokens if engine.speculator is not None else 0
        return {"logits": logits, "tokens": tokens, "drafts": drafts, "steps": steps[1:], "native": taken}
    finally:
        engine.close()


def main(cases_path: str, out_path: str) -> None:
    group = ProcessGroup.from_environment()
    results = [run(case, group) for case in json.loads(open(cases_path).read())]
    if group.is_main:
        torch.save(results, out_path)
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
