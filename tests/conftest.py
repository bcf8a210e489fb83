"""Test-suite set-up: Triton runs through its interpreter where there is no GPU, untuned.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One fixed config per Triton kernel: tuning each of hundreds of test shapes would take minutes
# of a GPU lease (configs never change the bits; the benchmarks tune and check the results).
os.environ.setdefault("JACFAST_TRITON_AUTOTUNE", "0")

from jacfast import registry  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


BACKEND_DEVICE = {"cuda": "cuda", "triton": DEVICE.type, "cpu": "cpu"}


def kernel_backends():
    """(backend, device) pytest params for every kernel backend, each on the device it serves.

    Triton runs on the GPU when there is one, else on CPU tensors through its interpreter.
    Unavailable backends stay in the list as skips, so the report says what was not tested and why.
    """
    params = []
    for name, device in BACKEND_DEVICE.items():
        status = registry.status_for(name, device)
        marks = () if status.available else (pytest.mark.skip(reason=status.reason),)
        params.append(pytest.param(name, torch.device(device), id=name, marks=marks))
    return params


def second_gpu(backend: str) -> torch.device:
    """cuda:1, with cuda:0 made current, for tests of tensors on a GPU that is not the
    current one; skips with fewer than two GPUs or without ``backend``."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    status = registry.status_for(backend, "cuda")
    if not status.available:
        pytest.skip(status.reason)
    torch.cuda.set_device(0)
    return torch.device("cuda", 1)


@pytest.fixture(autouse=DEVICE.type == "cuda")
def poisoned_cuda_cache():
    """On a GPU, fill the caching allocator's free memory with NaN before each test.

    Kernels write their outputs into ``torch.empty`` memory, which on a GPU is whatever a
    freed tensor left there; NaN there makes an element a kernel forgets to write fail the
    comparison with the reference instead of passing on stale or zero bytes. One 256 MiB
    block for large requests (they split it) and whole 2 MiB segments of the small pool
    (requests up to 1 MiB), freed again so that the test's allocations reuse them.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    nan = float("nan")
    large = torch.full((64 * 2**20,), nan, device="cuda")
    small = [torch.full((2**17,), nan, device="cuda") for _ in range(16)]  # 512 KiB each: 4 fill a segment
    del large, small
    yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (large memory or time)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large tests left out of CI; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
