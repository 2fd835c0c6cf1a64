"""llama.cpp's multimodal projector files (`mmproj` GGUF) for Qwen2-VL, Qwen2.5-VL and Qwen2-Audio.

llama.cpp ships a VL model as two GGUFs: the language model (architecture `qwen2vl`, its M-RoPE
split in `qwen2vl.rope.dimension_sections`) and the mmproj (architecture `clip`, projector type
`qwen2vl_merger` or `qwen2.5vl_merger`) holding the vision tower. `convert_hf_to_gguf.py --mmproj`
writes the tower with these changes from the HF checkpoint, undone here:
- the Conv3d patch embedding is cut into its two temporal slices (`v.patch_embd.weight` and
  `v.patch_embd.weight.1`, each [hidden, C, 14, 14]);
- each block's fused qkv projection is split into `attn_q` / `attn_k` / `attn_v`;
- names follow llama.cpp (`v.blk.N.ln1`, `attn_out`, `ffn_up`, `v.post_ln` for the merger's norm,
  `mm.0` / `mm.2` for its MLP).

What the file does not say takes llama.cpp's defaults (clip.cpp): a 2x2 spatial merge unless
`clip.vision.spatial_merge_size` says otherwise, Qwen2.5-VL's attention windows of 112 px unless
`clip.vision.window_size`, full attention in every `n_wa_pattern`-th block. The placeholder token
ids are the language model's `<|image_pad|>`, `<|video_pad|>` and `<|vision_start|>` tokens.
Qwen2.5-VL's video positions advance 2 per second as released.

Qwen2-Audio ships the same way: a plain `qwen2` language model and an mmproj of projector type
`qwen2a` holding the Whisper-style encoder (`a.conv1d.1` / `a.conv1d.2` with their biases stored as
[d_model, 1], `a.position_embd`, `a.blk.N.*`, `a.post_ln`) and its projector (`mm.a.fc`); the
converter stores the convolutions in f16 whatever the output type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace

import torch

from qwenkit.config import AudioConfig, ModelConfig, VisionConfig
from qwenkit.errors import QwenkitError
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.formats.gguf_tensors import check_supported, dequantized

PROJECTORS = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl", "qwen2a": "qwen2_audio"}
AUDIO_PLACEHOLDER = "<|AUDIO|>"
AUDIO_NORM_EPS = 1e-5  # Whisper's LayerNorm epsilon (qwenkit.model.qwen2_audio)
PLACEHOLDERS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>", "vision_start_token_id": "<|vision_start|>"}
# Qwen's image normalisation (OpenAI CLIP's), the one qwenkit.multimodal.image applies.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORM_EPS = 1e-6  # the vision tower's LayerNorm / RMSNorm epsilon (qwenkit.model.vision)

_GLOBAL_NAMES = {"v.post_ln": "visual.merger.ln_q", "mm.0": "visual.merger.mlp.0", "mm.2": "visual.merger.mlp.2"}
_BLOCK_NAMES = {"ln1": "norm1", "ln2": "norm2", "attn_out": "attn.proj"}
_FFN_NAMES = {  # llama.cpp's ffn parts -> the HF vision MLP's, per variant
    "qwen2_vl": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    "qwen2_5_vl": {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
}
_BLOCK_RE = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)$")
_AUDIO_GLOBAL_NAMES = {"a.conv1d.1": "audio_tower.conv1", "a.conv1d.2": "audio_tower.conv2", "a.position_embd": "audio_tower.embed_positions",
                       "a.post_ln": "audio_tower.layer_norm", "mm.a.fc": "multi_modal_projector.linear"}
_AUDIO_BLOCK_NAMES = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                      "attn_v": "self_attn.v_proj", "attn_out": "self_attn.out_proj", "ffn_up": "fc1", "ffn_down": "fc2"}
_AUDIO_BLOCK_RE = re.compile(r"a\.blk\.(\d+)\.(\w+)\.(weight|bias)$")
_PATCH = "v.patch_embd.weight"


def is_mmproj(gguf: GGUFFile) -> bool:
    return gguf.metadata.get("general.architecture") == "clip"


def mmproj_variant(mmproj: GGUFFile) -> str:
    """"qwen2_vl", "qwen2_5_vl" or "qwen2_audio" from the projector type; a clear error for any other projector."""
    if not is_mmproj(mmproj):
        raise QwenkitError(f"{mmproj.path} is not a multimodal projector (its architecture is "
                           f"{mmproj.metadata.get('general.architecture')!r}, an mmproj file's is 'clip')")
    projector = mmproj.metadata.get("clip.projector_type")
    if projector not in PROJECTORS:
        raise QwenkitError(f"{mmproj.path} holds a {projector!r} projector; qwenkit reads the Qwen2-VL and Qwen2.5-VL "
                           f"vision towers and Qwen2-Audio's encoder ({', '.join(PROJECTORS)})")
    variant = PROJECTORS[projector]
    encoder = "audio" if variant == "qwen2_audio" else "vision"
    if not mmproj.metadata.get(f"clip.has_{encoder}_encoder", False):
        raise QwenkitError(f"{mmproj.path} has no {encoder} encoder")
    return variant


def vision_config_from_mmproj(mmproj: GGUFFile, vocabulary: list[str]) -> VisionConfig:
    """The vision tower an mmproj file holds; `vocabulary` (the language model's tokens) gives the placeholder ids."""
    variant = mmproj_variant(mmproj)
    meta = mmproj.metadata
    try:
        return _vision_config(mmproj, variant, meta, vocabulary)
    except (TypeError, ValueError, KeyError) as exc:  # a crafted or broken header
        raise QwenkitError(f"{mmproj.path} has missing or mistyped clip.vision metadata ({type(exc).__name__}: {exc})") from exc


def _vision_config(mmproj: GGUFFile, variant: str, meta: dict, vocabulary: list[str]) -> VisionConfig:
    def get(key, default=None):
        value = meta.get(f"clip.vision.{key}", default)
        if value is None:
            raise KeyError(f"clip.vision.{key}")
        return value

    for key, expected in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        values = get(key, list(expected))
        if len(values) != 3 or any(not math.isclose(a, b, rel_tol=1e-5) for a, b in zip(values, expected)):
            raise QwenkitError(f"{mmproj.path} normalises images with {key} {list(values)}; Qwen's vision towers use {list(expected)}")
    eps = float(get("attention.layer_norm_epsilon", NORM_EPS))
    if not math.isclose(eps, NORM_EPS, rel_tol=1e-3):
        raise QwenkitError(f"{mmproj.path} has vision norm epsilon {eps}; Qwen's vision towers use {NORM_EPS}")
    ids = {}
    for field, token in PLACEHOLDERS.items():
        if token not in vocabulary:
            raise QwenkitError(f"the language model's vocabulary has no {token} token, so it cannot take {mmproj.path.name}'s images")
        ids[field] = vocabulary.index(token)
    if _PATCH not in mmproj.tensors or _PATCH + ".1" not in mmproj.tensors:
        raise QwenkitError(f"{mmproj.path} lacks the patch embedding's two temporal slices ({_PATCH}, {_PATCH}.1)")
    depth = int(get("block_count"))
    if meta.get("clip.use_gelu"):
        act = "gelu"
    else:
        act = "silu" if meta.get("clip.use_silu") else "quick_gelu"  # clip.cpp's choice of FFN activation
    common = dict(
        variant=variant,
        depth=depth,
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        num_heads=int(get("attention.head_count")),
        out_hidden_size=int(get("projection_dim")),
        hidden_act=act,
        patch_size=int(get("patch_size", 14)),
        spatial_merge_size=int(get("spatial_merge_size", 2)),
        in_channels=int(mmproj.tensors[_PATCH].shape[1]),
        **ids,
    )
    if variant == "qwen2_vl":
        return VisionConfig(**common)
    pattern = int(get("n_wa_pattern"))
    if pattern <= 0:
        raise ValueError(f"n_wa_pattern {pattern}")
    return VisionConfig(
        window_size=int(get("window_size", 112)),
        fullatt_block_indexes=tuple(range(pattern - 1, depth, pattern)),
        tokens_per_second=2.0,
        **common,
    )


def gguf_mrope_section(gguf: GGUFFile) -> tuple[int, ...]:
    """A `qwen2vl` language model's M-RoPE split (temporal, height, width frequency pairs)."""
    arch = gguf.metadata.get("general.architecture")
    sections = gguf.metadata.get(f"{arch}.rope.dimension_sections")
    if arch != "qwen2vl" or not sections:
        raise QwenkitError(f"{gguf.path} is a {arch!r} language model; an mmproj vision tower needs a 'qwen2vl' one "
                           "(with rope.dimension_sections)")
    return tuple(int(n) for n in sections if n)


def audio_config_from_mmproj(mmproj: GGUFFile, vocabulary: list[str]) -> AudioConfig:
    """Qwen2-Audio's encoder as an mmproj file holds it; `vocabulary` gives the <|AUDIO|> placeholder id."""
    meta = mmproj.metadata
    if AUDIO_PLACEHOLDER not in vocabulary:
        raise QwenkitError(f"the language model's vocabulary has no {AUDIO_PLACEHOLDER} token, so it cannot take {mmproj.path.name}'s audio")
    try:
        eps = float(meta.get("clip.audio.attention.layer_norm_epsilon", AUDIO_NORM_EPS))
        if not math.isclose(eps, AUDIO_NORM_EPS, rel_tol=1e-3):
            raise QwenkitError(f"{mmproj.path} has audio norm epsilon {eps}; Qwen2-Audio's encoder uses {AUDIO_NORM_EPS}")
        positions = mmproj.tensors["a.position_embd.weight"].shape[0]
        return AudioConfig(
            num_mel_bins=int(meta["clip.audio.num_mel_bins"]),
            d_model=int(meta["clip.audio.embedding_length"]),
            encoder_layers=int(meta["clip.audio.block_count"]),
            encoder_attention_heads=int(meta["clip.audio.attention.head_count"]),
            encoder_ffn_dim=int(meta["clip.audio.feed_forward_length"]),
            max_source_positions=int(positions),
            audio_token_id=vocabulary.index(AUDIO_PLACEHOLDER),
        )
    except (TypeError, ValueError, KeyError) as exc:  # a crafted or broken header
        raise QwenkitError(f"{mmproj.path} has missing or mistyped clip.audio metadata ({type(exc).__name__}: {exc})") from exc


def media_model_config(text: ModelConfig, lm: GGUFFile, mmproj: GGUFFile, vocabulary: list[str]) -> ModelConfig:
    """The multimodal configuration of a language model GGUF plus its mmproj: Qwen2-VL / Qwen2.5-VL
    (a `qwen2vl` language model) or Qwen2-Audio (a `qwen2` one)."""
    if mmproj_variant(mmproj) == "qwen2_audio":
        audio = audio_config_from_mmproj(mmproj, vocabulary)
        arch = lm.metadata.get("general.architecture")
        if arch != "qwen2":
            raise QwenkitError(f"{lm.path} is a {arch!r} language model; Qwen2-Audio's encoder goes with a 'qwen2' one")
        projector = mmproj.tensors.get("mm.a.fc.weight")
        width = None if projector is None else projector.shape[0]
        if width != text.hidden_size:
            raise QwenkitError(f"{mmproj.path} projects audio to {width} values per token but the language model's "
                               f"hidden size is {text.hidden_size}: the two files are not of one model")
        return replace(text, model_type="qwen2_audio", audio=audio)
    vision = vision_config_from_mmproj(mmproj, vocabulary)
    mrope = gguf_mrope_section(lm)
    if sum(mrope) != text.head_dim // 2:
        raise QwenkitError(f"{lm.path}'s rope.dimension_sections {list(mrope)} must sum to head_dim / 2 = {text.head_dim // 2}")
    if vision.out_hidden_size != text.hidden_size:
        raise QwenkitError(f"{mmproj.path} projects images to {vision.out_hidden_size} values per token but the language "
                           f"model's hidden size is {text.hidden_size}: the two files are not of one model")
    return replace(text, model_type=vision.variant, vision=vision, mrope_section=mrope)


def iter_mmproj_tensors(mmproj: GGUFFile, variant: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(qwenkit name, float32 tensor) of the encoder, in the HF layout."""
    for tensor in mmproj.tensors.values():
        check_supported(tensor)
    if variant == "qwen2_audio":
        yield from _audio_tensors(mmproj)
        return
    ffn = _FFN_NAMES[variant]
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> q/k/v parts
    for tensor in mmproj.tensors.values():
        name = tensor.name
        if name == _PATCH + ".1":
            continue
        if name == _PATCH:  # [hidden, C, 14, 14] twice -> the Conv3d's [hidden, C, 2, 14, 14]
            slices = (_floats(mmproj, tensor), _floats(mmproj, mmproj.tensors[_PATCH + ".1"]))
            yield "visual.patch_embed.proj.weight", torch.stack(slices, dim=2)
            continue
        stem, _, kind = name.rpartition(".")
        if stem in _GLOBAL_NAMES:
            yield f"{_GLOBAL_NAMES[stem]}.{kind}", _floats(mmproj, tensor)
            continue
        m = _BLOCK_RE.match(name)
        if m is None:
            raise QwenkitError(f"mmproj tensor {name!r} has no place in a {variant} vision tower")
        block, part, kind = m.groups()
        prefix = f"visual.blocks.{block}"
        if part in ("attn_q", "attn_k", "attn_v"):
            parts = pending.setdefault((block, kind), {})
            parts[part] = _floats(mmproj, tensor)
            if len(parts) == 3:  # the HF layout's fused projection: q rows, then k, then v
                yield f"{prefix}.attn.qkv.{kind}", torch.cat([parts["attn_q"], parts["attn_k"], parts["attn_v"]])
                del pending[(block, kind)]
            continue
        hf = _BLOCK_NAMES.get(part) or ffn.get(part)
        if hf is None:
            raise QwenkitError(f"mmproj tensor {name!r} has no place in a {variant} vision tower")
        yield f"{prefix}.{hf}.{kind}", _floats(mmproj, tensor)
    if pending:
        (block, kind), parts = next(iter(pending.items()))
        raise QwenkitError(f"{mmproj.path} has an incomplete attention projection in block {block}: only {', '.join(sorted(parts))} {kind}")


def _floats(mmproj: GGUFFile, tensor) -> torch.Tensor:
    """A tensor's float32 copy; the file's pages of it are let go (the copy is what the model keeps)."""
    values = dequantized(mmproj, tensor)
    mmproj.release(tensor)
    return values


def _audio_tensors(mmproj: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in mmproj.tensors.values():
        name = tensor.name
        stem, _, kind = name.rpartition(".")
        values = _floats(mmproj, tensor)
        if stem in _AUDIO_GLOBAL_NAMES:
            if stem.startswith("a.conv1d.") and kind == "bias":
                values = values.reshape(-1)  # stored [d_model, 1] for ggml's broadcast
            yield f"{_AUDIO_GLOBAL_NAMES[stem]}.{kind}", values
            continue
        m = _AUDIO_BLOCK_RE.match(name)
        if m is None or m.group(2) not in _AUDIO_BLOCK_NAMES:
            raise QwenkitError(f"mmproj tensor {name!r} has no place in Qwen2-Audio's encoder")
        block, part, kind = m.groups()
        yield f"audio_tower.layers.{block}.{_AUDIO_BLOCK_NAMES[part]}.{kind}", values
