"""The `fastsample sample` options that click does not parse itself: their help texts, and their
values parsed into a `jobs.SampleRequest`'s, a bad one refused in one InputError line that names
the option (the CLI prints it and exits with code 2)."""

from __future__ import annotations

import math

import click

from .errors import InputError

SCHEDULE_LINES = """
\b
Time schedules (--schedule; the last three take a step count N, --steps 10, and fractional t):
  respace  the timesteps --steps keeps, as the reference respaces (the default)
  time     N times uniform in t, from 0 to T - 1
  logsnr   N times uniform in log-SNR, lambda = log(alpha / sigma)
  karras   N times at Karras et al.'s rho = 7 noise levels, sigma = sqrt(1 / alpha_bar - 1)
"""

# sigma(t) = sqrt(1 - alpha_bar(t)) of the two noise schedules at T = 1000 (checked against
# fastsample.schedule by tests/test_guidance_budget.py).
GUIDANCE_LINES = """
\b
Guidance budget: --guidance-interval LO,HI computes the classifier gradient only at steps whose
original timestep t (0 .. T - 1) lies in [LO, HI]; the noise level at t is
sigma = sqrt(1 - alpha_bar(t)), at T = 1000:
  t        0     100   200   300   400   500   600   700   800   900   999
  linear   0.010 0.324 0.586 0.778 0.898 0.960 0.987 0.997 0.999 1.000 1.000
  cosine   0.006 0.169 0.320 0.463 0.595 0.713 0.813 0.893 0.952 0.988 1.000
--guidance-every K computes it at every K-th guided step and reuses it in between. The run
reports the classifier and UNet calls per image (progress bar, last line, OUT/run.json).
"""


class SamplerChoice(click.Choice):
    """click.Choice over `fastsample.sampler.SAMPLERS`, read where first needed: the sampler
    module imports torch, which `fastsample presets` or `fastsample -h` need not load."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self):
        from .sampler import SAMPLERS

        return SAMPLERS

    @choices.setter
    def choices(self, value) -> None:  # (click.Choice.__init__ assigns it)
        pass


def json_option(what: str, beside: str):
    """--json [PATH]: the report as JSON to PATH (the usual output still printed), or alone:
    JSON only, on stdout (as "-")."""
    return click.option(
        "--json",
        "json_out",
        is_flag=False,
        flag_value="-",
        default=None,
        metavar="[PATH]",
        help=f"Write {what} as JSON to PATH ({beside} still goes to stdout), or alone: JSON "
        "only, to stdout.",
    )


def budget_options(command):
    """The guidance-budget and feature-cache options of `fastsample sample` (strings, parsed by
    the functions below: click's own errors take several lines)."""
    options = [
        click.option(
            "--guidance-interval",
            metavar="LO,HI",
            help="Guide only at original timesteps t in [LO, HI], e.g. 0,600 (below).",
        ),
        click.option(
            "--guidance-every",
            metavar="K",
            help="Compute the classifier gradient at every K-th guided step; reuse it between "
            "(default 1).",
        ),
        click.option(
            "--stable-guidance/--reference-guidance",
            default=None,
            help="Stable (the default): skip guidance where alpha_bar < 1e-6 (the cosine "
            "schedule's last timesteps), where it turns the samples of every sampler but ddpm "
            "into noise (one line says so); reference: guide there too, as the reference does.",
        ),
        click.option(
            "--cache-interval",
            metavar="N",
            help="Feature caching (DeepCache): the whole UNet at every N-th step, only its "
            "shallow blocks in between, reusing the deep feature; 1: no caching (default).",
        ),
        click.option(
            "--cache-depth",
            metavar="D",
            help="Skip depth of the reused deep feature (default 1: the cheapest shallow step).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def parse_classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"--classes {text!r}: expected comma-separated integer labels such as 207,360"
        ) from None


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """--guidance-interval LO,HI -> (lo, hi) original timesteps, 0 <= lo <= hi."""
    if text is None:
        return None
    expected = "expected LO,HI: two original timesteps with 0 <= LO <= HI, such as 0,600"
    parts = text.split(",")
    try:
        lo, hi = (float(part) for part in parts)
    except ValueError:
        raise InputError(f"--guidance-interval {text!r}: {expected}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise InputError(f"--guidance-interval {text!r}: {expected}")
    return lo, hi


def parse_count(option: str, text: str | None) -> int | None:
    """A positive integer option (None where not given)."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"{option} {text!r}: expected a positive integer")
    return value


def runtime_option(runtime: str | None, backend: str | None) -> str | None:
    """--runtime, or the deprecated --backend it replaces (for one release)."""
    if backend is None:
        return runtime
    if runtime is not None and runtime != backend:
        raise InputError(f"--runtime {runtime} and --backend {backend} disagree: give --runtime")
    click.echo("warning: --backend is deprecated; use --runtime", err=True)
    return backend


def calls_line(calls: dict[str, int] | None) -> str:
    """The network calls per image, for the command's last line ('' where unknown)."""
    if not calls:
        return ""
    unet = f"{calls['unet']} UNet calls"
    if "unet_full" in calls:
        unet += f" ({calls['unet_full']} full, {calls['unet_shallow']} shallow)"
    return f"; per image: {unet}, {calls['classifier']} classifier calls"
