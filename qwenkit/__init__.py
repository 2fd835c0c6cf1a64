"""qwenkit: run, serve, fine-tune and quantize the Qwen model family on your own machine."""

from qwenkit.errors import QwenkitError

__version__ = "0.1.0"

__all__ = ["QwenkitError", "__version__"]
