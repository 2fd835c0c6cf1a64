"""Generation: sampling parameters, the continuous-batching engine, and the LLM / AsyncLLM APIs."""

from qwenkit.engine.llm import LLM, AsyncLLM
from qwenkit.engine.llm_engine import EngineConfig, LLMEngine
from qwenkit.engine.outputs import CompletionOutput, RequestOutput
from qwenkit.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
