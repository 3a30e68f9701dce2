"""`fastsample tune` and `fastsample recipes`: the command line of `fastsample.tune` and
`fastsample.recipes` (parsing and printing; the search is in tune.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import InputError, MissingFileError


def tune_job(model, classifier, ref, target, within, budget, out, samples, batch_size, seed,
             device, dtype, extractor, overwrite, log) -> dict:  # fmt: skip
    """The work of `fastsample tune` (the CLI's options, parsed): returns tune's output."""
    import json

    import torch

    from . import __version__
    from .catalog import DEMO_UNET, PRESETS
    from .evaluate import Scorer, resolve_extractor
    from .image_io import atomic_write, file_sha256
    from .jobs import TORCH_DTYPES, _device, identity
    from .pipeline import Pipeline
    from .tune import State, Tuner, parse_budget, parse_target

    goal = parse_target(target, within)
    seconds = parse_budget(budget)
    for name, value in (("--samples", samples), ("--batch-size", batch_size)):
        if value < 1:
            raise InputError(f"{name} {value}: expected a positive integer")
    if samples < 20:
        raise InputError(f"--samples {samples}: expected at least 20 (FID needs many samples; "
                         "1000 or more to tell settings apart within 10%)")  # fmt: skip
    if seed < 0:
        raise InputError(f"--seed {seed}: expected a non-negative integer")
    if model is None:
        model, classifier = DEMO_UNET, classifier or PRESETS[DEMO_UNET].classifier
    if ref is None:
        if model != DEMO_UNET:
            raise InputError("--ref: expected the reference batch .npz to measure FID against")
        from .demo import WEIGHTS_DIR

        ref = WEIGHTS_DIR / "heldout.npz"
    if not Path(ref).is_file():
        raise MissingFileError(f"--ref {ref}: no such file")
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; expected the recipe file to write")
    dev = _device(device)
    from .imagesource import open_images

    ref_source = open_images(ref)
    extractor = resolve_extractor(extractor or "auto", ref_source.shape)
    if extractor != "judge" and any(metric == "accuracy" for metric, _ in goal.bounds):
        raise InputError("--target accuracy: only the judge extractor measures accuracy")
    scorer = Scorer(ref_source, extractor, device=dev)

    def make_pipe(precision: str | None):
        name = precision or (None if dtype == "auto" else dtype)
        torch_dtype = getattr(torch, TORCH_DTYPES[name]) if name else (
            None if dev.type == "cuda" else torch.float32)  # fmt: skip
        return Pipeline.from_pretrained(model, classifier, device=dev, dtype=torch_dtype)

    settings = {
        "model": identity(model),
        "classifier": identity(classifier) if classifier else None,
        "ref": file_sha256(Path(ref)),
        "extractor": extractor,
        "samples": samples,
        "batch": batch_size,
        "seed": seed,
        "device": dev.type,
        "dtype": dtype,
        "fastsample": __version__,
    }
    state_dir = Path(str(out) + ".tune")
    existed = state_dir.exists()
    state = State(state_dir, settings, overwrite)
    try:
        tuner = Tuner(make_pipe, scorer, goal, seconds, state, samples, batch_size, seed, log)
        tuner.run()
    except InputError:
        if not existed and not state.points:  # refused before any measurement: no state left
            import shutil

            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    result = tuner.result()
    text = (json.dumps(result, indent=1) + "\n").encode()
    atomic_write(out, lambda f: f.write(text))
    return result


def register(main, one_line_errors) -> None:
    @main.command(
        "tune",
        epilog="""\b
Example (the embedded demo, 20 minutes, FID within 10% of the reference recipe's and the
judge's accuracy at least 0.95):
  fastsample tune --budget 20m --within 10% --target accuracy=0.95 --out demo_recipe.json
  fastsample sample --recipe demo_recipe.json
Killed, the same command continues from OUT.tune/ (the samples and figures so far).
""",
    )
    @click.option("--model", help="Checkpoint file or preset name (default: the embedded demo).")
    @click.option("--classifier", help="Guidance classifier: checkpoint file or preset name.")
    @click.option("--ref", help="Reference batch .npz (default for the demo: its held-out digits).")
    @click.option(
        "--target",
        help="Absolute bounds: fid=X, accuracy=Y, precision=P, recall=R (comma-separated).",
    )
    @click.option(
        "--within",
        help="FID at most this much above the reference recipe's, e.g. "
        "10% (the default without --target).",
    )
    @click.option(
        "--budget",
        default="30m",
        show_default=True,
        help="Wall time to spend, counting earlier runs of this tune: 90s, 20m, 1.5h.",
    )
    @click.option(
        "--out",
        default="recipe.json",
        show_default=True,
        help="The recipe file; its state directory is OUT.tune.",
    )
    @click.option(
        "--samples",
        type=int,
        default=1000,
        show_default=True,
        help="Samples per setting at the full count (a quarter first).",
    )
    @click.option(
        "--batch-size",
        type=int,
        default=50,
        show_default=True,
        help="The batch size the wall time is measured at.",
    )
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)."
    )
    @click.option(
        "--dtype",
        type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
        default="auto",
        show_default=True,
        help="Both networks' precision (GPU: also tried per setting).",
    )
    @click.option(
        "--extractor",
        help="Feature extractor for FID (default: judge for 32x32, inception for RGB of 64 px "
        "and up).",
    )
    @click.option("--overwrite", is_flag=True, help="Discard OUT.tune's state of other settings.")
    @click.option("--quiet", is_flag=True, help="No line per measured setting.")
    @one_line_errors
    def tune_cmd(model, classifier, ref, target, within, budget, out, samples, batch_size, seed,
                 device, dtype, extractor, overwrite, quiet) -> None:  # fmt: skip
        """Measure speed against quality for a model on this device and write the fastest
        recipe that meets the target (and every measured point) to OUT."""

        def log(line: str) -> None:
            if not quiet:
                click.echo(line, err=True)

        result = tune_job(model, classifier, ref, target, within, budget, out, samples,
                          batch_size, seed, device, dtype, extractor, overwrite, log)  # fmt: skip
        rec = result["recipe"]
        if rec is None:
            click.echo(f"no measured setting met the target ({result['target']}); the "
                       f"{len(result['points'])} points are in {out}")  # fmt: skip
            return
        from .recipes import from_json

        fig, ref_fig = rec["figures"], rec["figures"]["reference"]
        acc = (f", accuracy {fig['accuracy']:.3f} ({ref_fig['accuracy']:.3f})"
               if "accuracy" in fig else "")  # fmt: skip
        click.echo(
            f"chosen: {from_json(rec).describe()}: {fig['ms_per_image']:.1f} ms/image "
            f"({fig['ms_per_image'] / ref_fig['ms_per_image']:.2f}x the reference recipe's "
            f"{ref_fig['ms_per_image']:.1f}), FID {fig['fid']:.2f} ({ref_fig['fid']:.2f}){acc} "
            f"on {fig['samples']} samples; wrote {out} (use: fastsample sample --recipe {out})"
        )

    @main.command("recipes")
    @click.option("--model", help="Checkpoint file or preset name (default: the embedded demo).")
    @one_line_errors
    def recipes_cmd(model) -> None:
        """The named recipes of a model: what each sets and where it comes from."""
        from . import recipes
        from .catalog import DEMO_UNET, PRESETS

        name = model or DEMO_UNET
        if name not in PRESETS:
            if not Path(name).is_file():
                raise MissingFileError(f"--model {name}: neither a preset nor a file")
            from .checkpoint import load_model

            name = load_model(name).preset
            if name not in PRESETS:
                raise InputError(f"--model {model}: no preset matches it, so no recipe is named "
                                 "for it; measure one with `fastsample tune`")  # fmt: skip
        preset = PRESETS[name]
        for rec_name in recipes.NAMES:
            try:
                rec = recipes.load(rec_name, name)
            except InputError as e:
                click.echo(f"{rec_name}: {e}")
                continue
            text = rec.describe()
            if rec_name == "reference":
                steps = preset.diffusion.timestep_respacing if preset.diffusion else "?"
                text = f"{preset.sampler}, steps {steps}, scale {preset.classifier_scale}"
            default = " (the default)" if preset.recipe == rec_name else ""
            click.echo(f"{rec_name}{default}: {text}")
            click.echo(f"    {rec.source}")
