import os

import pytest
import torch

# Tests run in parallel processes (pytest -n auto on 2 cores): one intra-op thread each.
torch.set_num_threads(1)
os.environ.setdefault("QUINTET_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "quintet"))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
