"""Kernel checks run the Triton kernels for real: under TRITON_INTERPRET=1 on the CPU (how
tests/test_kernels.py runs this folder, in a process of its own) or compiled on a CUDA GPU."""

import pytest
import torch
from _helpers import INTERPRETED

if torch.cuda.is_available() and not INTERPRETED:
    # The checks hold fp32 results to 1e-5 of fp32 references (golden data computed on the CPU,
    # the torch backend): cuDNN's default TF32 convolutions keep 10 mantissa bits (~5e-4).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if INTERPRETED or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="kernel checks need TRITON_INTERPRET=1 (set before triton is imported) or a GPU"
    )
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def no_fma_contraction(monkeypatch):
    """For the checks of the fused update against the eager loops. Compiled for a GPU, Triton
    contracts a * b + c into one FMA (one rounding instead of two), which the eager loops'
    separate ops never do; x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) then amplifies that
    difference by up to 1/sqrt(abar) (2e4 at the cosine schedule's t = 999), past 1e-5. These
    checks compile without contraction (Triton reads the variable at each launch); production
    launches keep Triton's default."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
