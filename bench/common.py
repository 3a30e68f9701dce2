"""What every benchmark script shares: timing, the commit, random (never zero) weights, and
writing its table and numbers."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

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
    would measure the wrong thing); drawn on the parameters' device (seconds for ADM-256 on a
    GPU, where CPU draws would take minutes)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
    return model


def report(name: str, lines: list[str], header, rows: list[dict], json_path=None,
           markdown_path=None) -> None:  # fmt: skip
    """Print a script's table; write {header, rows} as JSON and append the table under
    `### python -m bench.NAME` to a markdown file, where asked."""
    print("\n".join(lines))
    if json_path:
        Path(json_path).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    if markdown_path:
        with open(markdown_path, "a") as f:
            f.write(f"\n### python -m bench.{name}\n\n" + "\n".join(lines) + "\n")


def parse_counts(parser, option: str, text: str, minimum: int = 1) -> list[int]:
    """Comma-separated counts, "5,10,25" -> [5, 10, 25], each at least `minimum`; else the
    parser's error naming the option."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        parser.error(f"{option} {text!r}: expected comma-separated integers")
    if any(c < minimum for c in counts):
        parser.error(f"{option} {text!r}: expected counts of at least {minimum}")
    return counts


def parse_calls(parser, text: str) -> list[int]:
    """--calls "5,10,25" -> [5, 10, 25] (counts of at least 2), else the parser's error."""
    return parse_counts(parser, "--calls", text, minimum=2)


def check_positive(parser, args, names) -> None:
    """The parser's error for any of these options below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least 1")
