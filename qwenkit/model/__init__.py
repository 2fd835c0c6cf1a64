from qwenkit.model.attention import AttentionBackend, ContiguousKVCache, NoCache
from qwenkit.model.qwen import QwenForCausalLM

__all__ = ["AttentionBackend", "ContiguousKVCache", "NoCache", "QwenForCausalLM"]
