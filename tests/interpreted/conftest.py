"""Kernel checks run the Triton kernels for real: under TRITON_INTERPRET=1 on the CPU (how
tests/test_kernels.py runs this folder, in a process of its own) or compiled on a CUDA GPU."""

import pytest
import torch
from _helpers import INTERPRETED


def pytest_collection_modifyitems(config, items):
    if INTERPRETED or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="kernel checks need TRITON_INTERPRET=1 (set before triton is imported) or a GPU"
    )
    for item in items:
        item.add_marker(skip)
