"""One 448x448 image through a random Qwen2.5-VL with the real vision tower's dimensions
(Qwen2.5-VL-3B: 32 blocks of width 1280, windows of 112 px, full attention in blocks 7/15/23/31)
and a 2-layer language model of the real width: vision-encoder time and prefill tok/s, qwenkit
beside transformers (sdpa attention) on the same weights, same pixels, same run.

    python benchmarks/vision_vs_transformers.py [--depth 32] [--repeats 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import transformers
from PIL import Image

from qwenkit.config import ModelConfig
from qwenkit.model.attention import NoCache
from qwenkit.model.mrope import VisionItem, mrope_positions
from qwenkit.model.qwen2_vl import Qwen2VLForConditionalGeneration
from qwenkit.multimodal.image import preprocess_image
from qwenkit.weights.loader import build_model
from qwenkit.model.media import checkpoint_name

IMAGE, VIDEO, VISION_START, VISION_END = 990, 991, 992, 993


def reference_model(depth: int, dtype: torch.dtype):
    text = dict(vocab_size=1000, hidden_size=2048, intermediate_size=11008, num_hidden_layers=2,
                num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048, num_heads=16,
                  window_size=112, fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth], tokens_per_second=2)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                           video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


def best_of(repeats: int, ours_fn, ref_fn) -> tuple[float, object, float, object]:
    """Best time and output of each, the two taking turns so that a busy machine slows both alike."""
    best, outs = [float("inf"), float("inf")], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ours_fn, ref_fn)):
            start = time.perf_counter()
            with torch.inference_mode():
                outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], outs[0], best[1], outs[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    ref = reference_model(args.depth, dtype)
    config = ModelConfig.from_hf_dict(ref.config.to_dict())
    # Same tensors, no copy: qwenkit's model is built from the reference's state dict.
    ours = build_model(Qwen2VLForConditionalGeneration, config, ((checkpoint_name(n), t) for n, t in ref.state_dict().items()), dtype)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    item = preprocess_image(image)
    ids = [5, 17, 250, VISION_START] + [IMAGE] * item.num_tokens + [VISION_END] + list(range(40, 60))
    ids_t = torch.tensor(ids)
    grid_t = torch.tensor([item.grid])
    mrope = mrope_positions(ids, [VisionItem(item.grid)], config.vision)
    order = torch.arange(len(ids))

    def ours_prefill():
        media = torch.cat(ours.encode_vision(item.pixel_values, [item.grid]))
        return ours.compute_logits(ours(ids_t, mrope.positions, NoCache(order), media)[-1:])

    def ref_prefill():
        types = (ids_t == IMAGE).long()[None]
        return ref(input_ids=ids_t[None], pixel_values=item.pixel_values, image_grid_thw=grid_t,
                   mm_token_type_ids=types, logits_to_keep=1).logits[0].float()

    ours_vision, ours_media, ref_vision, ref_media = best_of(
        args.repeats,
        lambda: ours.encode_vision(item.pixel_values, [item.grid])[0],
        lambda: ref.model.visual(item.pixel_values.to(dtype), grid_thw=grid_t).pooler_output,
    )
    ours_time, ours_logits, ref_time, ref_logits = best_of(args.repeats, ours_prefill, ref_prefill)

    print(f"Qwen2.5-VL vision tower depth {args.depth} (width 1280), {args.dtype}, 448x448 image: "
          f"grid {item.grid}, {item.pixel_values.shape[0]} patches -> {item.num_tokens} tokens; prompt {len(ids)} tokens; "
          f"{torch.get_num_threads()} threads")
    print(f"max |diff| vision output {(ours_media.float() - ref_media.float()).abs().max().item():.2e}, "
          f"last logits {(ours_logits - ref_logits).abs().max().item():.2e}")
    print(f"\n{'':28}{'vision encoder s':>18}{'prefill s':>12}{'prefill tok/s':>15}")
    print(f"{'qwenkit':28}{ours_vision:>18.3f}{ours_time:>12.3f}{len(ids) / ours_time:>15.1f}")
    print(f"{'transformers':28}{ref_vision:>18.3f}{ref_time:>12.3f}{len(ids) / ref_time:>15.1f}")
    print(f"{'ratio transformers/qwenkit':28}{ref_vision / ours_vision:>17.2f}x{ref_time / ours_time:>11.2f}x")


if __name__ == "__main__":
    main()
