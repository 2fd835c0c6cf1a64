from qwenkit.model.attention import AttentionBackend, NoCache
from qwenkit.model.qwen import QwenForCausalLM

__all__ = ["AttentionBackend", "NoCache", "QwenForCausalLM"]
