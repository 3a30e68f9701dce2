"""DeepCache-style feature caching (fastsample.featcache): what a shallow step costs, and what
caching does to guided samples of the demo.

    python -m bench.feature_cache [--threads 2] [--repeats 5] [--samples 100] [--timing-only]
                                  [--json PATH]

One process, CPU, fp32, the default kernels. Timing: batch 1, torch.inference_mode, t = 500, the
median of the repeats after a warm-up; the full forward and the shallow one at each depth on a
random-weight ADM-64 (64x64_diffusion shapes) and on the demo model. "speed-up n" is the UNet time
per step of a run with cache_interval n against the uncached one, from those times:
n / (1 + (n - 1) * shallow / full). Quality: guided DDIM (ddim25, scale 2) on the demo, classes
0..9 in turn, per-sample seeds, at each interval and depth; the judge's accuracy (share of
samples classified as their label; `fastsample.judge`), the wall time per image (guidance
included; the settings take turns batch by batch), and the mean |x - x(n = 1)| of the samples
against the uncached ones from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastsample
from bench.common import commit
from bench.sample import _random
from fastsample.catalog import DEMO_CLASSIFIER, DEMO_UNET
from fastsample.featcache import full_calls, shallow_flop_share
from fastsample.judge import images_to_input, load_judge


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turn within every repeat after one warm-up each
    (a shared machine's load drifts alike for all of them)."""
    times: dict = {key: [] for key in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def time_depths(name: str, model, depths, repeats: int) -> list[dict]:
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([500])
    y = torch.tensor([1]) if cfg.num_classes is not None else None
    with torch.inference_mode():
        fns = {"full": lambda: model(x, t, y)}
        for depth in depths:
            _, feature = model.forward_split(x, t, y, depth=depth)
            fns[depth] = lambda d=depth, f=feature: model.forward_shallow(
                x, t, y, feature=f, depth=d
            )
        seconds = interleaved_medians(fns, repeats)
    rows = []
    for depth in depths:
        ratio = seconds[depth] / seconds["full"]
        rows.append({
            "model": name, "depth": depth, "full_ms": 1e3 * seconds["full"],
            "shallow_ms": 1e3 * seconds[depth], "time_share": ratio,
            "flop_share": shallow_flop_share(cfg, depth),
            "speedup_2": 2 / (1 + ratio), "speedup_3": 3 / (1 + 2 * ratio),
        })  # fmt: skip
    return rows


def guided_batch(pipe, diffusion, labels, idx: range, interval: int, depth: int | None):
    """Guided DDIM at scale 2 for samples idx (per-sample seeds) -> [len(idx), C, H, W]."""
    cfg = pipe.config
    return fastsample.sample(
        pipe.model, diffusion, (len(idx), cfg.in_channels, cfg.image_size, cfg.image_size),
        y=labels[idx.start : idx.stop], sampler="ddim", classifier=pipe.classifier,
        guidance_scale=2.0, seed=[fastsample.sample_seed(0, i) for i in idx],
        cache_interval=interval, cache_depth=depth,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--depths", default="1,2,3,4", help="depths timed")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--intervals", default="1,2,3")
    parser.add_argument("--quality-depths", default="1,2")
    parser.add_argument("--timing-only", action="store_true", help="skip the judged samples")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    depths = [int(d) for d in args.depths.split(",")]
    print(f"CPU x{torch.get_num_threads()} threads | torch {torch.__version__} | fp32 | "
          f"commit {commit()}")  # fmt: skip

    pipe = fastsample.Pipeline.from_pretrained(DEMO_UNET, DEMO_CLASSIFIER)
    adm64 = _random("64x64_diffusion", 0, "cpu", kernels="auto")
    timing = time_depths("ADM-64 (random)", adm64, depths, args.repeats)
    timing += time_depths("demo-mnist", pipe.model, depths, args.repeats)
    print("\nbatch 1, one forward: full vs shallow")
    print("| model | depth | full ms | shallow ms | shallow/full time | shallow/full FLOPs "
          "| speed-up n=2 | n=3 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in timing:
        print(f"| {r['model']} | {r['depth']} | {r['full_ms']:.1f} | {r['shallow_ms']:.2f} | "
              f"{r['time_share']:.3f} | {r['flop_share']:.3f} | {r['speedup_2']:.2f}x | "
              f"{r['speedup_3']:.2f}x |")  # fmt: skip

    quality: list[dict] = []
    if not args.timing_only:
        quality = judge_settings(pipe, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timing": timing, "quality": quality}, f, indent=2)


def judge_settings(pipe, args) -> list[dict]:
    judge = load_judge()
    settings = [(1, None)] + [
        (n, int(d)) for n in map(int, args.intervals.split(",")) if n > 1
        for d in args.quality_depths.split(",")
    ]  # fmt: skip
    diffusion = pipe.diffusion.respaced("ddim25")
    labels = torch.arange(args.samples) % 10
    outs: dict = {s: [] for s in settings}
    seconds = dict.fromkeys(settings, 0.0)
    # Every setting in turn within each batch, so that a shared machine's load hits all alike.
    for start in range(0, args.samples, args.batch):
        idx = range(start, min(start + args.batch, args.samples))
        for setting in settings:
            start_s = time.perf_counter()
            outs[setting].append(guided_batch(pipe, diffusion, labels, idx, *setting))
            seconds[setting] += time.perf_counter() - start_s
    baseline = torch.cat(outs[settings[0]])
    quality = []
    for (interval, depth), batches in outs.items():
        x = torch.cat(batches)
        with torch.no_grad():
            predicted = judge(images_to_input(fastsample.to_uint8(x).numpy())).argmax(1)
        quality.append({
            "interval": interval, "depth": depth,
            "accuracy": float((predicted == labels).float().mean()),
            "s_per_image": seconds[(interval, depth)] / args.samples,
            "full_calls": full_calls(25, interval),
            "mean_abs_diff": float((x - baseline).abs().mean()),
        })  # fmt: skip
    print(f"\ndemo-mnist, guided ddim25 at scale 2, {args.samples} samples, classes 0..9, "
          f"batch {args.batch}")  # fmt: skip
    print("| cache_interval | cache_depth | full UNet calls | judge accuracy | s/image "
          "| mean abs diff vs n=1 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in quality:
        print(f"| {r['interval']} | {r['depth'] or '-'} | {r['full_calls']}/25 | "
              f"{r['accuracy']:.2f} | {r['s_per_image']:.3f} | "
              f"{r['mean_abs_diff']:.4f} |")  # fmt: skip
    return quality


if __name__ == "__main__":
    main()
