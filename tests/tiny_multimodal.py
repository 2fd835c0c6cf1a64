"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen2-Audio models built with transformers' own classes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

IMAGE, VIDEO, VISION_START, VISION_END, AUDIO = 290, 291, 292, 293, 294

TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    bos_token_id=None,
    eos_token_id=None,
)
# head_dim 16: M-RoPE splits its 8 frequency pairs 2 temporal, 3 height, 3 width.
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def vl_config(arch: str, depth: int = 2, window_size: int = 56) -> transformers.PretrainedConfig:
    """`depth` vision blocks (llama.cpp's converter maps the merger's `mlp.2` only when depth > 2);
    Qwen2.5-VL's full-attention blocks are every second one (released: every fourth), its windows
    `window_size` pixels (released: 112, which llama.cpp's mmproj files assume)."""
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    text = dict(TEXT, rope_parameters=dict(MROPE))
    if arch == "qwen2_vl":
        vision = dict(depth=depth, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    # window_size 56 px = 2x2 merged tokens per window; block 1 attends over the whole image.
    vision = dict(depth=depth, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4,
                  window_size=window_size, fullatt_block_indexes=list(range(1, depth, 2)), tokens_per_second=2)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def audio_config(layers: int = 2) -> transformers.PretrainedConfig:
    """`layers` encoder layers (llama.cpp's converter maps the second convolution only when layers > 2)."""
    return transformers.Qwen2AudioConfig(
        text_config=dict(TEXT, model_type="qwen2"),
        audio_config=dict(d_model=32, encoder_layers=layers, encoder_attention_heads=4, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        audio_token_index=AUDIO,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every part moves the logits, scaled by fan-in so nothing saturates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "embed_positions" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


MODEL_CLASSES = {
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    "qwen2_audio": transformers.Qwen2AudioForConditionalGeneration,
}


def save_tiny_multimodal(arch: str, directory: Path, config: transformers.PretrainedConfig | None = None) -> torch.nn.Module:
    """Save a tiny random model (of `config`, default the arch's tiny one); return the transformers
    reference (fp32, eager attention)."""
    if config is None:
        config = audio_config() if arch == "qwen2_audio" else vl_config(arch)
    model = MODEL_CLASSES[arch]._from_config(config, attn_implementation="eager").eval()
    randomize(model)
    model.save_pretrained(directory)
    return model


MEDIA_TOKENS = {IMAGE: "<|image_pad|>", VIDEO: "<|video_pad|>", VISION_START: "<|vision_start|>",
                VISION_END: "<|vision_end|>", AUDIO: "<|AUDIO|>"}


def tiny_multimodal_tokenizer():
    """tiny_tokenizer's byte-level BPE with the media tokens at the ids the tiny configs use
    (290-294), ChatML at 295-297 and <|audio_bos|> / <|audio_eos|> at 298-299; no chat template, so
    the loader supplies the released Qwen2-VL / Qwen2-Audio one."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    while len(vocab) < IMAGE:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    specials = [MEDIA_TOKENS[i] for i in sorted(MEDIA_TOKENS)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>"]
    for t in specials:
        vocab[t] = len(vocab)
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t != "<|endoftext|>"]})
    return tok


def save_tiny_multimodal_checkpoint(arch: str, directory: Path, config: transformers.PretrainedConfig | None = None) -> torch.nn.Module:
    """A loadable checkpoint (model, tokenizer, a small-budget preprocessor config); returns the reference."""
    import json

    ref = save_tiny_multimodal(arch, directory, config)
    tiny_multimodal_tokenizer().save_pretrained(directory)
    if arch == "qwen2_audio":
        processor = {"feature_size": 128, "sampling_rate": 16000, "feature_extractor_type": "WhisperFeatureExtractor"}
    else:  # a small budget keeps the tiny tests' images at tens of tokens
        processor = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64, "image_processor_type": "Qwen2VLImageProcessor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return ref
