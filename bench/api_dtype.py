"""The Python API's default precision against an explicit float32, on one device.

    python -m bench.api_dtype [--preset 64x64_diffusion] [--device cpu] [--repeats 3]

`fastsample.create_model(preset)` with the default `dtype=None` ("auto") against the same preset
built with `dtype=torch.float32`: one forward of batch 1 each (random weights, default kernels),
timed alternately after a warm-up, the median of the repeats, and their ratio. On the CPU "auto"
is float32, so the ratio should be 1 within this machine's noise; a float16 torso on the CPU
(no fast float16 convolutions) would be 10-50x slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastsample
from fastsample.catalog import PRESETS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    diffusion = sorted(n for n, p in PRESETS.items() if p.diffusion and not p.low_res_size)
    parser.add_argument("--preset", default="64x64_diffusion", choices=diffusion)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=_positive, default=3)
    parser.add_argument("--threads", type=_positive, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    return args


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _forward(model, device) -> float:
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.tensor([500], device=device)
    y = torch.tensor([1], device=device) if cfg.num_classes else None
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x, t, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert torch.isfinite(out).all()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {
        "auto (dtype=None)": fastsample.create_model(args.preset, device),
        "float32": fastsample.create_model(args.preset, device, dtype=torch.float32),
    }
    for name, model in models.items():
        _forward(model, device)  # warm-up (oneDNN packs the weights)
        print(f"{name}: torso {model.dtype}")
    seconds = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():  # alternating: the machine's drift hits both
            seconds[name].append(_forward(model, device))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name, s in median.items():
        print(f"{name}: {s * 1e3:.0f} ms per forward (median of {args.repeats})")
    ratio = median["auto (dtype=None)"] / median["float32"]
    print(f"{args.preset} on {device}, batch 1: auto / float32 = {ratio:.2f}x "
          f"(target: within 1.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
