"""The Qwen family at a glance: what each model is, where to get it, what it needs, what it is for.

Shapes are the models' config.json values; contexts, thinking modes, licences and task advice follow
the Qwen model cards and the Qwen docs' model selection guide. `qwenkit models --catalog` prints this
with the memory each needs here (weights/memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenkit.weights.memory import ModelShape

TASKS = ("chat", "coding", "math", "reasoning", "vision")


@dataclass(frozen=True)
class CatalogModel:
    name: str
    family: str
    shape: ModelShape
    context: int  # native tokens of context
    max_context: int  # with YaRN (rope scaling) where the model card gives it
    thinking: str  # "no", "hybrid" (/think and /no_think, enable_thinking), "always"
    licence: str
    tasks: tuple[str, ...]
    hub_id: str  # safetensors checkpoint
    gguf_repo: str | None = None  # Qwen's own GGUF repo, if any
    modalities: str = "text"
    extra_params: int = 0  # parameters outside the language model (a vision encoder)
    note: str = ""

    @property
    def runs_in_qwenkit(self) -> bool:
        return self.modalities == "text"

    @property
    def params(self) -> int:
        return self.shape.params + self.extra_params

    @property
    def pull_id(self) -> str:
        return f"{self.gguf_repo}:Q4_K_M" if self.gguf_repo else self.hub_id


def _q25(layers, hidden, inter, heads, kv, vocab=152064, tied=False):
    # Qwen's own Qwen2.5 GGUFs store the output matrix even for the tied small models
    return ModelShape(layers, hidden, inter, heads, kv, hidden // heads, vocab, tied, qkv_bias=True, gguf_output=True)


def _q3(layers, hidden, inter, heads, kv, tied=False, **moe):
    return ModelShape(layers, hidden, inter, heads, kv, 128, 151936, tied, qk_norm=True, **moe)


Q25_05 = _q25(24, 896, 4864, 14, 2, 151936, True)
Q25_15 = _q25(28, 1536, 8960, 12, 2, 151936, True)
Q25_3 = _q25(36, 2048, 11008, 16, 2, 151936, True)
Q25_7 = _q25(28, 3584, 18944, 28, 4)
Q25_14 = _q25(48, 5120, 13824, 40, 8)
Q25_32 = _q25(64, 5120, 27648, 40, 8)
Q25_72 = _q25(80, 8192, 29568, 64, 8)
Q3_30B_A3B = _q3(48, 2048, 6144, 32, 4, experts=128, active_experts=8, moe_intermediate=768)

APACHE, QWEN, RESEARCH = "Apache-2.0", "Qwen licence", "Qwen research licence"
K32, K128, K4, K40, K256 = 32768, 131072, 4096, 40960, 262144
CHAT, CODE, MATH, REASON, VISION = ("chat",), ("coding",), ("math",), ("reasoning", "chat", "coding", "math"), ("vision",)


def _q25_entries() -> list[CatalogModel]:
    out = []
    for size, shape, lic, ctx in (("0.5B", Q25_05, APACHE, K32), ("1.5B", Q25_15, APACHE, K32), ("3B", Q25_3, RESEARCH, K32),
                                  ("7B", Q25_7, APACHE, K128), ("14B", Q25_14, APACHE, K128), ("32B", Q25_32, APACHE, K128),
                                  ("72B", Q25_72, QWEN, K128)):
        name = f"Qwen2.5-{size}-Instruct"
        out.append(CatalogModel(name, "Qwen2.5", shape, K32, ctx, "no", lic, CHAT, f"Qwen/{name}", f"Qwen/{name}-GGUF"))
    for size, shape, lic, ctx in (("0.5B", Q25_05, APACHE, K32), ("1.5B", Q25_15, APACHE, K32), ("3B", Q25_3, RESEARCH, K32),
                                  ("7B", Q25_7, APACHE, K128), ("14B", Q25_14, APACHE, K128), ("32B", Q25_32, APACHE, K128)):
        name = f"Qwen2.5-Coder-{size}-Instruct"
        note = "the embedded default model" if size == "0.5B" else ""
        out.append(CatalogModel(name, "Qwen2.5-Coder", shape, K32, ctx, "no", lic, CODE, f"Qwen/{name}", f"Qwen/{name}-GGUF", note=note))
    for size, shape, lic in (("1.5B", Q25_15, APACHE), ("7B", Q25_7, APACHE), ("72B", Q25_72, QWEN)):
        name = f"Qwen2.5-Math-{size}-Instruct"
        out.append(CatalogModel(name, "Qwen2.5-Math", shape, K4, K4, "no", lic, MATH, f"Qwen/{name}",
                                note="chain-of-thought and tool-integrated reasoning in English and Chinese"))
    for size, shape, vision, lic in (("3B", Q25_3, 670_000_000, RESEARCH), ("7B", Q25_7, 675_000_000, APACHE),
                                     ("32B", Q25_32, 675_000_000, APACHE), ("72B", Q25_72, 675_000_000, QWEN)):
        name = f"Qwen2.5-VL-{size}-Instruct"
        out.append(CatalogModel(name, "Qwen2.5-VL", shape, K128, K128, "no", lic, VISION, f"Qwen/{name}",
                                modalities="text+image+video", extra_params=vision, note="vision encoder: not run by qwenkit"))
    return out


def _q3_entries() -> list[CatalogModel]:
    dense = (("0.6B", _q3(28, 1024, 3072, 16, 8, True)), ("1.7B", _q3(28, 2048, 6144, 16, 8, True)),
             ("4B", _q3(36, 2560, 9728, 32, 8, True)), ("8B", _q3(36, 4096, 12288, 32, 8)),
             ("14B", _q3(40, 5120, 17408, 40, 8)), ("32B", _q3(64, 5120, 25600, 64, 8)))
    out = []
    for size, shape in dense:
        ctx = K32 if size in ("0.6B", "1.7B") else K128
        out.append(CatalogModel(f"Qwen3-{size}", "Qwen3", shape, K32, ctx, "hybrid", APACHE, REASON,
                                f"Qwen/Qwen3-{size}", f"Qwen/Qwen3-{size}-GGUF"))
    out.append(CatalogModel("Qwen3-30B-A3B", "Qwen3-MoE", Q3_30B_A3B, K32, K128, "hybrid", APACHE, REASON,
                            "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-GGUF", note="MoE: 3.3B active"))
    out.append(CatalogModel("Qwen3-235B-A22B", "Qwen3-MoE", _q3(94, 4096, 12288, 64, 4, experts=128, active_experts=8, moe_intermediate=1536),
                            K32, K128, "hybrid", APACHE, REASON, "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B-GGUF"))
    out.append(CatalogModel("Qwen3-4B-Instruct-2507", "Qwen3-2507", dense[2][1], K256, K256, "no", APACHE, CHAT + CODE,
                            "Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-4B-Instruct-2507-GGUF"))
    out.append(CatalogModel("Qwen3-4B-Thinking-2507", "Qwen3-2507", dense[2][1], K256, K256, "always", APACHE, ("reasoning", "math"),
                            "Qwen/Qwen3-4B-Thinking-2507", "Qwen/Qwen3-4B-Thinking-2507-GGUF"))
    out.append(CatalogModel("Qwen3-30B-A3B-Instruct-2507", "Qwen3-2507", Q3_30B_A3B, K256, K256, "no", APACHE, CHAT,
                            "Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-30B-A3B-Instruct-2507-GGUF"))
    out.append(CatalogModel("Qwen3-30B-A3B-Thinking-2507", "Qwen3-2507", Q3_30B_A3B, K256, K256, "always", APACHE, ("reasoning", "math"),
                            "Qwen/Qwen3-30B-A3B-Thinking-2507", "Qwen/Qwen3-30B-A3B-Thinking-2507-GGUF"))
    out.append(CatalogModel("Qwen3-Coder-30B-A3B-Instruct", "Qwen3-Coder", Q3_30B_A3B, K256, K256, "no", APACHE, CODE,
                            "Qwen/Qwen3-Coder-30B-A3B-Instruct", "Qwen/Qwen3-Coder-30B-A3B-Instruct-GGUF",
                            note="agentic coding, tool calls"))
    out.append(CatalogModel("QwQ-32B", "QwQ", _q25(64, 5120, 27648, 40, 8), K40, K128, "always", APACHE, ("reasoning", "math"),
                            "Qwen/QwQ-32B", "Qwen/QwQ-32B-GGUF"))
    return out


CATALOG: tuple[CatalogModel, ...] = tuple(_q25_entries() + _q3_entries())

# The selection guide (Qwen docs): per task, the models to try first, best first. qwenkit picks the
# first that fits this machine's memory at Q4_K_M.
RECOMMENDED = {
    "chat": ("Qwen3-30B-A3B-Instruct-2507", "Qwen3-14B", "Qwen3-8B", "Qwen3-4B-Instruct-2507", "Qwen3-1.7B", "Qwen3-0.6B"),
    "coding": ("Qwen3-Coder-30B-A3B-Instruct", "Qwen2.5-Coder-32B-Instruct", "Qwen2.5-Coder-14B-Instruct",
               "Qwen2.5-Coder-7B-Instruct", "Qwen2.5-Coder-3B-Instruct", "Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-0.5B-Instruct"),
    "math": ("Qwen3-30B-A3B-Thinking-2507", "Qwen3-4B-Thinking-2507", "Qwen2.5-Math-7B-Instruct", "Qwen2.5-Math-1.5B-Instruct"),
    "reasoning": ("Qwen3-235B-A22B", "Qwen3-30B-A3B-Thinking-2507", "QwQ-32B", "Qwen3-14B", "Qwen3-8B", "Qwen3-4B-Thinking-2507",
                  "Qwen3-1.7B", "Qwen3-0.6B"),
    "vision": ("Qwen2.5-VL-72B-Instruct", "Qwen2.5-VL-32B-Instruct", "Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-3B-Instruct"),
}


def by_name(name: str) -> CatalogModel:
    for m in CATALOG:
        if m.name.lower() == name.lower():
            return m
    raise KeyError(name)


def for_task(task: str) -> list[CatalogModel]:
    return [m for m in CATALOG if task in m.tasks]
