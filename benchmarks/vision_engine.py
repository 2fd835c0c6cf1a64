"""A 448x448 image through the engine (LLM.generate with media) on a random Qwen2.5-VL with the real
vision tower's dimensions (depth 32, width 1280, windows of 112 px; a 2-layer language model of the
real width, as benchmarks/vision_vs_transformers.py builds it), beside transformers' forward on the
same weights, same pixels, same run:

- vision-encoder time (qwenkit's tower alone, and transformers');
- time to first token of a request with the image (encoder + prefill + one token) and its prefill tok/s;
- the same image again in a new request: the encoder cache and the prefix cache make it a few tokens' work.

    python benchmarks/vision_engine.py [--depth 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models

from qwenkit.engine import LLM, EngineConfig, SamplingParams
from qwenkit.engine.media_inputs import MediaItem, encode_media
from qwenkit.multimodal.image import preprocess_image
from vision_vs_transformers import IMAGE, VISION_END, VISION_START, reference_model


def save_with_tokenizer(ref, directory: Path) -> None:
    """The checkpoint plus a word-level tokenizer over its 1000 ids (the engine detokenizes)."""
    ref.save_pretrained(directory)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1"}))


def timed(fn):
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ref = reference_model(args.depth, torch.float32)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(args.repeats + 1)]
    items = [MediaItem("image", preprocess_image(img)) for img in images]
    n = items[0].num_tokens
    ids = [5, 17, 250, VISION_START, IMAGE, VISION_END] + list(range(40, 60))  # one placeholder, expanded by the engine
    expanded = [5, 17, 250, VISION_START] + [IMAGE] * n + [VISION_END] + list(range(40, 60))
    with tempfile.TemporaryDirectory() as tmp:
        save_with_tokenizer(ref, Path(tmp))
        llm = LLM(tmp, engine_config=EngineConfig(max_num_batched_tokens=1024))
    model = llm.engine.loaded.model
    one = SamplingParams(max_tokens=1, temperature=0)

    ours_vision = min(timed(lambda i=i: encode_media(model, i))[0] for i in items[1:])
    grid = torch.tensor([items[0].data.grid])
    ref_vision = min(timed(lambda i=i: ref.model.visual(i.data.pixel_values, grid_thw=grid).pooler_output)[0] for i in items[1:])
    # Cold: a new image each time (encoder + whole prefill); the first run also warms up.
    cold = [timed(lambda i=i: llm.generate(ids, one, media=[i]))[0] for i in items]
    warm = timed(lambda: llm.generate(ids, one, media=[items[-1]]))[0]
    stats = llm.engine.encoder_cache.stats
    ids_t = torch.tensor([expanded])
    types = (ids_t == IMAGE).long()
    ref_prefill = min(timed(lambda i=i: ref(input_ids=ids_t, pixel_values=i.data.pixel_values, image_grid_thw=grid,
                                          mm_token_type_ids=types, logits_to_keep=1))[0] for i in items[1:])
    ours_prefill = min(cold[1:])
    print(f"Qwen2.5-VL vision tower depth {args.depth} (width 1280), float32, 448x448 image: grid {items[0].data.grid}, "
          f"{n} image tokens; prompt {len(expanded)} tokens; {torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"\n{'':34}{'vision encoder s':>18}{'prefill s':>12}{'prefill tok/s':>15}")
    print(f"{'qwenkit engine (new image)':34}{ours_vision:>18.3f}{ours_prefill:>12.3f}{len(expanded) / ours_prefill:>15.1f}")
    print(f"{'transformers forward':34}{ref_vision:>18.3f}{ref_prefill:>12.3f}{len(expanded) / ref_prefill:>15.1f}")
    print(f"{'qwenkit engine (same image again)':34}{'cached':>18}{warm:>12.3f}{'':>15}")
    print(f"\nencoder cache: {stats.misses} encoded, {stats.hits} reused; prefix cache hit tokens "
          f"{llm.engine.block_manager.stats.hit_tokens}")


if __name__ == "__main__":
    main()
