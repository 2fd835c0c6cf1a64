"""Peak memory of a long prompt's chunked prefill on a tiny model with YaRN factor 4 (context 131,072).

Each prompt length runs in a fresh process, whose memory high-water mark is reset just before the
prefill (/proc/self/clear_refs), so VmHWM is the prefill's own peak. The KV pool is allocated for
the whole context up front, but its pages only count once written, so the peak should grow by the
KV cache of the prompt (printed) and little more: prefill runs in chunks of
`max_num_batched_tokens`, each attending over the cache, never materialising the whole prompt's
activations. Usage: python benchmarks/long_prefill.py [LENGTH ...]   (default 8192 32768 100000)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
sys.path.insert(0, "tests")
from qwenkit.engine.llm_engine import EngineConfig, LLMEngine
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.weights.loader import load_model

n, directory = int(sys.argv[1]), sys.argv[2]
loaded = load_model(directory, "float32", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
kv = loaded.plan.context_kv_bytes
engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=kv, max_num_batched_tokens=512, enable_prefix_caching=False))
def status(key):  # bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the high-water mark restarts from the current RSS: the prefill's own peak, not loading's
before = status("VmRSS")
ids = torch.randint(0, loaded.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
start = time.perf_counter()
engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
steps = 0
while engine.has_unfinished_requests():
    engine.step()
    steps += 1
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"tokens": n, "steps": steps, "seconds": seconds, "rss_before_prefill": before, "peak_rss": peak,
                  "kv_bytes_of_prompt": n * loaded.plan.kv_bytes_per_token, "max_model_len": loaded.plan.max_model_len}))
"""


def build_tiny(directory: Path) -> None:
    sys.path.insert(0, "tests")
    import transformers
    from tiny_models import randomize, tiny_tokenizer

    config = transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


def main() -> None:
    lengths = [int(a) for a in sys.argv[1:]] or [8192, 32768, 100_000]
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny(Path(tmp))
        print(f"{'tokens':>8} {'steps':>6} {'seconds':>8} {'tok/s':>7} {'RSS before':>11} {'peak RSS':>9} {'KV of prompt':>12} "
              f"{'growth beyond KV':>16}")
        for n in lengths:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), tmp], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mib = 1 << 20
            beyond = (r["peak_rss"] - r["rss_before_prefill"] - r["kv_bytes_of_prompt"]) / mib
            print(f"{n:>8} {r['steps']:>6} {r['seconds']:>8.1f} {n / r['seconds']:>7.0f} {r['rss_before_prefill'] / mib:>9.0f}Mi "
                  f"{r['peak_rss'] / mib:>7.0f}Mi {r['kv_bytes_of_prompt'] / mib:>10.1f}Mi {beyond:>14.1f}Mi")


if __name__ == "__main__":
    main()
