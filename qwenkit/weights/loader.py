"""Load any supported checkpoint into a QwenForCausalLM plus its tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.qwen import QwenForCausalLM
from qwenkit.quantization.quantize import replace_module
from qwenkit.tokenizer.tokenizer import Tokenizer
from qwenkit.weights.gguf_file import config_from_gguf, gguf_block_layers, int4_layers_from_q4_k, iter_gguf_tensors, open_gguf
from qwenkit.weights.resolve import ResolvedModel, resolve_model
from qwenkit.weights.safetensors_dir import iter_safetensors, read_hf_config, read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A GGUF carries no generation config; these are llama.cpp's sampling defaults, which GGUF users expect.
GGUF_GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}

_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


@dataclass
class LoadedModel:
    model: QwenForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    generation_config: dict[str, Any] = field(default_factory=dict)


QUANTIZE_CHOICES = ("auto", "gguf", "int8", "int4")


def load_model(
    spec: str | None = None, dtype: str | None = None, quantize: str | None = "auto", group_size: int = 128
) -> LoadedModel:
    """Load `spec` (a directory, a .gguf file, a hub id, or None for the embedded default).

    `quantize`:
      "auto"  a GGUF keeps its quantized blocks and runs them in place ("gguf") unless a `dtype` is
              given, which asks for the exact float reference; other checkpoints load as they are.
      "gguf"  GGUF blocks run in place by the native CPU kernels (GGUF files only).
      "int8", "int4"  weight-only quantized linear layers built at load time.
      None    no quantization: weights dequantized to `dtype`.
    `dtype` (default float32) is the dtype of activations and of float weights.
    """
    if dtype is not None and dtype not in DTYPES:
        raise QwenkitError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise QwenkitError(f"unsupported quantization {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    resolved = resolve_model(spec)
    if quantize == "auto":
        quantize = "gguf" if resolved.format == "gguf" and dtype is None and native_gguf_available() else None
    if quantize == "gguf":
        if resolved.format != "gguf":
            raise QwenkitError(f"--quantize gguf runs GGUF blocks in place; {resolved.path} is not a GGUF file")
        if not native_gguf_available():
            raise QwenkitError("--quantize gguf needs the native CPU kernels: an x86-64 CPU with AVX-512 VNNI and a C++ "
                               "compiler (see the warning above); use --dtype float32 or --quantize int4 instead")
    loaded = load_resolved(resolved, DTYPES[dtype or "float32"], quantize)
    if quantize in ("int8", "int4"):
        from qwenkit.quantization.quantize import quantize_model

        quantize_model(loaded.model, quantize, group_size)
    return loaded


def native_gguf_available() -> bool:
    from qwenkit.kernels import cpu_kernels

    return cpu_kernels() is not None


def load_resolved(resolved: ResolvedModel, dtype: torch.dtype, quantize: str | None = None) -> LoadedModel:
    path = resolved.path
    if resolved.format == "gguf":
        gguf = open_gguf(path)
        config = config_from_gguf(gguf)
        tokenizer = Tokenizer.from_gguf(gguf)
        if quantize == "gguf":
            kept = gguf_block_layers(gguf, config, dtype)
        elif quantize == "int4":  # Q4_K blocks become int4 layers directly, exactly, never float
            kept = int4_layers_from_q4_k(gguf, config)
        else:
            kept = {}
        model = build_model(config, iter_gguf_tensors(gguf, config, frozenset(kept)), dtype, kept)
        return LoadedModel(model, tokenizer, config, path, dict(GGUF_GENERATION_DEFAULTS))
    config = read_hf_config(path)
    generation_config = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    eos = generation_config.get("eos_token_id", [])
    tokenizer = Tokenizer.from_hf_dir(path, tuple(eos) if isinstance(eos, list) else (eos,))
    tensors, quantized = iter_safetensors(path), {}
    quantization_config = read_json(path / "config.json").get("quantization_config")
    if quantization_config is not None:
        from qwenkit.quantization.checkpoint import split_quantized

        quantized, tensors = split_quantized(tensors, quantization_config)
    model = build_model(config, tensors, dtype, quantized)
    return LoadedModel(model, tokenizer, config, path, generation_config)


def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    quantized: dict[str, nn.Module] | None = None,
    model_class: type[QwenForCausalLM] = QwenForCausalLM,
) -> QwenForCausalLM:
    """The model from a checkpoint's float tensors, plus already built `quantized` modules by name."""
    # Parameters are created on the meta device and replaced by the checkpoint's tensors, so a
    # model is never initialised randomly first (that would double load time and peak memory).
    with torch.device("meta"):
        model = model_class(config)
    for name, module in (quantized or {}).items():
        replace_module(model, name, module)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_meta}
    expected = set(shapes)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _unfuse_experts(tensors):
        if name not in expected:
            raise QwenkitError(f"checkpoint tensor {name!r} does not belong to a {config.architecture} model")
        shape = shapes[name]
        if tuple(tensor.shape) != shape:
            raise QwenkitError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        state[name] = tensor.to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - state.keys())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise QwenkitError(f"checkpoint is incomplete: missing {', '.join(missing[:3])}{more}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # a quantized head is its own copy
        model.tie_weights()
    return model.eval().requires_grad_(False)


def _unfuse_experts(tensors: Iterable[tuple[str, torch.Tensor]]):
    """Accept experts saved fused as 3-D tensors (transformers 5 in-memory layout) as well as per expert."""
    for name, tensor in tensors:
        m = _FUSED_EXPERTS.match(name)
        if m is None:
            yield name, tensor
            continue
        prefix, kind = m.groups()
        for e, w in enumerate(tensor.unbind(0)):
            if kind == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", w
            else:
                gate, up = w.chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
