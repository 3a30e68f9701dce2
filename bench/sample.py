"""Classifier-guided sampling, reference-style eager vs fastsample, per image.

    python -m bench.sample [--presets 64x64_diffusion 128x128_diffusion 256x256_diffusion]
                           [--batch 1 32] [--steps ddim25] [--device cuda|cpu]
                           [--dtype auto|fp32|fp16|bf16] [--json FILE] [--markdown FILE]

Both paths run in one process on the same random weights (never zeros) and the same noise:

- reference-style eager: what the reference implementation computes. The torch ops op for op
  (einsum attention over every query, GroupNorm, SiLU and scale-shift as separate ops), the
  README's precision on CUDA (fp16 torso where use_fp16; fp32 on the CPU, which has no fast
  fp16 convolutions; --dtype overrides both paths), and its guidance: autograd through
  the whole classifier with trainable parameters and gradient-checkpointed attention blocks,
  so the attention is recomputed in the backward pass and its parameter gradients computed;
- fastsample: on CUDA the fast engine (Triton kernels, two streams, a CUDA graph per step,
  fused updates, input gradient only, first-query attention pool, channels_last); on the CPU
  the default path that `fastsample.sample` and the CLI use (the onednn backend: pre-packed
  convolutions, Winograd on wide 16x16 to 32x32 maps, the input gradient as packed
  convolutions, fused token attention, channels_last).

Printed per preset and batch: ms per image, images/s, peak memory (CUDA), the ratio to the
baseline and the share of the FLOP floor (the step's FLOPs at the peak rate measured in the same
run: a matmul in the torso's dtype on CUDA, a wide fp32 convolution on the CPU). Random weights
(drawn on the device): timings only, the images mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastsample
from bench.common import commit, randomize, report, sync
from fastsample.catalog import PRESETS
from fastsample.unet import AttentionBlock


def _random(preset: str, seed: int, device, dtype=None, kernels="torch"):
    """A preset with random weights (drawn on the device), its torso in dtype (None: the
    README's precision on CUDA, float32 on the CPU, where there are no fast fp16 convolutions)."""
    device = torch.device(device)
    net = fastsample.create_model(preset, device=device, dtype=torch.float32, kernels="torch")
    randomize(net, seed)
    net.set_precision(dtype or readme_dtype(preset, device))
    return net.set_kernels(kernels).eval()


def readme_dtype(preset: str, device: torch.device) -> torch.dtype:
    """The README's precision (fp16 torso where use_fp16) on CUDA; float32 on the CPU."""
    fp16 = getattr(PRESETS[preset].network, "use_fp16", False)
    return torch.float16 if fp16 and torch.device(device).type == "cuda" else torch.float32


class _Recomputed(torch.autograd.Function):
    """Forward without saving activations; backward recomputes and differentiates with respect
    to the input and every parameter of the block (the reference's checkpointed attention)."""

    @staticmethod
    def forward(ctx, forward, n_params, x, *params):
        ctx.fn = forward
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = ctx.fn(x_in)
            grads = torch.autograd.grad(out, [x_in, *params], grad_out, allow_unused=True)
        return (None, None, *grads)


def reference_style(classifier: torch.nn.Module) -> torch.nn.Module:
    """The reference's classifier as cond_fn differentiates it: trainable parameters, attention
    blocks gradient-checkpointed (recomputed in backward, parameter gradients computed)."""
    classifier.requires_grad_(True)
    for block in classifier.modules():
        if isinstance(block, AttentionBlock):
            forward = block.forward
            params = list(block.parameters())

            def checkpointed(x, forward=forward, params=params):
                return _Recomputed.apply(forward, len(params), x, *params)

            block.forward = checkpointed
    return classifier


def _floor_rate(device, dtype=torch.float16) -> float:
    """The FLOP/s the machine reaches, measured now (best of five timings, so that a busy
    moment does not lower the floor): a large matmul in the torso's dtype on CUDA (random
    data, never zeros); on the CPU a wide 3x3 convolution (channels_last, on oneDNN), which
    runs faster there than torch's fp32 matmul."""
    cuda = device.type == "cuda"
    if cuda:
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        b = torch.randn(8192, 8192, device=device, dtype=dtype)
        flops, reps = 2 * 8192**3, 10

        def op():
            return a @ b
    else:
        x = torch.randn(1, 512, 32, 32).contiguous(memory_format=torch.channels_last)
        w = torch.randn(512, 512, 3, 3).contiguous(memory_format=torch.channels_last)
        flops, reps = 2 * 32 * 32 * 512 * 512 * 9, 3

        def op():
            return torch.nn.functional.conv2d(x, w, padding=1)

    for _ in range(2):
        op()
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            op()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return flops * reps / best


def _step_flops(preset: str, classifier: str | None) -> float:
    """Batch-1 FLOPs of one guided step: the UNet forward, plus the classifier's forward and
    input gradient (twice its forward: no weight-gradient products)."""
    from fastsample.summary import summarize

    flops = summarize(preset).flops
    if classifier:
        flops += 2 * summarize(classifier).flops
    return float(flops)


def _make_run(path, preset_name, clf_name, device, diffusion, shape, y, noise, scale, dtype):
    """A function that samples one batch on the given path (its networks built here)."""
    if path == "fastsample" and device.type == "cuda":
        from fastsample.engine import FastEngine

        model = _random(preset_name, 0, device, dtype, kernels="auto")
        clf = _random(clf_name, 1, device, dtype, kernels="auto") if clf_name else None
        engine = FastEngine(model, clf)
        y_model = y if model.config.num_classes is not None else None

        def run():
            return engine.sample(
                "ddim", diffusion, lambda k: noise[k], y=y, model_y=y_model,
                guidance_scale=scale if engine.classifier else 0.0,
            )  # fmt: skip

        run.weight_bytes = _weight_bytes(model, clf)
        return run
    # The reference's arithmetic and guidance, or on the CPU the default path that
    # fastsample.sample and the CLI use (load_model's kernels).
    kernels = "torch" if path == "reference" else "auto"
    model = _random(preset_name, 0, device, dtype, kernels=kernels)
    clf = _random(clf_name, 1, device, dtype, kernels=kernels) if clf_name else None
    if clf is not None and path == "reference":
        clf = reference_style(clf)

    def run():
        return fastsample.sample(
            model, diffusion, shape, y=y, sampler="ddim", classifier=clf,
            guidance_scale=scale if clf else 0.0, noise=noise,
        )  # fmt: skip

    run.weight_bytes = _weight_bytes(model, clf)
    return run


def _weight_bytes(*nets) -> int:
    return sum(
        t.numel() * t.element_size()
        for net in nets if net is not None
        for t in (*net.parameters(), *net.buffers())
    )  # fmt: skip


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["64x64_diffusion"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", default="ddim25")
    parser.add_argument("--scale", type=float, default=2.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per path, alternating (median)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="the torso's precision; auto: the README's on CUDA (fp16 where use_fp16), fp32 on CPU",
    )  # fmt: skip
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--markdown", help="append a markdown table here")
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        parser.error(f"--presets {unknown}: expected some of {sorted(PRESETS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rates, dtypes = {}, set()
    rows = []
    for preset_name in args.presets:
        preset = PRESETS[preset_name]
        dtype = DTYPES.get(args.dtype) or readme_dtype(preset_name, device)
        dtypes.add(str(dtype).removeprefix("torch."))
        if dtype not in rates:
            rates[dtype] = _floor_rate(device, dtype)
        rate = rates[dtype]
        clf_name = preset.classifier
        diffusion = preset.diffusion.respaced(args.steps)
        cfg = preset.network
        flops = _step_flops(preset_name, clf_name) * diffusion.num_steps
        for batch in args.batch:
            shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
            gen = torch.Generator().manual_seed(batch)
            noise = torch.randn(diffusion.num_steps + 1, *shape, generator=gen).to(device)
            classes = cfg.num_classes or 1000
            y = (torch.arange(batch) % classes).to(device)
            runs = {}
            for path in ("reference", "fastsample"):
                runs[path] = _make_run(path, preset_name, clf_name, device, diffusion, shape, y,
                                       noise, args.scale, DTYPES.get(args.dtype))  # fmt: skip
            # Warm-ups (compile kernels, capture graphs, pack weights), then the timed runs
            # alternate between the paths so that both see the same machine conditions.
            times = {path: [] for path in runs}
            finals, peaks = {}, {}
            cuda = device.type == "cuda"
            for path, run in runs.items():
                if cuda:  # peak = this path's weights + the most its run allocates on top
                    held = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                run()
                sync(device)
                if cuda:
                    extra = torch.cuda.max_memory_allocated(device) - held
                    peaks[path] = (run.weight_bytes + extra) / 2**20
                else:
                    peaks[path] = None
            for _ in range(args.repeats):
                for path, run in runs.items():
                    sync(device)
                    start = time.perf_counter()
                    finals[path] = run()
                    sync(device)
                    times[path].append(time.perf_counter() - start)
            results = {}
            for path in runs:
                seconds = statistics.median(times[path])
                results[path] = {
                    "ms_per_image": seconds / batch * 1e3,
                    "images_per_s": batch / seconds,
                    "peak_mib": peaks[path],
                    "floor_share": flops * batch / rate / seconds,
                    "final": finals[path].float().cpu(),
                }
            del runs
            base = results["reference"]
            for path, r in results.items():
                err = ((r["final"] - base["final"]).abs().max() / base["final"].abs().max()).item()
                rows.append({
                    "preset": preset_name, "batch": batch, "path": path,
                    "dtype": str(dtype).removeprefix("torch."),
                    "ms_per_image": r["ms_per_image"], "images_per_s": r["images_per_s"],
                    "peak_mib": r["peak_mib"],
                    "speedup": base["ms_per_image"] / r["ms_per_image"],
                    "floor_share": r["floor_share"], "rel_err_vs_reference": err,
                })  # fmt: skip
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"{card}; {torch.get_num_threads()} CPU threads; guided {args.steps}, scale "
        f"{args.scale}; torso {'/'.join(sorted(dtypes))}; peak rate "
        f"{'/'.join(f'{r / 1e12:.2f}' for r in rates.values())} TFLOP/s (measured matmul or "
        f"conv in that dtype); torch {torch.__version__}; commit {commit()}"
    )
    lines = [
        header,
        "",
        "| preset | batch | path | ms/image | images/s | peak MiB | x reference | of FLOP floor "
        "| rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else ""
        lines.append(
            f"| {r['preset']} | {r['batch']} | {r['path']} | {r['ms_per_image']:.1f} | "
            f"{r['images_per_s']:.2f} | {peak} | {r['speedup']:.2f} | "
            f"{r['floor_share'] * 100:.1f}% | {r['rel_err_vs_reference']:.1e} |"
        )
    report("sample", lines, header, rows, args.json, args.markdown)


if __name__ == "__main__":
    main()
