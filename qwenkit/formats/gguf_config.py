"""A model configuration from a GGUF file's metadata (llama.cpp's key names)."""

from __future__ import annotations

from qwenkit.config import ModelConfig, RopeConfig
from qwenkit.errors import QwenkitError
from qwenkit.formats.gguf_reader import GGUFFile

# GGUF architecture name -> HF model_type
# `qwen2vl` is the language model of Qwen2-VL / Qwen2.5-VL: a Qwen2 whose M-RoPE reduces to 1-D
# rotary positions on text; with its mmproj file it becomes the VL model (formats/gguf_mmproj.py).
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "qwen2vl": "qwen2"}


def gguf_architecture(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch == "clip":
        raise QwenkitError(f"{gguf.path} is a multimodal projector (mmproj), not a language model: load the model's "
                           "GGUF and pass this file as --mmproj (Python: mmproj=)")
    if arch not in GGUF_ARCHITECTURES:
        raise QwenkitError(
            f"unsupported architecture {arch!r} in GGUF metadata; qwenkit supports {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    arch = gguf_architecture(gguf)
    try:
        return _config_from_metadata(gguf, arch)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:  # a crafted or broken header
        raise QwenkitError(f"{gguf.path} has missing or mistyped {arch} metadata ({type(exc).__name__}: {exc})") from exc


def _config_from_metadata(gguf: GGUFFile, arch: str) -> ModelConfig:
    model_type = GGUF_ARCHITECTURES[arch]

    def get(key, default=None):
        return gguf.metadata.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = gguf.tensors.keys()
    if "token_embd.weight" not in names:
        raise QwenkitError(f"{gguf.path} has no token_embd.weight tensor")
    scaling = get("rope.scaling.type", "none")
    rope = RopeConfig(theta=float(get("rope.freq_base", 10000.0)))
    if scaling in ("yarn", "linear"):
        rope = RopeConfig(
            theta=rope.theta,
            rope_type=scaling,
            factor=float(get("rope.scaling.factor", 1.0)),
            original_max_position_embeddings=get("rope.scaling.original_context_length"),
            beta_fast=get("rope.scaling.yarn_beta_fast"),
            beta_slow=get("rope.scaling.yarn_beta_slow"),
        )
    is_moe = model_type.endswith("_moe")
    layers = int(get("block_count"))
    # GGUF has no mlp_only_layers key: a layer is sparse exactly when it has a router tensor.
    dense_layers = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names) if is_moe else ()
    return ModelConfig(
        model_type=model_type,
        vocab_size=gguf.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", 0)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 32768)),
        tie_word_embeddings="output.weight" not in names,
        rope=rope,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        num_experts=int(get("expert_count", 0)) if is_moe else 0,
        num_experts_per_tok=int(get("expert_used_count", 0)),
        moe_intermediate_size=int(get("expert_feed_forward_length", 0)),
        shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0)),
        mlp_only_layers=dense_layers,
        # llama.cpp renormalises the top-k weights for Qwen3-MoE and not for Qwen2-MoE.
        norm_topk_prob=bool(get("expert_weights_norm", model_type == "qwen3_moe")),
    )
