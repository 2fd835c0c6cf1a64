from qwenkit.engine.generate import GenerationStep, Generator
from qwenkit.engine.sampling_params import SamplingParams

__all__ = ["GenerationStep", "Generator", "SamplingParams"]
