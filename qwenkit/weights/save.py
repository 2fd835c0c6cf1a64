"""Write a model as an HF-style directory: config.json, model.safetensors, tokenizer and generation
config; float, or with weight-only quantized codes (the layout quantization/checkpoint.py reads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenkit.errors import QwenkitError
from qwenkit.quantization.checkpoint import QUANT_METHOD, pack_nibbles
from qwenkit.quantization.linear import quantize_int4, quantize_int8
from qwenkit.quantization.quantize import eligible_linears


def model_tensors(loaded, skip_modules: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The model's float tensors by checkpoint name, the tied lm_head left out as HF does."""
    tensors = {}
    for key, value in loaded.model.state_dict().items():
        if key.rpartition(".")[0] in skip_modules or (key == "lm_head.weight" and loaded.config.tie_word_embeddings):
            continue
        tensors[key] = value.detach().contiguous()
    return tensors


def save_hf_checkpoint(loaded, out_dir: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = loaded.config.to_hf_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(loaded, out_dir)


def save_tokenizer(loaded, out_dir: Path) -> None:
    tok = loaded.tokenizer
    tok.backend.save(str(out_dir / "tokenizer.json"))
    config = {**tok.special_tokens, "add_bos_token": tok.add_bos_token}
    if tok.has_chat_template:
        config["chat_template"] = tok.chat_template.source
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    generation = dict(loaded.generation_config)
    generation.setdefault("eos_token_id", sorted(tok.stop_token_ids))
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def save_quantized(loaded, out_dir: Path, bits: int, group_size: int) -> None:
    """Write `loaded` (a float model with its tokenizer) as a quantized HF-style directory."""
    mode = {4: "int4", 8: "int8"}.get(bits)
    if mode is None:
        raise QwenkitError(f"--bits must be 4 or 8, got {bits}")
    model = loaded.model
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, linear, group in eligible_linears(model, mode, group_size):
        weight = linear.weight.detach().float()
        if group is None:
            q, scale = quantize_int8(weight)
            tensors.update({f"{name}.qweight": q, f"{name}.scales": scale})
        else:
            q, scale, zero = quantize_int4(weight, group)
            tensors.update({f"{name}.qweight": pack_nibbles(q), f"{name}.scales": scale, f"{name}.zeros": zero})
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().float()
        quantized.add(name)
    tensors.update(model_tensors(loaded, quantized))
    save_hf_checkpoint(loaded, out_dir, tensors, {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size})
