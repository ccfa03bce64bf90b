import pytest
import torch

# More than one OpenMP thread per process spins on small shared machines and runs the tiny models 10-20x
# slower (measured: 32 decode steps 13.6 s with 2 threads, 0.55 s with 1). CI has 2 cores, and Ray workers
# run beside the test process.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
