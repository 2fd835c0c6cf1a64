"""Load any supported checkpoint into a model of its family plus its tokenizer.

Everything the loader decides (weight format, quantization, compute and KV cache dtypes, context
length) is recorded once in `LoadPlan` on the `LoadedModel`; the engine and the server read it
from there instead of working it out again from the model's modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import chain
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenkit.config import ModelConfig
from qwenkit.distributed import ProcessGroup, ShardPlan
from qwenkit.errors import QwenkitError
from qwenkit.formats.gguf_config import config_from_gguf
from qwenkit.formats.gguf_mmproj import iter_mmproj_tensors, media_model_config
from qwenkit.formats.gguf_reader import GGUFFile
from qwenkit.formats.gguf_tensors import iter_gguf_tensors
from qwenkit.formats.safetensors_dir import iter_safetensors, read_json
from qwenkit.kernels import cpu_kernels
from qwenkit.model.media import MediaCausalLM
from qwenkit.model.registry import model_family
from qwenkit.model.tensor_parallel import apply_shards, plan_shards
from qwenkit.multimodal.processor import ProcessorConfig, processor_config_from_mmproj, read_processor_config
from qwenkit.multimodal.templates import default_template, writes_placeholders
from qwenkit.modules import replace_module
from qwenkit.quantization.checkpoint import split_quantized
from qwenkit.quantization.gguf_layers import gguf_block_layers, gguf_column_units, int4_layers_from_q4_k
from qwenkit.quantization.quantize import quantize_model
from qwenkit.tokenizer.chat_template import ChatTemplate
from qwenkit.tokenizer.tokenizer import Tokenizer
from qwenkit.weights.context import ContextRequest
from qwenkit.weights.resolve import ResolvedModel, WeightFormat, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A GGUF carries no generation config; these are llama.cpp's sampling defaults, which GGUF users expect.
GGUF_GENERATION_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}

_FUSED_EXPERTS = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class Quantization(Enum):
    NONE = "none"  # float weights in the compute dtype
    GGUF_BLOCKS = "gguf"  # a GGUF's blocks run in place by the native kernels
    INT8 = "int8"  # weight-only int8 layers built at load time
    INT4 = "int4"  # weight-only int4 layers built at load time (from a GGUF: Q4_K kept exactly)
    CHECKPOINT = "checkpoint"  # int4/int8 codes stored in the checkpoint (qwenkit, AWQ, GPTQ)


QUANTIZE_CHOICES = ("auto", "gguf", "int8", "int4")


@dataclass(frozen=True)
class LoadPlan:
    """What the loader decided, once."""

    weight_format: WeightFormat
    quantization: Quantization
    compute_dtype: torch.dtype  # activations and float weights
    kv_cache_dtype: torch.dtype  # what a KV cache dtype of "auto" means for this model
    max_model_len: int  # tokens of context (prompt + output): the model's (scaled) context or what was asked
    kv_bytes_per_token: int  # K and V of one token over all layers, in kv_cache_dtype
    context_requested: bool = False  # max_model_len or rope scaling was asked for (so it must fit the KV pool)

    @property
    def context_kv_bytes(self) -> int:
        """KV cache memory one sequence of max_model_len tokens needs."""
        return self.kv_bytes_per_token * self.max_model_len


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    plan: LoadPlan
    generation_config: dict[str, Any] = field(default_factory=dict)
    processor: ProcessorConfig | None = None  # multimodal models: how media are preprocessed (None: text only)


def load_model(
    spec: str | None = None,
    dtype: str | None = None,
    quantize: str | None = "auto",
    group_size: int = 128,
    *,
    max_model_len: int | None = None,
    rope_scaling: dict[str, Any] | str | None = None,
    revision: str | None = None,
    source: str | None = None,
    mmproj: str | None = None,
    tensor_parallel: ProcessGroup = ProcessGroup(),
) -> LoadedModel:
    """Load `spec` (a directory, a .gguf file, a hub id, or None for the embedded default).

    `rope_scaling` (HF's keys, e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
    32768}) replaces the checkpoint's; the context then reaches factor x original. `max_model_len` caps
    the context (it may not exceed the model's). `revision` pins a hub id to a branch, tag or commit;
    `source` is "huggingface" or "modelscope" (default: $QWENKIT_USE_MODELSCOPE, else huggingface).
    `mmproj` is a GGUF model's vision tower (llama.cpp's mmproj file: Qwen2-VL / Qwen2.5-VL); a
    directory holding one GGUF model and one mmproj file takes it without being told.
    `tensor_parallel`: this process's group (engine/tensor_parallel.py); the model is then built
    as this process's shard, reading only its runs of the sharded weights.

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
    resolved = resolve_model(spec, revision=revision, source=source, mmproj=mmproj)
    is_gguf = resolved.format == WeightFormat.GGUF
    if quantize == "auto":
        quantize = "gguf" if is_gguf and dtype is None and native_gguf_available() else None
    if quantize == "gguf":
        if not is_gguf:
            raise QwenkitError(f"--quantize gguf runs GGUF blocks in place; {resolved.path} is not a GGUF file")
        if not native_gguf_available():
            raise QwenkitError("--quantize gguf needs the native CPU kernels, which need a C++ "
                               "compiler (see the warning above); use --dtype float32 or --quantize int4 instead")
    compute_dtype = DTYPES[dtype or "float32"]
    requested = Quantization.NONE if quantize is None else Quantization(quantize)
    if tensor_parallel.world_size > 1 and requested not in (Quantization.NONE, Quantization.GGUF_BLOCKS):
        raise QwenkitError(f"tensor parallelism shards float and GGUF block layers, not --quantize {quantize} layers")
    loaded = load_resolved(resolved, compute_dtype, requested, ContextRequest(max_model_len, rope_scaling), tensor_parallel)
    if requested in (Quantization.INT8, Quantization.INT4):
        quantize_model(loaded.model, requested.value, group_size)
    return loaded


def native_gguf_available() -> bool:
    return cpu_kernels() is not None


def _plan(config: ModelConfig, fmt: WeightFormat, dtype: torch.dtype, quantization: Quantization, context: ContextRequest) -> LoadPlan:
    # float16 for GGUF blocks in place (llama.cpp's default cache type: half of float32's memory);
    # otherwise the model's own dtype, so a float model's cache is exact.
    kv = torch.float16 if quantization == Quantization.GGUF_BLOCKS else dtype
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * kv.itemsize
    return LoadPlan(fmt, quantization, dtype, kv, context.max_len(config), per_token, context.requested)


def load_resolved(
    resolved: ResolvedModel,
    dtype: torch.dtype,
    quantization: Quantization = Quantization.NONE,
    context: ContextRequest = ContextRequest(),
    group: ProcessGroup = ProcessGroup(),
) -> LoadedModel:
    path = resolved.path
    if resolved.format == WeightFormat.GGUF:
        gguf = GGUFFile(path)
        config = context.apply(config_from_gguf(gguf))
        mmproj = GGUFFile(resolved.mmproj) if resolved.mmproj is not None else None
        if mmproj is not None:
            config = media_model_config(config, gguf, mmproj, gguf.metadata.get("tokenizer.ggml.tokens") or [])
        plan = _plan(config, resolved.format, dtype, quantization, context)  # a bad request fails before the weights load
        family = model_family(config.model_type)
        tokenizer = Tokenizer.from_gguf(gguf)
        blocks = quantization == Quantization.GGUF_BLOCKS
        units = gguf_column_units(gguf, config) if blocks and group.world_size > 1 else {}
        # The output projection in blocks (its own, or the tied embedding's) splits by rows with no copy.
        head = True if "lm_head" in units or (config.tie_word_embeddings and "model.embed_tokens" in units) else None
        shards = shard_plan(family.model_class, config, group, units, head)
        if blocks:
            kept = gguf_block_layers(gguf, config, dtype, shards)
        elif quantization == Quantization.INT4:  # Q4_K blocks become int4 layers directly, exactly, never float
            kept = int4_layers_from_q4_k(gguf, config)
        else:
            kept = {}
        tensors = iter_gguf_tensors(gguf, config, frozenset(kept))
        if mmproj is not None:  # the encoder runs in float, as llama.cpp's clip does
            tensors = chain(tensors, iter_mmproj_tensors(mmproj, config.model_type))
        model = build_model(family.model_class, config, tensors, dtype, kept, shards)
        processor = None
        if mmproj is not None:
            processor = processor_config_from_mmproj(mmproj.metadata)
            _take_media_template(tokenizer, config)
        return LoadedModel(model, tokenizer, config, path, plan, dict(GGUF_GENERATION_DEFAULTS), processor)
    raw_config = read_json(path / "config.json")
    family = model_family(raw_config.get("model_type"))
    config = context.apply(ModelConfig.from_hf_dict(raw_config))
    context.max_len(config)  # a bad request fails before the weights load
    generation_config = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    eos = generation_config.get("eos_token_id", [])
    tokenizer = Tokenizer.from_hf_dir(path, tuple(eos) if isinstance(eos, list) else (eos,))
    if group.world_size > 1 and raw_config.get("quantization_config") is not None:
        method = raw_config["quantization_config"].get("quant_method", "quantized")
        raise QwenkitError(f"tensor parallelism shards float and GGUF block layers, not a {method} checkpoint's layers")
    shards = shard_plan(family.model_class, config, group, {})
    tensors, stored = iter_safetensors(path, shards, family.tensor_name), {}
    if raw_config.get("quantization_config") is not None:
        stored, tensors = split_quantized(tensors, raw_config["quantization_config"])
        quantization = Quantization.CHECKPOINT
    model = build_model(family.model_class, config, tensors, dtype, stored, shards)
    processor = None
    if issubclass(family.model_class, MediaCausalLM):
        processor = read_processor_config(path)
        _take_media_template(tokenizer, config)
    plan = _plan(config, resolved.format, dtype, quantization, context)
    return LoadedModel(model, tokenizer, config, path, plan, generation_config, processor)


def _take_media_template(tokenizer: Tokenizer, config: ModelConfig) -> None:
    """A tokenizer saved without the processor's template (one that writes no media placeholders)
    gets the released checkpoints' own."""
    if not writes_placeholders(tokenizer.chat_template.source if tokenizer.has_chat_template else None, config.model_type):
        tokenizer.chat_template = ChatTemplate(default_template(config.model_type), tokenizer.special_tokens)
        tokenizer.has_chat_template = True


def shard_plan(model_class: type[nn.Module], config: ModelConfig, group: ProcessGroup, units: dict[str, int],
               head: bool | None = None) -> ShardPlan | None:
    """What this process of a tensor-parallel group keeps of each layer (None without one),
    planned on a skeleton on the meta device before any weight is read. `units`: the layers
    to be built from GGUF blocks, and the runs of input columns they split into; `head`:
    plan_shards's (whether the output projection splits)."""
    if group.world_size == 1:
        return None
    with torch.device("meta"):
        skeleton = model_class(config)
    return plan_shards(skeleton, group, units, head)


def build_model(
    model_class: type[nn.Module],
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    quantized: dict[str, nn.Module] | None = None,
    shards: ShardPlan | None = None,
) -> nn.Module:
    """The model from a checkpoint's float tensors, plus already built `quantized` modules by name;
    with a tensor-parallel plan, this process's shard (`quantized` modules are built as shards)."""
    # Parameters are created on the meta device and replaced by the checkpoint's tensors, so a
    # model is never initialised randomly first (that would double load time and peak memory).
    with torch.device("meta"):
        model = model_class(config)
    whole = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, module in (quantized or {}).items():
        replace_module(model, name, module)
    if shards is not None:  # after the built modules are in: the gather hook goes on the output projection in place
        apply_shards(model, shards, built=frozenset(quantized or {}))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_meta}
    expected = set(shapes)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _unfuse_experts(tensors):
        if shards is not None and name in whole:
            if not shards.keeps(name):  # a row-parallel layer's bias: rank 0's
                continue
            tensor = shards.take(name, tensor, whole[name])
        if name not in expected:
            raise QwenkitError(f"checkpoint tensor {name!r} does not belong to a {config.model_type} model")
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
