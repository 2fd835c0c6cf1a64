"""Write a tiny transformers model as a GGUF file the way llama.cpp's converter lays it out.

The tensor names and metadata keys here are llama.cpp's (convert_hf_to_gguf.py / gguf constants),
written out independently of qwenkit's reader. Quantized tensors are quantized with the gguf
package, and the reference model gets the dequantized values, so both sides hold the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize, quantize

GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
LLAMA_CPP_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
Q = gguf.GGMLQuantizationType


_EXPERT_PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
K_QUANTS = (Q.Q4_K, Q.Q6_K)  # what _k_quantize writes


def choose_type(llama_name: str, shape, embedding_type: Q = Q.F16, expert_types: tuple[Q, Q, Q] | None = None) -> Q:
    if len(shape) == 1:
        return Q.F32
    if llama_name == "token_embd.weight":
        return embedding_type
    if llama_name == "output.weight":
        return Q.BF16
    if "exps" in llama_name:
        return expert_types[_EXPERT_PARTS.index(llama_name.split(".")[2])] if expert_types else Q.Q4_0
    if "attn" in llama_name:
        return Q.Q8_0
    if "ffn_gate_inp" in llama_name:  # routers stay F32, as llama.cpp keeps them
        return Q.F32
    return Q.Q5_0


def llama_cpp_tensors(model: torch.nn.Module, num_layers: int, num_experts: int) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        for hf, short in LLAMA_CPP_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{hf}.{kind}"
                if key in sd:
                    value = sd[key].reshape(-1) if short == "ffn_gate_inp_shexp" else sd[key]
                    out[f"blk.{i}.{short}.{kind}"] = value
        # transformers 5 holds experts fused in memory: gate_up_proj [E, 2I, H], down_proj [E, H, I].
        if f"{prefix}mlp.experts.gate_up_proj" in sd:
            gate, up = np.split(sd[f"{prefix}mlp.experts.gate_up_proj"], 2, axis=1)
            out[f"blk.{i}.ffn_gate_exps.weight"] = gate
            out[f"blk.{i}.ffn_up_exps.weight"] = up
            out[f"blk.{i}.ffn_down_exps.weight"] = sd[f"{prefix}mlp.experts.down_proj"]
    return out


def write_tiny_gguf(
    model: torch.nn.Module,
    path: Path,
    tokenizer=None,
    embedding_type: Q = Q.F16,
    split_max_tensors: int = 0,
    expert_types: tuple[Q, Q, Q] | None = None,
) -> None:
    """Write `model` to `path` and overwrite its weights with what the file holds after quantization.

    `expert_types`: the (gate, up, down) expert tensors' types (default Q4_0); Q4_K and Q6_K need
    rows of a multiple of 256 values.
    `split_max_tensors` > 0 writes llama.cpp's split layout (gguf-split: PATH-00001-of-0000N.gguf ...)."""
    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    num_experts = getattr(cfg, "num_experts", 0) if cfg.model_type.endswith("moe") else 0
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    if cfg.rope_parameters.get("rope_type") == "yarn":
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", cfg.rope_parameters["factor"])
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", cfg.rope_parameters["original_max_position_embeddings"])
    if num_experts:
        w.add_uint32(f"{arch}.expert_count", num_experts)
        w.add_uint32(f"{arch}.expert_used_count", cfg.num_experts_per_tok)
        w.add_uint32(f"{arch}.expert_feed_forward_length", cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_uint32(f"{arch}.expert_shared_feed_forward_length", cfg.shared_expert_intermediate_size)
    if tokenizer is not None:
        add_tokenizer(w, tokenizer)

    stored = {}
    for name, value in llama_cpp_tensors(model, cfg.num_hidden_layers, num_experts).items():
        kind = choose_type(name, value.shape, embedding_type, expert_types)
        if kind == Q.F32:
            w.add_tensor(name, value.astype(np.float32))
            stored[name] = value.astype(np.float32)
        elif kind == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
            stored[name] = value.astype(np.float16).astype(np.float32)
        else:
            data = _k_quantize(value, kind) if kind in K_QUANTS else quantize(value.astype(np.float32), kind)
            w.add_tensor(name, data, raw_dtype=kind)
            stored[name] = dequantize(data, kind).reshape(value.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The reference now holds exactly the file's values.
    back = {v: k for k, v in LLAMA_CPP_NAMES.items()}
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in stored.items():
            t = torch.from_numpy(np.array(value))
            if name == "token_embd.weight":
                params["model.embed_tokens.weight"].copy_(t)
            elif name == "output_norm.weight":
                params["model.norm.weight"].copy_(t)
            elif name == "output.weight":
                params["lm_head.weight"].copy_(t)
            else:
                _, i, short, kind = name.split(".")
                if short.endswith("_exps"):
                    experts = f"model.layers.{i}.mlp.experts."
                    inter = t.shape[1]
                    if short == "ffn_gate_exps":
                        params[experts + "gate_up_proj"][:, :inter].copy_(t)
                    elif short == "ffn_up_exps":
                        params[experts + "gate_up_proj"][:, inter:].copy_(t)
                    else:
                        params[experts + "down_proj"].copy_(t)
                else:
                    p = params[f"model.layers.{i}.{back[short]}.{kind}"]
                    p.copy_(t.reshape(p.shape))


def _k_quantize(values: np.ndarray, kind: Q) -> np.ndarray:
    """Q4_K / Q6_K blocks of float32 values [..., columns] (the gguf package only decodes K-quants):
    a plain min/max fit per sub-block, not llama.cpp's search, laid out as ggml-common.h's
    block_q4_K / block_q6_K so any reader decodes them."""
    shape = values.shape
    x = values.astype(np.float32).reshape(-1, 256)
    if kind == Q.Q4_K:
        blocks = _q4_k(x.reshape(-1, 8, 32))
    elif kind == Q.Q6_K:
        blocks = _q6_k(x.reshape(-1, 16, 16))
    else:
        raise ValueError(kind)
    return blocks.reshape(*shape[:-1], -1)


def _q4_k(x: np.ndarray) -> np.ndarray:  # x [blocks, 8 sub-blocks, 32]: value = d * sc * q - dmin * m
    low = np.minimum(x.min(-1), 0)
    scale, minimum = (x.max(-1) - low) / 15, -low
    d = np.maximum(scale.max(-1, keepdims=True), 1e-12) / 63
    dmin = np.maximum(minimum.max(-1, keepdims=True), 1e-12) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d), 1, 63).astype(np.uint8)
    m = np.clip(np.round(minimum / dmin), 0, 63).astype(np.uint8)
    q = np.clip(np.round((x + (dmin * m)[..., None]) / (d * sc)[..., None]), 0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)  # 6-bit sc and m, packed as get_scale_min_k4 reads them
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # 64-value chunk c: sub-block 2c low, 2c+1 high
    return np.concatenate([d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), scales, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:  # x [blocks, 16 sub-blocks, 16]: value = d * sc * (q - 32)
    scale = np.abs(x).max(-1) / 31
    d = (np.maximum(scale.max(-1, keepdims=True), 1e-12) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d), 1, 127).astype(np.int8)
    q = (np.clip(np.round(x / (d * sc)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # Each 128-value half: ql holds low nibbles of its quarters (0|2 <<4, 1|3 <<4), qh their top 2 bits.
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4), q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.astype(np.float16).view(np.uint8)], axis=1)


def add_tokenizer(w: gguf.GGUFWriter, tokenizer) -> None:
    """The tokenizer keys llama.cpp writes for a Qwen2 byte-level BPE vocabulary."""
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    types = [3 if t in special else 1 for t in tokens]  # 3 = control, 1 = normal
    merges = [" ".join(m) for m in tokenizer.backend_tokenizer.model.get_merges()] if hasattr(
        tokenizer.backend_tokenizer.model, "get_merges") else _merges_from_json(tokenizer)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab[tokenizer.eos_token])
    w.add_uint32("tokenizer.ggml.padding_token_id", vocab[tokenizer.pad_token])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    if tokenizer.chat_template:
        w.add_string("tokenizer.chat_template", tokenizer.chat_template)


def _merges_from_json(tokenizer) -> list[str]:
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
