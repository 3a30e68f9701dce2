"""The `fastsample` command: parsing and printing only."""

from __future__ import annotations

import functools
import sys

import click

from .checkpoint import CheckpointError


def _one_line_errors(fn):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, CheckpointError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Fast, exact sampling for OpenAI's ADM (guided-diffusion) checkpoints."""


@main.command("presets")
def presets_cmd() -> None:
    """List the released checkpoints that fastsample knows."""
    from .config import PRESETS

    for name, p in PRESETS.items():
        extra = f"  guided by {p.classifier} at scale {p.classifier_scale}" if p.classifier else ""
        click.echo(f"{name:<26} {p.kind:<10}{extra}")


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
        raise ValueError("give a preset name (see `fastsample presets`) or --flags, not both")
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


if __name__ == "__main__":
    main()
