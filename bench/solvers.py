"""Network calls per image against quality: every sampler at 5-25 calls on the embedded demo.

    python -m bench.solvers [--samples 1000] [--calls 5,8,10,15,20,25] [--out bench/solvers.md]

For each sampler and each number of network (UNet) calls, guided at the demo's scale with the
pipeline's defaults (stable guidance): judge accuracy, FID and precision/recall on the demo
judge's features against the 500 held-out digits (not comparable with Inception FIDs), wall time
per image on this CPU and the classifier calls per image. Deterministic and stochastic solvers
run on the log-SNR time schedule; the reference samplers also on their own respacings (ddpm "N",
ddim "ddimN"). Then the time column for random-weight ADM-64 and ADM-256 shapes: one guided step
(UNet forward, classifier gradient) timed at batch 1, times the calls.

Two passes. Quality does not depend on the machine's load: each setting's figures are saved to
`--rows` (JSON) as soon as they are measured, and a rerun with the same sample count continues
from there (stop it at any time). Wall times do: they are measured afterwards in a short pass of
their own (`--time-samples` images per setting at `--batch`, median of `--time-repeats`), so run
that on an idle machine (`--time-only` redoes just that pass). The Markdown says with which
settings and commits every figure was measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

import fastsample
from fastsample import Pipeline
from fastsample import sampler as solvers
from fastsample.catalog import DEMO_UNET, PRESETS
from fastsample.demo import WEIGHTS_DIR
from fastsample.evaluate import evaluate

from .common import check_positive, median_seconds, parse_calls
from .common import commit as head_commit

# (sampler, schedule, respacing pattern): "{n}" is the number of calls
SETTINGS = [
    ("ddpm", "respace", "{n}"),
    ("ddim", "respace", "ddim{n}"),
    ("ddim", "logsnr", "{n}"),
    ("dpm++2m", "logsnr", "{n}"),
    ("dpm++3m", "logsnr", "{n}"),
    ("dpm++2m-sde", "logsnr", "{n}"),
    ("unipc", "logsnr", "{n}"),
    ("unipc3", "logsnr", "{n}"),
    ("ipndm", "logsnr", "{n}"),
]


def _generate(pipe, n, batch, sampler, schedule, steps, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-line advisories; the table shows the result
        return pipe.generate(n, batch_size=batch, seed=0, progress=False, sampler=sampler,
                             steps=steps, schedule=schedule, guidance_scale=scale)  # fmt: skip


def _quality(pipe, n, batch, sampler, schedule, steps, scale) -> dict:
    result = _generate(pipe, n, batch, sampler, schedule, steps, scale)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "s.npz", result.images, result.labels)
        r = evaluate(Path(tmp) / "s.npz", WEIGHTS_DIR / "heldout.npz")
    return {"accuracy": r.accuracy, "fid": r.fid, "precision": r.precision, "recall": r.recall}


def _step_ms(preset: str, classifier: str, repeats: int) -> tuple[float, float]:
    """(UNet forward, classifier gradient) ms at batch 1 for random weights of a preset."""
    from fastsample.netfns import guidance_fn, model_fn

    unet = fastsample.create_model(preset, "cpu").eval()
    clf = fastsample.create_model(classifier, "cpu").eval()
    size = unet.config.image_size
    x = torch.randn(1, unet.config.in_channels, size, size)
    t = torch.tensor([500])
    y = torch.tensor([1]) if unet.config.num_classes else None
    model, grad = model_fn(unet, y), guidance_fn(clf, torch.tensor([1]))
    with torch.inference_mode():
        unet_s = median_seconds(lambda: model(x, t), repeats)
    clf_s = median_seconds(lambda: grad(x, t), repeats)
    return unet_s * 1e3, clf_s * 1e3


def _key(sampler: str, schedule: str, steps: str) -> str:
    return f"{sampler}|{schedule}|{steps}"


def _load_rows(path: Path, samples: int) -> dict:
    """Saved quality rows measured with this sample count ({} when none or another count)."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"--rows {path}: not JSON ({e}); move it away to start afresh") from None
    if saved.get("samples") != samples:
        return {}
    return saved.get("rows", {})


def _save_rows(path: Path, samples: int, rows: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"samples": samples, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)  # a stop mid-write never leaves a half-written file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--calls", default="5,8,10,15,20,25")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per ADM shape")
    parser.add_argument("--time-samples", type=int, default=50, help="images per timed run")
    parser.add_argument("--time-repeats", type=int, default=3, help="timed runs per setting")
    parser.add_argument("--time-only", action="store_true", help="redo only the timing pass")
    parser.add_argument("--samplers", default=None, help="comma-separated subset of samplers")
    parser.add_argument("--rows", type=Path, default=Path("bench/solvers.rows.json"))
    parser.add_argument("--out", type=Path, default=Path("bench/solvers.md"))
    args = parser.parse_args()
    calls = parse_calls(parser, args.calls)
    check_positive(
        parser, args, ("samples", "batch", "time_samples", "time_repeats", "repeats", "threads")
    )
    settings = SETTINGS
    if args.samplers:
        wanted = args.samplers.split(",")
        unknown = sorted(set(wanted) - set(solvers.SAMPLERS))
        if unknown:
            parser.error(f"--samplers: unknown {', '.join(unknown)}")
        settings = [s for s in SETTINGS if s[0] in wanted]
    torch.set_num_threads(args.threads)
    commit = head_commit()
    pipe = Pipeline.from_pretrained(DEMO_UNET, PRESETS[DEMO_UNET].classifier)
    scale = PRESETS[DEMO_UNET].classifier_scale
    grid = [(sampler, schedule, pattern.format(n=n), n)
            for sampler, schedule, pattern in settings for n in calls]  # fmt: skip

    rows = _load_rows(args.rows, args.samples)
    for sampler, schedule, steps, n in grid:
        key = _key(sampler, schedule, steps)
        diffusion = pipe.diffusion.respaced(steps, time_schedule=schedule)
        clf = solvers.guidance_plan(sampler, diffusion, stable=True).classifier_calls
        if key in rows:
            continue
        if args.time_only:
            raise SystemExit(f"--time-only: no saved quality for {key} in {args.rows}")
        q = _quality(pipe, args.samples, args.batch, sampler, schedule, steps, scale)
        rows[key] = {**q, "calls": n, "classifier_calls": clf, "commit": commit}
        _save_rows(args.rows, args.samples, rows)
        print(f"{sampler:12s} {schedule:8s} {steps:7s} acc {q['accuracy']:.3f} "
              f"FID {q['fid']:6.2f} P {q['precision']:.3f} R {q['recall']:.3f} clf {clf}",
              flush=True)  # fmt: skip

    print("timing pass (run it on an idle machine)", flush=True)
    for sampler, schedule, steps, _ in grid:
        run = partial(_generate, pipe, args.time_samples, args.batch, sampler, schedule, steps,
                      scale)  # fmt: skip
        sec = median_seconds(run, args.time_repeats)
        rows[_key(sampler, schedule, steps)]["ms_per_image"] = sec / args.time_samples * 1e3
        print(f"{sampler:12s} {schedule:8s} {steps:7s} {sec / args.time_samples * 1e3:6.1f} "
              "ms/image", flush=True)  # fmt: skip

    shapes = {}
    for preset, classifier in (("64x64_diffusion", "64x64_classifier"),
                               ("256x256_diffusion", "256x256_classifier")):  # fmt: skip
        shapes[preset] = _step_ms(preset, classifier, args.repeats)
        print(f"{preset}: UNet {shapes[preset][0]:.0f} ms, classifier gradient "
              f"{shapes[preset][1]:.0f} ms (batch 1)", flush=True)  # fmt: skip
    ordered = [(s, sch, st, rows[_key(s, sch, st)]) for s, sch, st, _ in grid]
    _write(args, commit, scale, ordered, shapes)
    print(f"wrote {args.out}")


def _write(args, commit, scale, rows, shapes) -> None:
    (u64, c64), (u256, c256) = shapes["64x64_diffusion"], shapes["256x256_diffusion"]
    quality_commits = ", ".join(sorted({row["commit"] for *_, row in rows}))
    lines = [
        "# Network calls against quality (embedded demo)",
        "",
        f"Measured by `python -m bench.solvers --samples {args.samples} --calls {args.calls}` "
        f"on the CPU with {args.threads} threads, guided at scale {scale:g} with the pipeline's "
        f"stable guidance, seed 0. Quality at commit {quality_commits}, times at commit "
        f"{commit}. FID, precision and recall on the demo judge's features against the 500 "
        "held-out digits (not comparable with Inception FIDs); accuracy: the share the judge "
        "reads as the requested class. Demo ms/image: median of "
        f"{args.time_repeats} runs of {args.time_samples} images at batch {args.batch}. The ADM "
        "columns are ms per image at batch 1 from one timed guided step of random-weight ADM-64 "
        f"(UNet {u64:.0f} ms, classifier gradient {c64:.0f} ms) and ADM-256 (UNet {u256:.0f} "
        f"ms, classifier gradient {c256:.0f} ms): calls x UNet + classifier calls x gradient.",
        "",
        "| sampler | schedule | steps | calls | classifier calls | accuracy | FID | precision "
        "| recall | demo ms/image | ADM-64 ms/image | ADM-256 s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sampler, schedule, steps, r in rows:
        n, clf = r["calls"], r["classifier_calls"]
        t64 = n * u64 + clf * c64
        t256 = (n * u256 + clf * c256) / 1e3
        lines.append(
            f"| {sampler} | {schedule} | {steps} | {n} | {clf} | {r['accuracy']:.3f} "
            f"| {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['ms_per_image']:.1f} | {t64:.0f} | {t256:.1f} |"
        )
    ten = [row for row in rows if row[3]["calls"] == 10]
    if ten:
        best = min(ten, key=lambda row: row[3]["fid"])
        lines += ["", f"Best at 10 calls by FID: {best[0]} on {best[1]} ({best[2]}): accuracy "
                      f"{best[3]['accuracy']:.3f}, FID {best[3]['fid']:.2f}."]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
