"""One classifier-guided sampling step on eager PyTorch, ONNX Runtime and AOTInductor.

    python -m bench.export [--model demo-mnist] [--batch 1 4] [--device cpu|cuda]
                           [--runtimes eager onnxruntime aoti] [--dtype fp32] [--json FILE]

One process: the networks are exported (ONNX, AOTInductor for --device) into a scratch
directory, then for each runtime and batch size a guided step (the UNet forward plus the
classifier's input gradient, which is what a guided DDIM step spends its time on) is timed as
the median of --repeats runs after a warm-up, and a whole guided DDIM run (--steps) is timed per
step. Ratios are against eager PyTorch measured in the same run. Before timing, each runtime's
samples are compared with eager's from the same noise (max error relative to the sample scale).

Default model: the embedded demo (32x32, trained weights). --model takes any preset (random
weights where none ship) or a checkpoint file; big models take minutes to compile for AOTI.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import fastsample
from bench.common import commit, median_seconds, randomize
from fastsample.catalog import PRESETS
from fastsample.pipeline import _load_network


def _network(spec: str, role: str, seed: int) -> torch.nn.Module:
    """A checkpoint or a preset with shipped weights; other presets get random weights that are
    never zero (the reference zero-initialises output layers, which would time on zeros)."""
    if spec in PRESETS and not PRESETS[spec].weights and not Path(spec).exists():
        return randomize(fastsample.create_model(spec, dtype=torch.float32), seed).eval()
    return _load_network(spec, "cpu", torch.float32, role)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-mnist")
    parser.add_argument("--classifier", default=None, help="default: the preset's classifier")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--runtimes",
        "--backends",  # (the old name)
        dest="runtimes",
        nargs="+",
        default=["eager", "onnxruntime", "aoti"],
        choices=["eager", "onnxruntime", "aoti", "tensorrt"],
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--steps", default="ddim10", help="respacing of the whole-run timing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and ORT)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from fastsample.export import ExportedGraphs, export
    from fastsample.export.bundle import DTYPES

    dtype = DTYPES[args.dtype]
    model = _load_network(args.model, "cpu", torch.float32, "model")
    clf_spec = args.classifier or (
        PRESETS[args.model].classifier if args.model in PRESETS else None
    )
    classifier = _load_network(clf_spec, "cpu", torch.float32, "classifier") if clf_spec else None
    cfg = model.config
    diffusion = PRESETS[args.model].diffusion if args.model in PRESETS else fastsample.Diffusion()
    diffusion = diffusion.respaced(args.steps)
    scale = 2.0 if classifier is not None else 0.0

    graphs = {}
    with tempfile.TemporaryDirectory() as scratch:
        export_seconds = {}
        for runtime in args.runtimes:
            if runtime == "eager":
                continue
            target = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt"}[runtime]
            start = time.perf_counter()
            out = export(
                model,
                diffusion,
                Path(scratch) / target,
                classifier=classifier,
                target=target,
                dtype=args.dtype,
                max_batch=max(args.batch),
                device=device,
            )
            export_seconds[runtime] = time.perf_counter() - start
            ort_device = "cpu" if runtime == "onnxruntime" and device.type == "cpu" else None
            graphs[runtime] = ExportedGraphs(out, runtime=runtime, device=ort_device)
        eager_model = model.to(device).set_precision(dtype)
        eager_clf = classifier.to(device).set_precision(dtype) if classifier else None

        rows = []
        for batch in args.batch:
            shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
            gen = torch.Generator().manual_seed(batch)
            noise = torch.randn(diffusion.num_steps + 1, *shape, generator=gen)
            y = (torch.arange(batch) % (cfg.num_classes or 10)).long()
            needs_y = cfg.num_classes is not None or classifier is not None
            x = noise[0]
            t = torch.full((batch,), float(diffusion.model_timesteps()[-1]))
            results = {}
            for runtime in args.runtimes:
                if runtime == "eager":
                    from fastsample.export.graphs import unet_graph
                    from fastsample.netfns import guidance_fn

                    dev = device
                    net_module = unet_graph(eager_model)
                    guide = guidance_fn(eager_clf, y.to(dev)) if eager_clf else None

                    def step(net_module=net_module, guide=guide, dev=dev, x=x, t=t, y=y):
                        xs, ts, ys = x.to(dev), t.to(dev), y.to(dev)
                        with torch.no_grad():
                            out = net_module(xs, ts, ys) if cfg.num_classes else net_module(xs, ts)
                        if guide is not None:
                            guide(xs, ts)
                        return out

                    run_model, run_kwargs = eager_model, {"classifier": eager_clf}
                else:
                    g = graphs[runtime]
                    dev = g.device
                    net = g.model_fn(y=y.to(dev) if cfg.num_classes else None)

                    def step(g=g, net=net, dev=dev, x=x, t=t, y=y):
                        xs, ts = x.to(dev), t.to(dev)
                        out = net(xs, ts)
                        if g.classifier_grad is not None:
                            g.classifier_grad(xs, ts, y.to(dev))
                        return out

                    run_model, run_kwargs = g, {}
                step_s = median_seconds(step, args.repeats, dev)
                kwargs = dict(
                    y=y.to(dev) if needs_y else None,
                    sampler="ddim",
                    guidance_scale=scale,
                    noise=noise.to(dev),
                    runtime=runtime,
                    **run_kwargs,
                )

                def whole(run_model=run_model, kwargs=kwargs, shape=shape):
                    return fastsample.sample(run_model, diffusion, shape, **kwargs)

                final = whole()
                run_s = median_seconds(whole, max(1, args.repeats // 5), dev)
                results[runtime] = {
                    "guided_step_ms": step_s * 1e3,
                    "run_ms_per_step": run_s / diffusion.num_steps * 1e3,
                    "device": str(dev),
                    "final": final.float().cpu(),
                }
            base = results.get("eager")
            for runtime, r in results.items():
                err = None
                if base is not None:
                    err = (r["final"] - base["final"]).abs().max() / base["final"].abs().max()
                    err = err.item()
                row = {
                    "batch": batch,
                    "runtime": runtime,
                    "device": r["device"],
                    "guided_step_ms": round(r["guided_step_ms"], 3),
                    "run_ms_per_step": round(r["run_ms_per_step"], 3),
                    "speedup_vs_eager": (
                        round(base["guided_step_ms"] / r["guided_step_ms"], 3) if base else None
                    ),
                    "sample_rel_err_vs_eager": err,
                }
                rows.append(row)

    header = {
        "model": args.model,
        "classifier": clf_spec,
        "dtype": args.dtype,
        "steps": args.steps,
        "device": _device_name(device),
        "torch": torch.__version__,
        "commit": commit(),
        "export_seconds": {k: round(v, 1) for k, v in export_seconds.items()},
    }
    print(json.dumps(header))
    print(
        f"{'batch':>5} {'runtime':<12} {'device':<8} {'guided step ms':>15} "
        f"{'run ms/step':>12} {'x eager':>8} {'rel err':>9}"
    )
    for r in rows:
        speed = "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"
        err = "" if r["sample_rel_err_vs_eager"] is None else f"{r['sample_rel_err_vs_eager']:.1e}"
        print(
            f"{r['batch']:>5} {r['runtime']:<12} {r['device']:<8} {r['guided_step_ms']:>15.2f} "
            f"{r['run_ms_per_step']:>12.2f} {speed:>8} {err:>9}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
