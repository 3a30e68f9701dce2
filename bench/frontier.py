"""The speed-quality frontier of the embedded demo on this CPU, and what each recipe costs at
ADM-64 and ADM-256 shapes.

    python -m bench.frontier [--samples 2000] [--calls 6,10,15,25] [--batch 50] [--threads 2]
                             [--rows bench/frontier.rows.json] [--out docs/frontier.md]
                             [--time-only] [--recipes-only]

1. Quality: the demo's recipes (reference: 25 ancestral steps guided every step at scale 2, the
   paper's strided 25-step setting; balanced; fast) and every sampler at `--calls` network calls
   (ddpm on the reference's respacing, the others on log-SNR times, guided at scale 2), each on
   the same `--samples` seeds: FID, precision and recall on the demo judge's features against
   the 500 held-out digits (not comparable with Inception FIDs), and the judge's accuracy. Rows
   are saved as they are measured (`--rows`); a rerun continues.
2. Wall time: one pass over every point in this process, on an idle machine, alternating the
   points each repeat: ms per image, median of `--time-repeats` runs of `--time-samples` images
   at `--batch`. Ratios are against the reference recipe of the same pass.
3. ADM shapes (random weights, FLOPs counted on the meta device): per recipe, the UNet calls
   (full and shallow), the classifier calls and the predicted time per image at the FLOP floor
   of an H100 (989 TFLOP/s dense bf16).

Writes the Markdown (`--out`) and its picture (`--out` with .png): FID against ms/image, a
curve per sampler, the Pareto front, the reference and fast recipes marked. The done-when
lines (fast: at most a third of the reference's time, FID at most 1.1x, accuracy >= 0.95) are
printed and written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from fastsample import Pipeline, featcache, recipes
from fastsample.catalog import DEMO_UNET, PRESETS
from fastsample.demo import WEIGHTS_DIR
from fastsample.evaluate import Scorer
from fastsample.guidance import guidance_plan
from fastsample.recipes import Recipe

from .common import check_positive, parse_calls
from .common import commit as head_commit

H100_FLOPS = 989e12  # dense fp16/bf16, datasheet
CURVES = [("ddpm", "respace"), ("ddim", "logsnr"), ("dpm++2m", "logsnr"),
          ("dpm++3m", "logsnr"), ("dpm++2m-sde", "logsnr"), ("unipc", "logsnr"),
          ("unipc3", "logsnr"), ("ipndm", "logsnr")]  # fmt: skip
DTYPES = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}  # fmt: skip


def demo_recipes(scale: float) -> dict[str, Recipe]:
    out = {"reference": Recipe("ddpm", "25", guidance_scale=scale, name="reference")}
    for name in ("balanced", "fast"):
        out[name] = recipes.load(name, DEMO_UNET)
    return out


def points(calls: list[int], scale: float, only_recipes: bool) -> dict[str, Recipe]:
    """Every point of the plot by its label: the recipes first."""
    out = {f"recipe:{k}": r for k, r in demo_recipes(scale).items()}
    if not only_recipes:
        for sampler, schedule in CURVES:
            for n in calls:
                out[f"{sampler}:{n}"] = Recipe(sampler, str(n), schedule, guidance_scale=scale)
    return out


class Pipes:
    def __init__(self):
        self._pipes = {}

    def __call__(self, dtype: str | None) -> Pipeline:
        if dtype not in self._pipes:
            self._pipes[dtype] = Pipeline.from_pretrained(
                DEMO_UNET, PRESETS[DEMO_UNET].classifier, dtype=DTYPES[dtype]
            )
        return self._pipes[dtype]


def _generate(pipes: Pipes, rec: Recipe, n: int, batch: int, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the advisories; the table shows the result
        return pipes(rec.dtype).generate(n, batch_size=batch, seed=seed, progress=False,
                                         recipe=rec)  # fmt: skip


def calls_of(rec: Recipe, preset: str) -> dict[str, int]:
    """Network calls per image of a recipe on a preset's diffusion (without building it)."""
    diffusion = PRESETS[preset].diffusion.respaced(rec.steps, time_schedule=rec.schedule)
    plan = guidance_plan(rec.sampler, diffusion, rec.guidance_interval, rec.guidance_every,
                         rec.stable_guidance)  # fmt: skip
    n = diffusion.num_steps
    full = featcache.full_calls(n, rec.cache_interval)
    guided = rec.guidance_scale is None or rec.guidance_scale != 0
    return {"unet": n, "unet_full": full, "unet_shallow": n - full,
            "classifier": plan.classifier_calls if guided else 0}  # fmt: skip


def adm_flops(preset: str, classifier: str) -> dict[str, float]:
    """FLOPs at batch 1 (meta device): UNet forward, its shallow part's share (depth 1), the
    classifier's forward + input gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastsample import create_model
    from fastsample.summary import count_flops

    unet = create_model(preset, device="meta", dtype=torch.float32)
    unet_flops, _ = count_flops(unet, unet.config)
    # The classifier's forward and input gradient (as netfns.log_prob_grad computes it; taken
    # with respect to a non-leaf copy of x: the counter's module hooks refuse a leaf there).
    clf = create_model(classifier, device="meta", dtype=torch.float32).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    size = clf.config.image_size
    leaf = torch.zeros(1, clf.config.in_channels, size, size, device="meta", requires_grad=True)
    x = leaf * 1.0
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        logits = clf(x, t)
        torch.autograd.grad(logits.log_softmax(-1)[:, 0].sum(), x)
    share = featcache.shallow_flop_share(unet.config, featcache.DEFAULT_DEPTH)
    return {"unet": unet_flops, "shallow_share": share, "classifier": counter.get_total_flops()}


def predicted_ms(calls: dict[str, int], f: dict[str, float]) -> float:
    flops = (calls["unet_full"] + calls["unet_shallow"] * f["shallow_share"]) * f["unet"]
    flops += calls["classifier"] * f["classifier"]
    return flops / H100_FLOPS * 1e3


def _front(rows: dict[str, dict]) -> set[str]:
    front, best = set(), float("inf")
    for label, row in sorted(rows.items(), key=lambda kv: (kv[1]["ms_per_image"], kv[1]["fid"])):
        if row["fid"] < best:
            front.add(label)
            best = row["fid"]
    return front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--calls", default="6,10,15,25")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-samples", type=int, default=50)
    parser.add_argument("--time-repeats", type=int, default=3)
    parser.add_argument("--time-only", action="store_true", help="redo only the timing pass")
    parser.add_argument("--recipes-only", action="store_true", help="only the three recipes")
    parser.add_argument("--rows", type=Path, default=Path("bench/frontier.rows.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/frontier.md"))
    args = parser.parse_args()
    calls = parse_calls(parser, args.calls)
    check_positive(parser, args, ("samples", "batch", "time_samples", "time_repeats", "threads"))
    torch.set_num_threads(args.threads)
    commit = head_commit()
    scale = PRESETS[DEMO_UNET].classifier_scale
    grid = points(calls, scale, args.recipes_only)
    pipes = Pipes()
    saved = json.loads(args.rows.read_text()) if args.rows.is_file() else {}
    rows = saved.get("rows", {}) if saved.get("samples") == args.samples else {}

    def save() -> None:
        tmp = args.rows.with_suffix(".tmp")
        tmp.write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1) + "\n")
        tmp.replace(args.rows)

    scorer = Scorer(WEIGHTS_DIR / "heldout.npz", "judge")
    for label, rec in grid.items():
        if label in rows and rows[label]["recipe"] == rec.knobs():
            continue
        if args.time_only:
            raise SystemExit(f"--time-only: no saved quality for {label} in {args.rows}")
        start = time.perf_counter()
        g = _generate(pipes, rec, args.samples, args.batch)
        quality_ms = (time.perf_counter() - start) / args.samples * 1e3
        fig = scorer(g.images, g.labels)
        rows[label] = {**fig, "recipe": rec.knobs(), "calls": calls_of(rec, DEMO_UNET),
                       "quality_pass_ms": quality_ms, "commit": commit}  # fmt: skip
        save()
        print(f"{label:22s} FID {fig['fid']:7.2f} acc {fig['accuracy']:.3f} "
              f"P {fig['precision']:.3f} R {fig['recall']:.3f} ({quality_ms:.1f} ms/image "
              "while measuring)", flush=True)  # fmt: skip

    print("timing pass (run it on an idle machine)", flush=True)
    times = {label: [] for label in grid}
    for rec in grid.values():  # warm-up: each precision's networks and every shape
        _generate(pipes, rec, min(args.batch, args.time_samples), args.batch)
    for _ in range(args.time_repeats):
        for label, rec in grid.items():
            start = time.perf_counter()
            _generate(pipes, rec, args.time_samples, args.batch)
            times[label].append((time.perf_counter() - start) / args.time_samples * 1e3)
    for label in grid:
        rows[label]["ms_per_image"] = statistics.median(times[label])
        rows[label]["time_commit"] = commit
    save()

    flops = {
        p: adm_flops(p, c)
        for p, c in (
            ("64x64_diffusion", "64x64_classifier"),
            ("256x256_diffusion", "256x256_classifier"),
        )
    }
    shown = {label: rows[label] for label in grid}
    lines, verdict = _write(args, commit, grid, shown, flops, scale)
    for line in verdict:
        print(line)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def _adm_recipes(demo: dict[str, Recipe]) -> list[tuple[str, str, Recipe]]:
    """(shape, label, recipe) rows of the ADM table: the paper's headline setting, each shipped
    ImageNet recipe, and the demo's recipes' knobs at the preset's scale."""
    out = []
    for preset, family in (("64x64_diffusion", "imagenet-64"), ("256x256_diffusion",
                                                               "imagenet-256")):  # fmt: skip
        scale = PRESETS[preset].classifier_scale
        ref = Recipe(PRESETS[preset].sampler, PRESETS[preset].diffusion.timestep_respacing,
                     guidance_scale=scale)  # fmt: skip
        out.append((preset, "reference (README: 250 ancestral steps)", ref))
        out.append(
            (
                preset,
                "paper: ddim25, guided every step",
                Recipe("ddim", "ddim25", guidance_scale=scale),
            )
        )
        for name in ("balanced", "fast"):
            out.append((preset, f"{family} {name} (provisional)", recipes.load(name, preset)))
        for name, rec in demo.items():
            knobs = replace(rec, guidance_scale=scale, dtype=None)
            out.append((preset, f"demo {name} knobs", knobs))
    return out


def _describe(rec: dict) -> str:
    return Recipe(**rec).describe()


def _write(args, commit, grid, rows, flops, scale) -> tuple[list[str], list[str]]:
    front = _front(rows)
    ref = rows["recipe:reference"]
    fast = rows["recipe:fast"]
    verdict = [
        f"fast / reference wall time: {fast['ms_per_image'] / ref['ms_per_image']:.3f} "
        f"({fast['ms_per_image']:.1f} / {ref['ms_per_image']:.1f} ms/image; target <= 1/3, "
        "stretch 1/5)",
        f"fast / reference FID: {fast['fid'] / ref['fid']:.3f} ({fast['fid']:.2f} / "
        f"{ref['fid']:.2f}; target <= 1.1)",
        f"fast judge accuracy: {fast['accuracy']:.3f} (reference {ref['accuracy']:.3f}; "
        "target >= 0.95)",
    ]
    commits = sorted({r["commit"] for r in rows.values()})
    lines = [
        "# The speed-quality frontier (embedded demo, this CPU)",
        "",
        f"Measured by `python -m bench.frontier --samples {args.samples} --calls {args.calls}` "
        f"with {args.threads} threads: quality at commit {', '.join(commits)}, wall times at "
        f"commit {commit} in one pass (median of {args.time_repeats} runs of "
        f"{args.time_samples} images at batch {args.batch}, the points alternating). Every "
        f"point uses the same {args.samples} seeds and is guided at scale {scale:g}. FID, "
        "precision and recall on the demo judge's features against the 500 held-out digits "
        "(not comparable with Inception FIDs); accuracy: the share the judge reads as the "
        "requested class.",
        "",
        "![FID against wall time per image](frontier.png)",
        "",
        *(
            [
                "Only the three recipes were measured in this run (`--recipes-only`): the sampler "
                "curves are still to be measured.",
                "",
            ]
            if not any(":" in k and not k.startswith("recipe:") for k in rows)
            else []
        ),
        "## The demo's recipes",
        "",
        *[f"- {line}" for line in verdict],
        "",
        "| point | setting | UNet calls (full + shallow) | classifier calls | FID | accuracy "
        "| precision | recall | ms/image | x reference | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in sorted(rows.items(), key=lambda kv: kv[1]["ms_per_image"]):
        c = row["calls"]
        lines.append(
            f"| {label} | {_describe(row['recipe'])} | {c['unet_full']} + {c['unet_shallow']} "
            f"| {c['classifier']} | {row['fid']:.2f} | {row['accuracy']:.3f} "
            f"| {row['precision']:.3f} | {row['recall']:.3f} | {row['ms_per_image']:.1f} "
            f"| {row['ms_per_image'] / ref['ms_per_image']:.2f} "
            f"| {'yes' if label in front else ''} |"
        )
    demo = {k.split(":", 1)[1]: Recipe(**rows[k]["recipe"]) for k in rows
            if k.startswith("recipe:")}  # fmt: skip
    lines += [
        "",
        "## At ADM-64 and ADM-256 shapes (random weights)",
        "",
        "Network calls per image and the predicted time per image at the FLOP floor of an H100 "
        "(989 TFLOP/s dense bf16; FLOPs counted at batch 1 on the meta device; a shallow step "
        "costs its share of a full forward). Not measured: no GPU has run these.",
        "",
    ]
    for preset, f in flops.items():
        lines.append(f"- {preset}: UNet forward {f['unet'] / 1e12:.3f} TFLOP, shallow part "
                     f"{f['shallow_share']:.1%} of it, classifier forward + input gradient "
                     f"{f['classifier'] / 1e12:.3f} TFLOP")  # fmt: skip
    lines += ["", "| shape | recipe | setting | UNet calls (full + shallow) | classifier calls "
              "| predicted ms/image at 989 TFLOP/s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for preset, label, rec in _adm_recipes(demo):
        c = calls_of(rec, preset)
        lines.append(f"| {preset} | {label} | {rec.describe()} | {c['unet_full']} + "
                     f"{c['unet_shallow']} | {c['classifier']} | "
                     f"{predicted_ms(c, flops[preset]):.1f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    _plot(args.out.with_suffix(".png"), rows, front)
    return lines, verdict


def _plot(path: Path, rows: dict[str, dict], front: set[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for sampler, _ in CURVES:
        pts = sorted((r["ms_per_image"], r["fid"]) for k, r in rows.items()
                     if k.startswith(f"{sampler}:"))  # fmt: skip
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, lw=1, label=sampler)
    fr = sorted((rows[k]["ms_per_image"], rows[k]["fid"]) for k in front)
    ax.step(
        *zip(*fr, strict=True), where="post", color="black", lw=2, alpha=0.5, label="Pareto front"
    )
    for name, marker, color in (("reference", "*", "red"), ("fast", "*", "green"),
                                ("balanced", "D", "blue")):  # fmt: skip
        row = rows.get(f"recipe:{name}")
        if row is not None:
            ax.scatter(
                [row["ms_per_image"]],
                [row["fid"]],
                marker=marker,
                s=220,
                color=color,
                zorder=5,
                edgecolor="black",
                label=f"{name}: {row['ms_per_image']:.0f} ms, FID {row['fid']:.1f}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time per image on this CPU (ms, batch 50, 2 threads)")
    ax.set_ylabel("FID (demo judge features; lower is better)")
    ax.set_title("Embedded demo: FID against time per image, guided at scale 2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
