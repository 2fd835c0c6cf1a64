"""Adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors.

Tensor keys are `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]); the update is (lora_alpha / r) * B @ A, or lora_alpha / sqrt(r) with rsLoRA. Module
names are the HF checkpoint's, which are qwenkit's too, so adapters move between peft, vLLM and
qwenkit unchanged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwenkit.errors import QwenkitError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
# PEFT features that change the computation; an adapter using them must not load as plain LoRA.
_UNSUPPORTED = {"use_dora": False, "modules_to_save": None, "layers_to_transform": None, "target_parameters": None,
                "lora_bias": False, "fan_in_fan_out": False, "layer_replication": None, "trainable_token_indices": None}


@dataclass
class LoraConfig:
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.r <= 0:
            raise QwenkitError(f"LoRA rank must be positive, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise QwenkitError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")

    def targets(self, module_name: str, is_lm_head: bool = False) -> bool:
        """PEFT's matching: a regex string must match the whole name; list entries match a name's last parts."""
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return not is_lm_head
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def rank_and_scaling(self, module_name: str, rank: int | None = None) -> tuple[int, float]:
        rank = rank or _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)
        return rank, alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def to_peft_dict(self) -> dict:
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules, "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
            "bias": "none", "init_lora_weights": True, "inference_mode": True, **_UNSUPPORTED,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoraConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise QwenkitError(f"only LoRA adapters are supported, this one is {d.get('peft_type')}")
        for key, plain in _UNSUPPORTED.items():
            if d.get(key, plain) not in (plain, [], {}):
                raise QwenkitError(f"the adapter uses {key}={d[key]!r}, which qwenkit does not support")
        if d.get("bias", "none") != "none":
            raise QwenkitError(f"the adapter trains biases (bias={d['bias']!r}), which qwenkit does not support")
        targets = d.get("target_modules") or list(DEFAULT_TARGETS)
        return cls(
            r=int(d.get("r", 8)), lora_alpha=float(d.get("lora_alpha", 8)), lora_dropout=float(d.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            use_rslora=bool(d.get("use_rslora", False)), rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}), base_model_name_or_path=d.get("base_model_name_or_path"),
        )


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return value
    return default


@dataclass
class AdapterFile:
    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])


def save_adapter(directory: Path, config: LoraConfig, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().float().contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_peft_dict(), indent=2))


def read_adapter(directory: Path) -> AdapterFile:
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise QwenkitError(f"{directory} is not a LoRA adapter: {CONFIG_FILE} is missing")
    try:
        config = LoraConfig.from_peft_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as exc:
        raise QwenkitError(f"{directory / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if (directory / WEIGHTS_FILE).is_file():
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (SafetensorError, OSError) as exc:
            raise QwenkitError(f"cannot read {directory / WEIGHTS_FILE}: {exc}") from exc
    elif (directory / "adapter_model.bin").is_file():
        tensors = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise QwenkitError(f"{directory} has no {WEIGHTS_FILE}")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise QwenkitError(f"adapter tensor {key!r} is not a LoRA A/B weight qwenkit can load")
        halves.setdefault(m.group(1), {})[m.group(2)] = tensor.float()
    weights = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise QwenkitError(f"adapter is incomplete: {module} lacks lora_{'A' if 'A' not in pair else 'B'}")
        if pair["A"].shape[0] != pair["B"].shape[1]:
            raise QwenkitError(f"adapter {module}: lora_A rank {pair['A'].shape[0]} != lora_B rank {pair['B'].shape[1]}")
        weights[module] = (pair["A"], pair["B"])
    if not weights:
        raise QwenkitError(f"adapter {directory} holds no LoRA weights")
    return AdapterFile(config, weights)
