"""One typed model configuration, read from an HF `config.json` or from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from qwenkit.errors import QwenkitError


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
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The fields every Qwen text family shares; whether qwenkit has the family is the model registry's call."""
        arch = str(d.get("model_type"))
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
