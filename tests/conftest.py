import pytest
import torch

# One intra-op thread per process: CI runs `pytest -n 2` on 2 cores, and two OpenMP threads per worker on
# a busy machine spin-wait each other (measured here: mobilenet_v3_small's zoo test 23.6 s with 2 threads
# under load vs 0.55 s with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_available() -> bool:
    return torch.cuda.is_available()
