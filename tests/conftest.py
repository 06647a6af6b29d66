import pytest
import torch
from hypothesis import settings

# Deterministic, CPU-only, small: the same run twice gives the same result.
settings.register_profile("seqlab", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("seqlab")
# Tiny models run fastest on one thread, and do not fight other processes for the cores (no OpenMP spinning).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

