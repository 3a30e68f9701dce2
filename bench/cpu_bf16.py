"""bf16 against fp32 on the CPU: oneDNN's bf16 convolutions in the torso, GroupNorm statistics
and the attention softmax in fp32, the sampler's state and update in fp32.

    python -m bench.cpu_bf16 [--samples 100] [--steps ddim25] [--repeats 5] [--threads 2]
                             [--json FILE]

One process, the same weights and inputs for both precisions, fp32 and bf16 timed alternately
after a warm-up (median of the repeats). Three tables:

1. one convolution (batch 1; the layers of ENGINEERING_NOTES.md 7): fp32 and bf16, NCHW and
   channels_last, and fp32 Winograd where the onednn kernels would take it;
2. one classifier-guided step (UNet forward + the classifier's input gradient, as the samplers
   call them) of the ADM-64 preset shapes with random weights, batch 1 and 4: ms per step, the
   ratio, and the relative error of bf16's eps and gradient against fp32's;
3. the embedded demo: guided samples (scale 2) from the same seeds in each precision: ms per
   image, the judge's accuracy (share classified as the requested label), and how far the bf16
   images are from the fp32 ones.

Timings only, nothing asserted. The machine may be shared: the load average is printed with
each table, and a ratio is only as good as the load was steady.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch

import fastsample
from bench.common import commit, report
from bench.sample import _random
from fastsample import ops
from fastsample.catalog import DEMO_CLASSIFIER, DEMO_UNET, PRESETS
from fastsample.diagnostics import _cpu_name
from fastsample.judge import images_to_input, load_judge
from fastsample.netfns import guidance_fn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=_positive, default=100, help="demo samples per dtype")
    parser.add_argument("--batch", type=_positive, default=25, help="demo batch size")
    parser.add_argument("--steps", default="ddim25", help="demo respacing spec")
    parser.add_argument("--scale", type=float, default=2.0, help="demo guidance scale")
    parser.add_argument("--repeats", type=_positive, default=5)
    parser.add_argument("--threads", type=_positive, default=2)
    parser.add_argument("--json", default=None, help="write the numbers here")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _alternating(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each fn, the fns run in turn (a load change hits them all alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _packed(conv: torch.nn.Conv2d, x: torch.Tensor):
    """oneDNN's direct convolution with the weights reordered once (the onednn kernels' path)."""
    weight = ops._reorder(conv.weight, [1, 1], [1, 1], [1, 1], x)
    args = (weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    return lambda: torch.ops.mkldnn._convolution_pointwise(x, *args)


def conv_table(repeats: int) -> tuple[list[str], list[dict]]:
    """One 3x3 convolution per dtype, layout and path: ms and GFLOP/s."""
    lines = [
        "",
        f"one 3x3 convolution, batch 1 ({_load()})",
        f"{'channels':>8} {'map':>5}  {'dtype':<5} {'path':<30} {'ms':>7} {'GFLOP/s':>8}",
    ]
    rows = []
    for channels, size in ((256, 32), (384, 32)):
        torch.manual_seed(0)
        conv32 = torch.nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False)
        x32 = torch.randn(1, channels, size, size)
        fns = {}
        for name, dtype in DTYPES.items():
            conv = copy.deepcopy(conv32).to(dtype)
            x = x32.to(dtype)
            x_last = x.contiguous(memory_format=torch.channels_last)
            fns[name, "F.conv2d, NCHW"] = lambda x=x, c=conv: c(x)
            fns[name, "F.conv2d, channels_last"] = lambda x=x_last, c=conv: c(x)
            fns[name, "packed oneDNN, channels_last"] = _packed(conv, x_last)
        if ops.winograd_suits(ops._PackedConv(conv32), x32):
            u, bias = ops.winograd_weight(conv32.weight), conv32.bias
            fns["fp32", "Winograd (the fp32 rule)"] = lambda x=x32, u=u, b=bias: (
                ops.winograd_conv3x3(x, u, b)
            )
        with torch.no_grad():
            seconds = _alternating(fns, repeats)
        flops = 2 * channels * channels * 9 * size * size
        for (name, path), s in seconds.items():
            lines.append(f"{channels:>8} {size:>3}^2  {name:<5} {path:<30} {1e3 * s:>7.2f} "
                         f"{flops / s / 1e9:>8.0f}")  # fmt: skip
            rows.append({"table": "conv", "channels": channels, "size": size, "dtype": name,
                         "path": path, "ms": 1e3 * s})  # fmt: skip
    return lines, rows


def step_table(repeats: int) -> tuple[list[str], list[dict]]:
    """One guided step of the ADM-64 shapes (random weights) per dtype and batch: the UNet
    forward and the classifier's input gradient timed apart, alternately."""
    lines = ["", f"one guided step of 64x64_diffusion + 64x64_classifier, random weights "
             f"({_load()})",
             f"{'batch':>5}  {'dtype':<5} {'UNet ms':>8} {'grad ms':>8} {'ms/step':>8} "
             f"{'vs fp32':>8} {'eps rel err':>12} {'grad rel err':>13}"]  # fmt: skip
    rows = []
    preset = "64x64_diffusion"
    nets = {name: (_random(preset, 0, "cpu", dtype, kernels="auto"),
                   _random(PRESETS[preset].classifier, 1, "cpu", dtype, kernels="auto"))
            for name, dtype in DTYPES.items()}  # fmt: skip
    for batch in (1, 4):
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, 64, 64, generator=gen)
        t = torch.full((batch,), 500)
        y = torch.arange(batch) * 97 % 1000
        eps, grad = {}, {}

        def forward(name, x=x, t=t, y=y, eps=eps):
            with torch.no_grad():
                eps[name] = nets[name][0](x, t, y)[:, :3]

        def gradient(name, x=x, t=t, y=y, grad=grad):
            grad[name] = guidance_fn(nets[name][1], y)(x, t)

        fns = {(part.__name__, n): (lambda part=part, n=n: part(n))
               for n in DTYPES for part in (forward, gradient)}  # fmt: skip
        seconds = _alternating(fns, repeats)
        step = {n: seconds["forward", n] + seconds["gradient", n] for n in DTYPES}
        for name in DTYPES:
            eps_err, grad_err = _rel(eps[name], eps["fp32"]), _rel(grad[name], grad["fp32"])
            ratio = step["fp32"] / step[name]
            lines.append(f"{batch:>5}  {name:<5} {1e3 * seconds['forward', name]:>8.0f} "
                         f"{1e3 * seconds['gradient', name]:>8.0f} {1e3 * step[name]:>8.0f} "
                         f"{ratio:>7.2f}x {eps_err:>12.1e} {grad_err:>13.1e}")  # fmt: skip
            rows.append({"table": "guided step", "batch": batch, "dtype": name,
                         "unet_ms": 1e3 * seconds["forward", name],
                         "grad_ms": 1e3 * seconds["gradient", name],
                         "ms_per_step": 1e3 * step[name], "speedup": ratio,
                         "eps_rel_err": eps_err, "grad_rel_err": grad_err})  # fmt: skip
    return lines, rows


def demo_table(args) -> tuple[list[str], list[dict]]:
    """The demo's guided samples per dtype, batch by batch in turn (sample i has seed (0, i)
    whatever the batch): time, judge accuracy, distance to fp32's images."""
    lines = ["", f"the demo: {args.samples} guided samples, {args.steps}, scale {args.scale}, "
             f"batch {args.batch} ({_load()})",
             f"{'dtype':<5} {'ms/image':>9} {'vs fp32':>8} {'judge acc':>10} "
             f"{'mean |diff|':>12} {'max |diff|':>11}   (pixel levels, 0-255)"]  # fmt: skip
    judge = load_judge()
    diffusion = PRESETS[DEMO_UNET].diffusion
    pipes, seconds, results = {}, dict.fromkeys(DTYPES, 0.0), {n: [] for n in DTYPES}
    for name, dtype in DTYPES.items():
        model = fastsample.load_model(DEMO_UNET, dtype=dtype)
        classifier = fastsample.load_model(DEMO_CLASSIFIER, dtype=dtype)
        pipes[name] = fastsample.Pipeline(model, diffusion, classifier, guidance_scale=args.scale)
        pipes[name].generate(args.batch, batch_size=args.batch, steps=args.steps, progress=False)
    for first in range(0, args.samples, args.batch):
        n = min(args.batch, args.samples - first)
        for name, pipe in pipes.items():
            start = time.perf_counter()
            result = pipe.generate(n, batch_size=n, steps=args.steps, seed=0,
                                   first_index=first, progress=False)  # fmt: skip
            seconds[name] += time.perf_counter() - start
            results[name].append(result)
    rows, images = [], {}
    for name in DTYPES:
        images[name] = np.concatenate([r.images for r in results[name]]).astype(np.int16)
        labels = np.concatenate([r.labels for r in results[name]])
        with torch.no_grad():
            logits = judge(images_to_input(images[name].astype(np.uint8)))
        accuracy = float((logits.argmax(dim=1).numpy() == labels).mean())
        diff = np.abs(images[name] - images["fp32"])
        ms = 1e3 * seconds[name] / args.samples
        ratio = seconds["fp32"] / seconds[name]
        lines.append(f"{name:<5} {ms:>9.1f} {ratio:>7.2f}x {accuracy:>10.3f} "
                     f"{diff.mean():>12.3f} {diff.max():>11d}")  # fmt: skip
        rows.append({"table": "demo", "dtype": name, "ms_per_image": ms, "speedup": ratio,
                     "judge_accuracy": accuracy, "mean_abs_diff": float(diff.mean()),
                     "max_abs_diff": int(diff.max())})  # fmt: skip
    return lines, rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = {"cpu": _cpu_name(), "torch": torch.__version__, "threads": args.threads,
              "onednn_bf16": ops.onednn_dtype(torch.bfloat16), "commit": commit()}  # fmt: skip
    print(" | ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    rows = []
    for table in (lambda: conv_table(args.repeats), lambda: step_table(args.repeats),
                  lambda: demo_table(args)):  # fmt: skip
        lines, new_rows = table()
        print("\n".join([*lines, f"(at the end: {_load()})"]), flush=True)
        rows += new_rows
    if args.json:
        report("cpu_bf16", [], header, rows, json_path=args.json)


if __name__ == "__main__":
    main()
