"""Kernel tests that run the Triton kernels for real: under TRITON_INTERPRET=1 on the CPU (how
tests/test_kernels.py runs this folder, in its own process), or compiled on a CUDA GPU."""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"

if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "kernel checks need TRITON_INTERPRET=1 (set before triton is imported) or a CUDA GPU",
        allow_module_level=True,
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# Output tolerances relative to the output's scale, by input dtype: float32 kernels differ from
# the reference in summation order only (on a GPU, TF32-free paths: 1e-5; the interpreter is
# exact float32); float16 rounds every output to 11 bits (eps 9.8e-4) and bfloat16 to 8 bits
# (eps 7.8e-3); the reference itself is computed in float32 on the same rounded inputs.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
