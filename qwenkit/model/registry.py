"""Which model class serves which checkpoint: one entry per family.

A new family is its own file under qwenkit/model/ plus one line in FAMILIES. The loader looks a
checkpoint up here by config.json's `model_type` (GGUF files map their architecture name onto
the same model types).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.model.media import checkpoint_name
from qwenkit.model.qwen import QwenForCausalLM
from qwenkit.model.qwen2_audio import Qwen2AudioForConditionalGeneration
from qwenkit.model.qwen2_vl import Qwen2VLForConditionalGeneration

def _same_name(name: str) -> str:
    return name


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's model_type
    architecture: str  # the HF class name config.json lists under "architectures"
    model_class: type[nn.Module]  # built as model_class(ModelConfig) on the meta device
    # A checkpoint's tensor name -> the model's parameter name (text families use HF's own).
    tensor_name: Callable[[str], str] = _same_name


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("qwen2", "Qwen2ForCausalLM", QwenForCausalLM),
    ModelFamily("qwen3", "Qwen3ForCausalLM", QwenForCausalLM),
    ModelFamily("qwen2_moe", "Qwen2MoeForCausalLM", QwenForCausalLM),
    ModelFamily("qwen3_moe", "Qwen3MoeForCausalLM", QwenForCausalLM),
    ModelFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", Qwen2VLForConditionalGeneration, checkpoint_name),
    ModelFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", Qwen2VLForConditionalGeneration, checkpoint_name),
    ModelFamily("qwen2_audio", "Qwen2AudioForConditionalGeneration", Qwen2AudioForConditionalGeneration, checkpoint_name),
)

_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def model_family(model_type: str | None) -> ModelFamily:
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        raise QwenkitError(
            f"unsupported architecture {model_type!r} (model_type in config.json); "
            f"qwenkit supports {', '.join(_BY_MODEL_TYPE)}"
        )
    return family
