import os

import pytest
import torch

# Tests run on CPU; keep them deterministic and light on the two cores.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
