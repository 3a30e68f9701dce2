"""Shared values of the kernel checks (kept out of conftest.py, whose module name the main test
folder also uses)."""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# Output tolerances relative to the output's scale, by input dtype: float32 kernels differ from
# the reference in summation order only (1e-5; the interpreter is exact float32, GPUs run the
# float32 path without TF32); float16 rounds every output to 11 bits (eps 9.8e-4) and bfloat16
# to 8 bits (eps 7.8e-3); the reference itself runs in float32 on the same rounded inputs.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def golden():
    """(config, tensors) of the reference's golden tiny models; skips where they are absent."""
    import json
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get("FASTSAMPLE_SHARED_DIR", root.parent / "shared"))
    directory = Path(
        os.environ.get("FASTSAMPLE_GOLDEN_DIR", shared / "reference_data" / "golden_tiny")
    )
    if not (directory / "config.json").is_file():
        pytest.skip(f"golden tiny models not found in {directory}")
    config = json.loads((directory / "config.json").read_text())
    return config, torch.load(directory / "golden.pt", weights_only=True)
