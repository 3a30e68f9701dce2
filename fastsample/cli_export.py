"""`fastsample export` and `fastsample verify`: parsing and printing only (see fastsample.jobs
and fastsample.export)."""

from __future__ import annotations

import json
import sys

import click

from .cliopts import SCHEDULE_LINES

DTYPES = ["fp32", "fp16", "bf16"]
SCHEDULES = ["respace", "time", "logsnr", "karras"]


def register(main, one_line_errors) -> None:
    @main.command(
        "export",
        epilog="""\b
Examples:
  # the demo model and its classifier as ONNX graphs, then check them:
  fastsample export --out demo-onnx && fastsample verify demo-onnx
  # ImageNet 256 with its classifier, fp16 torso, TensorRT engines for batch 1..16:
  fastsample export --target tensorrt --model 256x256_diffusion.pt \\
      --classifier 256x256_classifier.pt --dtype fp16 --max-batch 16 --out adm256-trt
  # AOTInductor packages for the native runner (fastsample-run):
  fastsample export --target aoti --steps ddim25 --out demo-aoti
  # the demo's fast recipe (ancestral, 12 steps, classifier every 3rd step, bf16 graphs),
  # which `fastsample sample --model demo-fast` and fastsample-run then run by default:
  fastsample export --target aoti --recipe fast --out demo-fast
"""
        + SCHEDULE_LINES,
    )
    @click.option(
        "--target",
        type=click.Choice(["onnx", "tensorrt", "aoti"]),
        default="onnx",
        show_default=True,
        help="onnx: opset-21 graphs; tensorrt: engines built from them; aoti: AOTInductor .pt2.",
    )
    @click.option(
        "--model", help="Checkpoint file or preset name (default: the embedded demo-mnist model)."
    )
    @click.option(
        "--classifier",
        help="Guidance classifier (default with the demo model: its classifier; 'none': no "
        "gradient graph).",
    )
    @click.option(
        "--recipe",
        help="fast, balanced, reference or a recipe file: the run the export is made for (its "
        "steps, schedule, scale and precision unless given; its sampler and guidance budget "
        "become the export's defaults).",
    )
    @click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        help="Torso precision of the graphs (default: the recipe's, else fp32; GroupNorm "
        "statistics and softmax stay fp32; bf16 ONNX graphs use opset 22).",
    )
    @click.option(
        "--max-batch",
        type=int,
        default=64,
        show_default=True,
        help="Largest batch (TensorRT optimization profile; recorded for the others).",
    )
    @click.option(
        "--steps",
        help="Respacing written to schedule.json: 'ddim25' (the default without a recipe), "
        "'250', ...; a step count N (default 25) under a time schedule (--schedule).",
    )
    @click.option("--schedule", type=click.Choice(SCHEDULES),
                  help="Sampling times written to schedule.json (below; default: the recipe's, "
                  "else respace).")  # fmt: skip
    @click.option("--scale", type=float, help="Guidance scale recorded as the export's default.")
    @click.option(
        "--device",
        default=None,
        help="aoti: the device the packages will run on (default: cuda if present, else cpu).",
    )
    @click.option("--out", "out_dir", required=True, help="Output directory (new or empty).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing export in --out.")
    @one_line_errors
    def export_cmd(target, model, classifier, recipe, dtype, max_batch, steps, schedule, scale,
                   device, out_dir, overwrite) -> None:  # fmt: skip
        """Export the UNet and the classifier-guidance gradient as deployable graphs, with
        schedule.json and manifest.json (sha256 of every file)."""
        from . import jobs

        request = jobs.ExportRequest(
            out=out_dir,
            target=target,
            model=model,
            classifier=classifier,
            dtype=dtype,
            max_batch=max_batch,
            steps=steps,
            schedule=schedule,
            scale=scale,
            device=device,
            overwrite=overwrite,
            recipe=recipe,
        )
        out = jobs.export(request, log=lambda line: click.echo(line, err=True))
        files = json.loads((out / "manifest.json").read_text())["files"]
        click.echo(f"wrote {out}: " + ", ".join(sorted(files)) + ", manifest.json")

    @main.command("verify")
    @click.argument("directory", type=click.Path())
    @click.option(
        "--model", help="Where the model's weights are now (default: the manifest's source)."
    )
    @click.option("--classifier", help="Where the classifier's weights are now.")
    @click.option(
        "--tolerance", type=float, help="Relative tolerance (default: by the export dtype)."
    )
    @click.option("--seed", type=int, default=0, show_default=True)
    @one_line_errors
    def verify_cmd(directory, model, classifier, tolerance, seed) -> None:
        """Check an export: sha256 of every file, then every graph against eager PyTorch on
        random inputs at batch 1 and 5. Exits 1 on a hash mismatch or an error beyond
        tolerance."""
        from .errors import IntegrityError
        from .export.verify import verify

        try:
            checks = verify(
                directory,
                model=model,
                classifier=classifier,
                tolerance=tolerance,
                seed=seed,
                log=click.echo,
            )
        except IntegrityError as e:
            click.echo(f"FAILED: {e}", err=True)
            sys.exit(1)
        failed = [c for c in checks if not c.ok]
        if failed:
            click.echo(f"FAILED: {len(failed)} of {len(checks)} checks beyond tolerance", err=True)
            sys.exit(1)
        click.echo(f"PASSED: {len(checks)} checks")
