"""`fastsample eval`: the reference evaluator's metrics of a samples file against a reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cliopts import json_option
from .errors import InputError, MissingFileError


def register(main, one_line_errors) -> None:
    @main.command(
        "eval",
        epilog="""\b
Argument order: the reference evaluator takes the reference batch first
  python evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz
and fastsample takes the samples first, the reference as --ref:
  fastsample eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz
\b
The extractor used is printed first. The reference evaluator (and the paper) use Inception-v3
features: fastsample's "inception" extractor, the default for RGB images of 64 px and up, is that
network (the FID Inception weights, pt_inception-2015-12-05-6726825d.pth, from --inception-weights
or torch.hub's cache). The default for 32x32 images is the demo judge, a digit classifier trained
on clean MNIST. Numbers from different extractors are not comparable with each other: a
reference's stored statistics (mu, sigma, mu_s, sigma_s) are used only with the extractor they
came from (the reference batches': inception).
\b
Samples and references are read batch by batch: .npz files (uncompressed ones memory-mapped) or
folders of PNG / JPEG images of one size.
""",
    )
    @click.argument("samples", type=click.Path())
    @click.option(
        "--ref",
        type=click.Path(),
        help="Reference batch: .npz (arr_0 uint8 NHWC; optional mu, sigma, mu_s, sigma_s) or an "
        "image folder. Default: the demo's 500 held-out digits.",
    )
    @click.option(
        "--extractor",
        default="auto",
        show_default=True,
        help="Feature extractor: auto (judge for 32x32, inception for RGB of 64 px and up), "
        "inception, judge, pixels, or package.module:factory.",
    )
    @click.option(
        "--inception-weights",
        type=click.Path(),
        help="The FID Inception weight file (default: torch.hub's cache, fetched if absent).",
    )
    @click.option(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)."
    )
    @json_option("the figures", "the lines")
    @click.option(
        "--save-ref",
        type=click.Path(),
        help="Also write the reference's statistics and features (naming the extractor) to this "
        ".npz: a --ref later runs read without featurizing the reference again.",
    )
    @click.option(
        "--progress/--no-progress",
        default=None,
        help="Progress bars on stderr (default: when stderr is a terminal).",
    )
    @one_line_errors
    def eval_cmd(samples, ref, extractor, inception_weights, device, json_out, save_ref,
                 progress) -> None:  # fmt: skip
        """Inception Score, FID, sFID, precision and recall of SAMPLES (.npz or image folder)
        against a reference batch, as the reference evaluator defines them; with labels (arr_1)
        and the judge, also the judge's accuracy on the requested classes."""
        from .demo import WEIGHTS_DIR
        from .evaluate import evaluate
        from .jobs import _device

        for path in (samples, ref):
            if path is not None and not Path(path).exists():
                raise MissingFileError(f"{path}: no such file or folder")
        if json_out not in (None, "-") and not Path(json_out).resolve().parent.is_dir():
            raise InputError(f"--json {json_out}: no directory {Path(json_out).parent}")
        if save_ref is not None and not Path(save_ref).resolve().parent.is_dir():
            raise InputError(f"--save-ref {save_ref}: no directory {Path(save_ref).parent}")
        report = evaluate(
            samples,
            ref or WEIGHTS_DIR / "heldout.npz",
            extractor=extractor,
            inception_weights=inception_weights,
            device=None if device is None else _device(device),
            progress=sys.stderr.isatty() if progress is None else progress,
            save_reference=save_ref,
        )
        for note in report.notes:
            click.echo("note: " + note, err=True)
        if json_out == "-":
            click.echo(json.dumps(report.as_dict(), indent=1))
            return
        for line in report.lines():
            click.echo(line)
        if json_out is not None:
            from .image_io import atomic_write

            text = json.dumps(report.as_dict(), indent=1) + "\n"
            atomic_write(Path(json_out), lambda f: f.write(text.encode()))
