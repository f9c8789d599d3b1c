"""Shared pytest setup.

- Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before anything (ours or
  transformers) imports triton, so it is set here, first.
- One intra-op torch thread for the whole suite: the models and tensors here are tiny, and on a busy 2-core box
  OpenMP barriers between threads made single tests 20-100x slower.
- The `gpu` marker skips a test when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
