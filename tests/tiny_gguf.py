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


def choose_type(llama_name: str, shape, embedding_type: Q = Q.F16) -> Q:
    if len(shape) == 1:
        return Q.F32
    if llama_name == "token_embd.weight":
        return embedding_type
    if llama_name == "output.weight":
        return Q.BF16
    if "exps" in llama_name:
        return Q.Q4_0
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


def write_tiny_gguf(model: torch.nn.Module, path: Path, tokenizer=None, embedding_type: Q = Q.F16, split_max_tensors: int = 0) -> None:
    """Write `model` to `path` and overwrite its weights with what the file holds after quantization.

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
        kind = choose_type(name, value.shape, embedding_type)
        if kind == Q.F32:
            w.add_tensor(name, value.astype(np.float32))
            stored[name] = value.astype(np.float32)
        elif kind == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
            stored[name] = value.astype(np.float16).astype(np.float32)
        else:
            data = quantize(value.astype(np.float32), kind)
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
