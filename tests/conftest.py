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
