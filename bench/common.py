"""What every benchmark script shares: timing, the commit, random (never zero) weights."""

from __future__ import annotations

import statistics
import subprocess
import time

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device | str = "cpu") -> float:
    """Median wall time of fn over `repeats` runs after one warm-up (device-synchronised)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, also where the reference initialises to zero (timing on zeros
    would measure the wrong thing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model
