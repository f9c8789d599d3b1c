"""Shared pytest setup.

- Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before anything (ours or
  transformers) imports triton, so it is set here, first.
- The `gpu` marker skips a test when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
