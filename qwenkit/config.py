"""One typed model configuration, read from an HF `config.json` or from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from qwenkit.errors import QwenkitError

# Multimodal checkpoints: a Qwen2 language model plus a vision or audio encoder (their own sub-configs).
MULTIMODAL_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen2_audio")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower of Qwen2-VL (variant "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl"), and its placeholder tokens."""

    variant: str
    depth: int
    hidden_size: int  # width of the vision blocks (Qwen2-VL's config calls it embed_dim)
    intermediate_size: int  # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    num_heads: int
    out_hidden_size: int  # what the patch merger emits: the language model's hidden size
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    hidden_act: str = "quick_gelu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    # Qwen2.5-VL: blocks not listed in fullatt_block_indexes attend within windows of window_size pixels.
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen2.5-VL: video temporal positions advance tokens_per_second per second of video (Qwen2-VL: 1 per grid step).
    tokens_per_second: float | None = None


@dataclass(frozen=True)
class AudioConfig:
    """Qwen2-Audio's Whisper-style encoder and its placeholder token."""

    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    max_source_positions: int
    audio_token_id: int
    activation_function: str = "gelu"
    scale_embedding: bool = False


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # config.json's model_type ("qwen2", "qwen3_moe", ...): picks the model family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2 family)
    qk_norm: bool  # RMSNorm on q and k per head before RoPE (Qwen3 family)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # Mixture of experts; num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Multimodal models only: the encoders, and M-RoPE's split of the rotary frequencies into
    # temporal/height/width sections (sums to head_dim // 2; empty for 1-D rotary positions).
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    mrope_section: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def context_length(self) -> int:
        """Tokens of context the model's positions reach: a YaRN or linear scaling multiplies the
        original context by its factor (Qwen's recipe keeps max_position_embeddings at the original
        32,768 and adds rope_scaling with factor 4 for 131,072), as vLLM derives max_model_len."""
        if self.rope.rope_type in ("yarn", "linear") and self.rope.factor > 1:
            original = self.rope.original_max_position_embeddings or self.max_position_embeddings
            return max(int(original * self.rope.factor), self.max_position_embeddings)
        return self.max_position_embeddings

    def with_rope_scaling(self, scaling: dict[str, Any] | str) -> "ModelConfig":
        """This configuration with `scaling` (a dict or its JSON, HF's rope_scaling keys) replacing the
        rope scaling; the rope theta stays the model's, the original context defaults to its own."""
        if isinstance(scaling, str):
            try:
                scaling = json.loads(scaling)
            except json.JSONDecodeError as exc:
                raise QwenkitError(f"--rope-scaling is not valid JSON ({exc.msg}): {scaling!r}") from None
        if not isinstance(scaling, dict):
            raise QwenkitError(f"rope scaling must be a JSON object such as {{\"rope_type\":\"yarn\",\"factor\":4.0}}, not {scaling!r}")
        params = {"rope_theta": self.rope.theta, **scaling}
        if params.get("factor") is None and (params.get("rope_type") or params.get("type")) in ("yarn", "linear"):
            raise QwenkitError("rope scaling of type yarn or linear needs a factor, e.g. {\"rope_type\":\"yarn\",\"factor\":4.0}")
        rope = _rope_from_hf({"rope_scaling": params, "max_position_embeddings": self.max_position_embeddings})
        if rope.factor <= 0:
            raise QwenkitError(f"rope scaling factor must be positive, not {rope.factor}")
        return replace(self, rope=rope)

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def uses_sliding_window(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that from_hf_dict (and transformers) read back as this configuration."""
        rope = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type != "default":
            rope["factor"] = self.rope.factor
            for key in ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self.rope, key) is not None:
                    rope[key] = getattr(self.rope, key)
            rope["truncate"] = self.rope.truncate
        d: dict[str, Any] = {
            "model_type": self.model_type,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "qkv_bias": self.attention_bias,
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types) or None,
            **self.extra,
        }
        if self.is_moe:
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
            )
        if self.model_type not in MULTIMODAL_ARCHITECTURES:
            return d
        # transformers 5's layout: the language model's fields in text_config, each encoder in its own.
        if self.mrope_section:
            rope["mrope_section"] = list(self.mrope_section)
        d["model_type"] = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text"}.get(self.model_type, "qwen2")
        d = {"model_type": self.model_type, "tie_word_embeddings": self.tie_word_embeddings, "text_config": d}
        if self.vision is not None:
            d.update(_vision_to_hf(self.vision))
        if self.audio is not None:
            d["audio_token_index"] = self.audio.audio_token_id
            d["audio_config"] = {
                "model_type": "qwen2_audio_encoder",
                **{k: getattr(self.audio, k) for k in (
                    "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                    "max_source_positions", "activation_function", "scale_embedding")},
            }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The fields every Qwen text family shares; whether qwenkit has the family is the model registry's call."""
        arch = str(d.get("model_type"))
        if arch in MULTIMODAL_ARCHITECTURES:
            return _multimodal_from_hf(d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise QwenkitError(f"unsupported activation {act!r}; Qwen models use 'silu'")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            head_dim = int(d.get("head_dim") or hidden // heads)
            is_moe = arch.endswith("_moe")
            use_sliding = bool(d.get("use_sliding_window", False))
            return cls(
                model_type=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d.get("intermediate_size") or 0),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                rope=_rope_from_hf(d),
                attention_bias=_attention_bias(arch, d),
                qk_norm=arch.startswith("qwen3"),
                sliding_window=int(d["sliding_window"]) if use_sliding and d.get("sliding_window") else None,
                layer_types=_layer_types(d, use_sliding),
                # Released Qwen MoE configs say num_experts; transformers 5 writes num_local_experts.
                num_experts=int(d.get("num_experts") or d.get("num_local_experts") or 0) if is_moe else 0,
                num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
                moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
                shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
                mlp_only_layers=tuple(int(i) for i in (d.get("mlp_only_layers") or ())),
                extra={k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in d},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QwenkitError(f"config.json is missing or has a bad value for {exc}") from exc


def _attention_bias(arch: str, d: dict[str, Any]) -> bool:
    if arch == "qwen2":
        return True  # Qwen2 always has q/k/v bias; the config does not say so
    if arch == "qwen2_moe":
        return bool(d.get("qkv_bias", True))
    return bool(d.get("attention_bias", False))


def _layer_types(d: dict[str, Any], use_sliding: bool) -> tuple[str, ...]:
    if not use_sliding:
        return ()
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    # Older Qwen2 configs: layers from max_window_layers on use the sliding window.
    n, start = int(d["num_hidden_layers"]), int(d.get("max_window_layers", 0))
    return tuple("sliding_attention" if i >= start else "full_attention" for i in range(n))


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older configs write rope_theta + rope_scaling.
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "mrope":  # older Qwen2-VL configs: plain rotary frequencies, split by mrope_section
        rope_type = "default"
    if rope_type not in ("default", "linear", "yarn"):
        raise QwenkitError(f"unsupported rope type {rope_type!r}; qwenkit supports default, linear and yarn")
    orig = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and orig is None:
        orig = d.get("original_max_position_embeddings") or d.get("max_position_embeddings", 32768)
    factor = params.get("factor", 1.0)
    if factor is None and orig:
        factor = d.get("max_position_embeddings", 32768) / orig
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(orig) if orig else None,
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


# transformers' Qwen2Config defaults: released Qwen2-Audio configs list only what differs from them.
_QWEN2_TEXT_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}


def _multimodal_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Qwen2-VL, Qwen2.5-VL, Qwen2-Audio: the Qwen2 language model's config plus the encoder's.

    transformers 5 nests the language model's fields in text_config; released Qwen2-VL configs keep
    them at the top level. Either way the text model is a Qwen2 (q/k/v bias, no QK-norm).
    """
    arch = d["model_type"]
    sub = ("text_config", "vision_config", "audio_config")
    text = {k: v for k, v in d.items() if k not in sub}
    if arch == "qwen2_audio":
        text = {**_QWEN2_TEXT_DEFAULTS, **text}
    text.update(d.get("text_config") or {})
    text["model_type"] = "qwen2"
    base = ModelConfig.from_hf_dict(text)
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    mrope_section = tuple(int(n) for n in params.get("mrope_section") or ())
    try:
        vision = _vision_from_hf(arch, d["vision_config"], d) if arch != "qwen2_audio" else None
        audio = _audio_from_hf(d["audio_config"], d) if arch == "qwen2_audio" else None
    except (KeyError, TypeError, ValueError) as exc:
        raise QwenkitError(f"config.json is missing or has a bad value for {exc} in its encoder config") from exc
    if vision is not None and sum(mrope_section) != base.head_dim // 2:
        raise QwenkitError(f"mrope_section {list(mrope_section)} must sum to head_dim / 2 = {base.head_dim // 2}")
    return replace(base, model_type=arch, vision=vision, audio=audio, mrope_section=mrope_section)


def _vision_from_hf(arch: str, v: dict[str, Any], d: dict[str, Any]) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    common = dict(
        variant=arch,
        depth=int(v["depth"]),
        num_heads=int(v["num_heads"]),
        image_token_id=int(d["image_token_id"]),
        video_token_id=int(d["video_token_id"]),
        vision_start_token_id=int(d["vision_start_token_id"]),
        hidden_act=v.get("hidden_act", "quick_gelu" if arch == "qwen2_vl" else "silu"),
        # Released configs say spatial_patch_size and in_chans; transformers 5 writes patch_size and in_channels.
        patch_size=int(v.get("patch_size") or v.get("spatial_patch_size") or 14),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        in_channels=int(v.get("in_channels") or v.get("in_chans") or 3),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    if arch == "qwen2_vl":
        embed_dim = int(v["embed_dim"])
        return VisionConfig(
            hidden_size=embed_dim,
            intermediate_size=int(embed_dim * float(v.get("mlp_ratio", 4))),
            out_hidden_size=int(v["hidden_size"]),  # Qwen2-VL: "hidden_size" is the merger's output
            **common,
        )
    return VisionConfig(
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        out_hidden_size=int(v["out_hidden_size"]),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes") or ()),
        tokens_per_second=float(v.get("tokens_per_second", 2)),
        **common,
    )


def _whole(x: float) -> float | int:
    """transformers' strict configs want an int where the value is whole (mlp_ratio, tokens_per_second)."""
    return int(x) if float(x).is_integer() else x


def _vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    """The released layout: token ids at the top level, the tower in vision_config."""
    vision: dict[str, Any] = {
        "depth": v.depth, "num_heads": v.num_heads, "hidden_act": v.hidden_act, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "in_channels": v.in_channels, "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    if v.variant == "qwen2_vl":
        vision.update(embed_dim=v.hidden_size, mlp_ratio=_whole(v.intermediate_size / v.hidden_size), hidden_size=v.out_hidden_size)
    else:
        vision.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                      window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                      tokens_per_second=_whole(v.tokens_per_second))
    return {
        "image_token_id": v.image_token_id, "video_token_id": v.video_token_id,
        "vision_start_token_id": v.vision_start_token_id, "vision_config": vision,
    }


def _audio_from_hf(a: dict[str, Any], d: dict[str, Any]) -> AudioConfig:
    return AudioConfig(
        num_mel_bins=int(a.get("num_mel_bins", 128)),
        d_model=int(a["d_model"]),
        encoder_layers=int(a["encoder_layers"]),
        encoder_attention_heads=int(a["encoder_attention_heads"]),
        encoder_ffn_dim=int(a["encoder_ffn_dim"]),
        max_source_positions=int(a.get("max_source_positions", 1500)),
        audio_token_id=int(d.get("audio_token_index", d.get("audio_token_id", 151646))),
        activation_function=a.get("activation_function", "gelu"),
        scale_embedding=bool(a.get("scale_embedding", False)),
    )
