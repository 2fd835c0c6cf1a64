"""Which model class serves which checkpoint: one entry per family.

A new family is its own file under qwenkit/model/ plus one line in FAMILIES. The loader looks a
checkpoint up here by config.json's `model_type` (GGUF files map their architecture name onto
the same model types).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.model.qwen import QwenForCausalLM


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's model_type
    architecture: str  # the HF class name config.json lists under "architectures"
    model_class: type[nn.Module]  # built as model_class(ModelConfig) on the meta device


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("qwen2", "Qwen2ForCausalLM", QwenForCausalLM),
    ModelFamily("qwen3", "Qwen3ForCausalLM", QwenForCausalLM),
    ModelFamily("qwen2_moe", "Qwen2MoeForCausalLM", QwenForCausalLM),
    ModelFamily("qwen3_moe", "Qwen3MoeForCausalLM", QwenForCausalLM),
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
