"""Load Qwen2-VL, Qwen2.5-VL and Qwen2-Audio safetensors checkpoints: the model alone.

`load_model` loads them too (with their tokenizer, processor config and chat template, for the
engine); this builds just the model from a checkpoint directory, for calling the encoders and the
decoder directly (the model tests do).
"""

from __future__ import annotations

from pathlib import Path

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.formats.safetensors_dir import iter_safetensors, read_json
from qwenkit.model.media import MediaCausalLM
from qwenkit.model.registry import model_family
from qwenkit.weights.loader import DTYPES, build_model


def load_multimodal_model(directory: str | Path, dtype: str = "float32") -> MediaCausalLM:
    path = Path(directory)
    raw = read_json(path / "config.json")
    family = model_family(raw.get("model_type"))
    if not issubclass(family.model_class, MediaCausalLM):
        raise QwenkitError(f"{path} holds a {family.model_type} model, not a multimodal one")
    if dtype not in DTYPES:
        raise QwenkitError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    config = ModelConfig.from_hf_dict(raw)
    return build_model(family.model_class, config, iter_safetensors(path, rename=family.tensor_name), DTYPES[dtype])
