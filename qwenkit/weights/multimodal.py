"""Load Qwen2-VL, Qwen2.5-VL and Qwen2-Audio safetensors checkpoints into qwenkit's models."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.media import MediaCausalLM
from qwenkit.model.qwen2_audio import Qwen2AudioForConditionalGeneration
from qwenkit.model.qwen2_vl import Qwen2VLForConditionalGeneration
from qwenkit.weights.loader import DTYPES, build_model
from qwenkit.weights.safetensors_dir import iter_safetensors, read_hf_config

MODEL_CLASSES: dict[str, type[MediaCausalLM]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2VLForConditionalGeneration,
    "qwen2_audio": Qwen2AudioForConditionalGeneration,
}

# Checkpoint name prefixes -> qwenkit's. Released checkpoints (and transformers' save_pretrained)
# use the first layout of each; transformers 4.5x-era saves nest everything under "model.".
_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def checkpoint_names(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        for old, new in _PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        yield name, tensor


def load_multimodal_model(directory: str | Path, dtype: str = "float32") -> MediaCausalLM:
    """The model of an HF checkpoint directory of one of MODEL_CLASSES' architectures."""
    path = Path(directory)
    config: ModelConfig = read_hf_config(path)
    model_class = MODEL_CLASSES.get(config.architecture)
    if model_class is None:
        raise QwenkitError(f"{path} holds a {config.architecture} model, not a multimodal one ({', '.join(MODEL_CLASSES)})")
    if dtype not in DTYPES:
        raise QwenkitError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tensors = checkpoint_names(iter_safetensors(path))
    return build_model(config, tensors, DTYPES[dtype], model_class=model_class)
