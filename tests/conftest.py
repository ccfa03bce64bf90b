import faulthandler
import sys

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


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After pytest's own fault handler is gone: a crash while Python shuts down (after the summary; seen once in CI,
    not reproduced) then prints every thread's stack instead of a bare exit status."""
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
