"""The work of one classifier-guided step (UNet forward + classifier input gradient at a mid
schedule timestep), reference-style eager vs fastsample's default path, as pytest-benchmark
cases (regressions show in its report; nothing is asserted about time)."""

from __future__ import annotations

import pytest
import torch

import fastsample
from bench.sample import _random, reference_style
from fastsample.catalog import PRESETS
from fastsample.netfns import guidance_fn, scaled

pytest.importorskip("pytest_benchmark")


def _setup(full: bool, path: str):
    name = "64x64_diffusion" if full else "demo-mnist"
    preset = PRESETS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = "torch" if path == "reference" else "auto"
    if full:
        model = _random(name, 0, device, kernels=kernels)
        clf = _random(preset.classifier, 1, device, kernels=kernels)
    else:
        model = fastsample.load_model(name, device=device, kernels=kernels)
        clf = fastsample.load_model(preset.classifier, device=device, kernels=kernels)
    if path == "reference":
        clf = reference_style(clf)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.tensor([500], device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    guide = scaled(guidance_fn(clf, y), 2.5)

    def step():
        with torch.no_grad():
            out = model(x, t, y)
        grad = guide(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, grad

    return step


@pytest.mark.parametrize("path", ["reference", "fastsample"])
def test_guided_ddim_step(benchmark, full_shapes, path):
    step = _setup(full_shapes, path)
    out, grad = benchmark.pedantic(step, rounds=3 if full_shapes else 5, warmup_rounds=1)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
