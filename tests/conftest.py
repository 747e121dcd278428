import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import FMNIST  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def fmnist() -> Path:
    if not (FMNIST / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST} (make setup installs dataset-fashion-mnist)")
    return FMNIST
