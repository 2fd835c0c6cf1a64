"""How long a context the user asked for, and whether a KV pool can hold it.

The context a model reaches follows its rope scaling (factor x original context, see
ModelConfig.context_length); `max_model_len` may only shorten it. The KV memory a context needs is
known before anything is allocated, so an impossible request fails up front with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError

GIB = 1 << 30


@dataclass(frozen=True)
class ContextRequest:
    """What the user asked of the context; applied to the checkpoint's configuration before the model is built."""

    max_model_len: int | None = None
    rope_scaling: dict[str, Any] | str | None = None

    def apply(self, config: ModelConfig) -> ModelConfig:
        return config if self.rope_scaling is None else config.with_rope_scaling(self.rope_scaling)

    def max_len(self, config: ModelConfig) -> int:
        context = config.context_length
        if self.max_model_len is None:
            return context
        if self.max_model_len < 1:
            raise QwenkitError(f"max_model_len must be at least 1, not {self.max_model_len}")
        if self.max_model_len > context:
            rope = config.rope
            how = (f"{rope.original_max_position_embeddings or config.max_position_embeddings} x {rope.rope_type} factor {rope.factor:g}"
                   if rope.rope_type != "default" else "no rope scaling")
            raise QwenkitError(
                f"max_model_len {self.max_model_len} exceeds the model's context of {context} tokens ({how}); "
                f"extend it with rope scaling, e.g. --rope-scaling '{{\"rope_type\":\"yarn\",\"factor\":4.0,"
                f"\"original_max_position_embeddings\":{config.max_position_embeddings}}}'"
            )
        return self.max_model_len

    @property
    def requested(self) -> bool:
        return self.max_model_len is not None or self.rope_scaling is not None


class ContextDoesNotFit(QwenkitError):
    """The KV pool cannot hold max_model_len tokens of even one sequence; says every number."""


def check_kv_pool(max_model_len: int, pool_tokens: int, bytes_per_token: int, dtype: torch.dtype) -> None:
    """Raise ContextDoesNotFit unless a pool of `pool_tokens` token slots holds one sequence of max_model_len."""
    if pool_tokens >= max_model_len:
        return
    need, have = max_model_len * bytes_per_token, pool_tokens * bytes_per_token
    raise ContextDoesNotFit(
        f"max_model_len {max_model_len} needs {need / GIB:.2f} GiB of KV cache for one sequence "
        f"({bytes_per_token / 1024:g} KiB per token in {str(dtype).removeprefix('torch.')}); the KV cache of "
        f"{have / GIB:.2f} GiB holds {pool_tokens} tokens: raise --kv-cache-gb to at least {need / GIB:.2f} "
        f"or lower --max-model-len to {pool_tokens}"
    )
