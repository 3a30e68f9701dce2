"""The `fastsample` command: parsing and printing only."""

from __future__ import annotations

import functools
import json
import sys
import warnings

import click

from . import cli_eval, cli_export, cli_tune
from .cliopts import (
    GUIDANCE_LINES,
    SCHEDULE_LINES,
    SamplerChoice,
    budget_options,
    calls_line,
    json_option,
    parse_classes,
    parse_count,
    parse_interval,
    runtime_option,
)
from .errors import FastsampleError, InputError


def _one_line_errors(fn):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        def show(message, category, filename, lineno, file=None, line=None):
            from tqdm import tqdm  # (its write() puts the line above a progress bar, not on it)

            tqdm.write("warning: " + " ".join(str(message).splitlines()), file=sys.stderr)

        previous, warnings.showwarning = warnings.showwarning, show
        try:
            return fn(*args, **kwargs)
        except FastsampleError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        finally:
            warnings.showwarning = previous

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fast, exact sampling for OpenAI's ADM (guided-diffusion) checkpoints."""


@main.command("presets")
def presets_cmd() -> None:
    """List the released checkpoints with their README settings."""
    from .catalog import PRESETS

    for name, p in PRESETS.items():
        if p.diffusion is None:
            click.echo(f"{name:<26} classifier  {p.network.image_size}x{p.network.image_size}")
            continue
        d = p.diffusion
        line = (
            f"{name:<26} {p.kind:<10}  {p.network.image_size}x{p.network.image_size}, "
            f"{d.noise_schedule}, steps {d.timestep_respacing} ({p.sampler})"
        )
        if d.time_schedule != "respace":
            line += f", {d.time_schedule} schedule"
        if p.classifier:
            line += f", guided by {p.classifier} at scale {p.classifier_scale}"
        if p.low_res_size:
            line += f", from {p.low_res_size}x{p.low_res_size}"
        click.echo(line)


@main.command("info")
@click.argument("preset", required=False)
@click.option(
    "--flags",
    help="Build from README script flags instead of a preset, e.g. "
    "'--image_size 256 --num_channels 256 --attention_resolutions 32,16,8 ...'.",
)
@click.option(
    "--network",
    type=click.Choice(["unet", "superres", "classifier"]),
    default="unet",
    show_default=True,
    help="Which network --flags describe.",
)
@_one_line_errors
def info_cmd(preset: str | None, flags: str | None, network: str) -> None:
    """Describe a network: parameters, FLOPs of one forward, attention layout."""
    from .config import (
        classifier_config_from_flags,
        super_res_config_from_flags,
        unet_config_from_flags,
    )
    from .summary import format_summary, summarize

    if (preset is None) == (flags is None):
        raise InputError("give a preset name (see `fastsample presets`) or --flags, not both")
    if flags is not None:
        parse = {
            "unet": unet_config_from_flags,
            "superres": super_res_config_from_flags,
            "classifier": classifier_config_from_flags,
        }[network]
        target = parse(flags)
    else:
        target = preset
    click.echo(format_summary(summarize(target)))


_DTYPES, _SCHEDULES = cli_export.DTYPES, cli_export.SCHEDULES


@main.command(
    "sample",
    epilog="""\b
Examples:
  # the paper's headline recipe (ImageNet 256, ADM-G, 25 DDIM steps, scale 2.5):
  fastsample sample --model 256x256_diffusion.pt --classifier 256x256_classifier.pt \\
      --steps ddim25 --scale 2.5 --num-samples 64 --batch-size 16 --device cuda
  # the README's 250-step ancestral sampling of the unconditional model, guided at 10:
  fastsample sample --model 256x256_diffusion_uncond.pt \\
      --classifier 256x256_classifier.pt --scale 10 --steps 250
  # the embedded demo: 64 guided MNIST digits on the CPU in well under a minute:
  fastsample sample
  # upsample a base model's samples 64 -> 256:
  fastsample sample --model 64_256_upsampler.pt --low-res out64/samples.npz
"""
    + SCHEDULE_LINES
    + GUIDANCE_LINES,
)
@click.option(
    "--model",
    "model",
    help="Checkpoint file or preset name (default: the embedded demo-mnist model, guided by "
    "its classifier).",
)
@click.option("--classifier", help="Guidance classifier: checkpoint file or preset name.")
@click.option(
    "--scale",
    type=float,
    help="Classifier guidance scale (default: the preset's README scale, else 1.0).",
)
@click.option(
    "--steps",
    help="Respacing: '250', 'ddim25', '10,10,5', ... (default: the preset's README); a step "
    "count N under a time schedule (--schedule).",
)
@click.option(
    "--schedule",
    type=click.Choice(_SCHEDULES),
    default=None,
    help="Sampling times: respace (the default; an export directory: its own), time, logsnr or "
    "karras (below).",
)
@click.option(
    "--sampler",
    type=SamplerChoice(),
    help="Sampler (default: the preset's without --steps; else ddim for 'ddimN', else ddpm).",
)
@budget_options
@click.option(
    "--recipe",
    metavar="NAME|FILE",
    help="Every sampling knob at once: fast, balanced, reference (the preset's own setting) "
    "or a `fastsample tune` file; options given beside it win over its fields (below).",
)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM stochasticity.")
@click.option("--num-samples", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--classes", help="Class labels, used in turn: '207' or '1,2,3' (default: random).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses (seed, i).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", *_DTYPES]),
    default="auto",
    show_default=True,
    help="Both networks' torso precision; auto = the README's on CUDA, fp32 on CPU.",
)
@click.option(
    "--low-res",
    type=click.Path(dir_okay=False),
    help="Upsamplers: .npz of low-resolution images (arr_0 NHWC uint8, arr_1 labels).",
)
@click.option(
    "--runtime",
    type=click.Choice(["eager", "onnxruntime", "tensorrt", "aoti"]),
    default=None,
    help="Run the networks eagerly (default) or as exported graphs (exported once into the "
    "cache); with --model EXPORT_DIR, default: the export's own runtime.",
)
@click.option(
    "--backend",
    type=click.Choice(["eager", "onnxruntime", "tensorrt", "aoti"]),
    default=None,
    hidden=True,
    help="Deprecated: --runtime.",
)
@click.option(
    "--kernels",
    type=click.Choice(["auto", "torch", "triton", "onednn"]),
    default="auto",
    show_default=True,
    help="Kernels of the eager networks: auto = triton on CUDA where Triton is installed, "
    "onednn on the CPU, else torch (the reference's operations).",
)
@click.option("--out", "out_dir", default="samples", show_default=True, help="Output directory.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a run in --out made with other settings (default: resume a run with the "
    "same settings, refuse one with others).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_one_line_errors
def sample_cmd(model, classifier, scale, steps, schedule, sampler, guidance_interval,
               guidance_every, stable_guidance, cache_interval, cache_depth, recipe, eta,
               num_samples,
               batch_size, classes, seed, device, dtype, low_res, runtime, backend, kernels,
               out_dir, overwrite, quiet) -> None:  # fmt: skip
    """Generate images into OUT: shards, then OUT/samples.npz (arr_0 NHWC uint8, arr_1 labels)
    and OUT/grid.png. Rerunning the same command resumes an interrupted run; under torchrun
    the batches are spread over the processes. --model also takes a `fastsample export`
    directory."""
    from pathlib import Path

    from . import jobs

    request = jobs.SampleRequest(
        model=model,
        classifier=classifier,
        scale=scale,
        steps=steps,
        schedule=schedule,
        sampler=sampler,
        eta=eta,
        num_samples=num_samples,
        batch_size=batch_size,
        classes=parse_classes(classes),
        seed=seed,
        device=device,
        dtype=dtype,
        low_res=low_res,
        runtime=runtime_option(runtime, backend),
        kernels=kernels,
        out=out_dir,
        overwrite=overwrite,
        guidance_interval=parse_interval(guidance_interval),
        guidance_every=parse_count("--guidance-every", guidance_every),
        stable_guidance=stable_guidance,
        cache_interval=parse_count("--cache-interval", cache_interval),
        cache_depth=parse_count("--cache-depth", cache_depth),
        recipe=recipe,
    )
    done = jobs.sample(request, progress=not quiet, log=lambda line: click.echo(line, err=True))
    if not done.complete:
        return  # a torchrun rank other than 0: rank 0 merges and reports
    if done.generated == 0 and done.resumed == num_samples:
        message = (
            f"{Path(out_dir)} holds this run complete: {num_samples} images in "
            f"{done.paths['npz']} and {done.paths['grid']}"
        )
    else:
        message = f"wrote {num_samples} images to {done.paths['npz']} and {done.paths['grid']}"
        if done.resumed:
            message += f" ({done.resumed} were already there)"
    if done.labels is not None:
        distinct = sorted(set(done.labels.tolist()))
        shown = ",".join(map(str, distinct)) if len(distinct) <= 10 else f"{len(distinct)} classes"
        message += f" (labels: {shown})"
    click.echo(message + calls_line(done.calls))


@main.command(
    "doctor",
    epilog="""\b
Examples:
  fastsample doctor                          # the table, to paste into a bug report
  fastsample doctor --json report.json       # the table, and the same as JSON in a file
  fastsample doctor --json                   # JSON only, on stdout
  fastsample doctor --sizes 64 --runtimes onnxruntime   # time ONNX Runtime too (exports first)
""",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present).")
@click.option(
    "--sizes",
    default="64,256",
    show_default=True,
    help="Image sizes of the presets to time one guided step at: 64, 128, 256, 512.",
)
@click.option(
    "--runtimes",
    default="eager",
    show_default=True,
    help="Runtimes to time, comma-separated, or all: eager (always timed), onnxruntime, "
    "tensorrt, aoti (each exports first into a temporary cache: minutes on a CPU).",
)
@json_option("the report", "the table")
@_one_line_errors
def doctor_cmd(device, sizes, runtimes, json_out) -> None:
    """Print the environment, check fastsample's paths on this machine (the GPU self-check, or
    the CPU checks), time one guided step per size and runtime, and give a verdict. Exits 0 when
    everything usable works, 1 naming what failed."""
    from pathlib import Path

    from . import doctor

    if json_out not in (None, "-") and not Path(json_out).resolve().parent.is_dir():
        raise InputError(f"--json {json_out}: no directory {Path(json_out).parent} to write it in")
    report = doctor.diagnose(
        device,
        doctor.parse_sizes(sizes),
        doctor.parse_runtimes(runtimes),
        log=lambda line: click.echo(f"doctor: {line}", err=True),
    )
    if json_out == "-":
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        if json_out is not None:
            Path(json_out).write_text(json.dumps(report.to_json(), indent=1) + "\n")
        click.echo(report.table())
    if not report.ok:
        click.echo(f"doctor: {report.verdict()}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

cli_eval.register(main, _one_line_errors)
cli_tune.register(main, _one_line_errors)
cli_export.register(main, _one_line_errors)
