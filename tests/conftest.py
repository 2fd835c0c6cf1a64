import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model, loaded once per test run (fp32 reference mode)."""
    from qwenkit.weights.loader import load_model

    return load_model(None, "float32")


@pytest.fixture(scope="session")
def gguf_model():
    """The embedded default in its default mode: GGUF blocks run in place (loads in about a second)."""
    from qwenkit.kernels import cpu_kernels
    from qwenkit.weights.loader import load_model

    if cpu_kernels() is None:
        pytest.skip("the native GGUF kernels could not be built here (no C++ compiler?)")
    return load_model(None)
