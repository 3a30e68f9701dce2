"""`fastsample doctor`: one report of a machine that a user can paste into a bug report.

It says what the machine has (versions, devices, runtimes), whether fastsample's paths work on it,
and how long one classifier-guided sampling step takes at the released 64x64 and 256x256 presets
(random weights, batch 1, the preset's guidance scale; the model, the classifier's gradient and
the update) on each runtime asked for.

- On CUDA the checks are the fast paths' own first-use self-check (`fastsample.selfcheck`): its
  verdicts are forgotten first, so the timed guided steps check every component again on the
  shape classes they run, and the verdicts are read back.
- On the CPU there is no Triton path: the checks compare the onednn kernels with the torch kernels
  (the reference's operations) at fp32 on the embedded demo networks, and sample a few guided
  steps.

A check that FAILED, or a runtime that is installed, asked for and fails, makes the verdict
"FAILED" naming it; a runtime that is absent is reported, not failed.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable

import torch

from . import ops, selfcheck
from .diagnostics import cpu_checks, environment, runtime_problem
from .errors import InputError
from .sampling import RUNTIMES
from .selfcheck import Check

SIZES = (64, 128, 256, 512)  # the released resolutions that come with a guidance classifier
DEFAULT_SIZES = (64, 256)
Log = Callable[[str], None]


@dataclasses.dataclass
class Timing:
    """One guided step of a preset on one runtime: ms per step (the median of `repeats` runs of
    `steps` steps after a warm-up run that took first_s), or the note saying why it was not
    timed; failed: the runtime was asked for, is installed, and broke."""

    size: int | None
    runtime: str
    dtype: str = ""
    ms: float | None = None
    first_s: float | None = None
    steps: int = 0
    repeats: int = 0
    peak_gib: float | None = None
    note: str = ""
    failed: bool = False


@dataclasses.dataclass
class Report:
    device: str
    environment: dict[str, str]
    checks_title: str
    checks: list[Check]
    timings: list[Timing]
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        bad = [c.component + (f" ({c.shape_class})" if c.shape_class.strip("-") else "")
               for c in self.checks if c.status == "FAILED"]  # fmt: skip
        return bad + [f"{t.runtime} {t.size}x{t.size}" for t in self.timings if t.failed]

    @property
    def ok(self) -> bool:
        return not self.failed

    def verdict(self) -> str:
        return "OK" if self.ok else "FAILED: " + ", ".join(self.failed)

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "environment": self.environment,
            "checks": {"title": self.checks_title, "records": [c.to_json() for c in self.checks]},
            "timings": [dataclasses.asdict(t) for t in self.timings],
            "failed": self.failed,
            "ok": self.ok,
            "verdict": self.verdict(),
            "seconds": round(self.seconds, 1),
        }

    def table(self) -> str:
        lines = [f"fastsample doctor ({self.device}, {self.seconds:.0f} s)", "", "environment"]
        width = max(map(len, self.environment))
        lines += [f"  {k:<{width}}  {v}" for k, v in self.environment.items()]
        lines += ["", f"checks: {self.checks_title}"]
        rows = [(c.component, c.shape_class, c.use, c.status + (" (cached)" if c.cached else ""),
                 _pairs(c.err, "{:.1e}"), _pairs(c.ms, "{:.1f}")) for c in self.checks]  # fmt: skip
        lines += _columns(("component", "shape class", "use", "status", "rel. error", "ms"), rows)
        lines += [f"    {c.component}: {c.error}" for c in self.checks if c.error]
        lines += [
            "",
            "one guided step: model, classifier gradient and update (batch 1, random weights, "
            "DDIM at the preset's guidance scale)",
            "first run: the warm-up, with any export, compilation and self-check",
        ]
        peak = any(t.peak_gib is not None for t in self.timings)
        rows = []
        for t in self.timings:
            note = ("FAILED: " if t.failed else "" if t.ms is not None else "not timed: ") + t.note
            rows.append((
                f"{t.size}x{t.size}" if t.size else "-", t.runtime, t.dtype or "-",
                "-" if t.ms is None else f"{t.ms:.1f}",
                "-" if t.first_s is None else f"{t.first_s:.1f} s",
                *(["-" if t.peak_gib is None else f"{t.peak_gib:.2f}"] if peak else []),
                note,
            ))  # fmt: skip
        header = ("size", "runtime", "dtype", "ms/step", "first run",
                  *(["peak GiB"] if peak else []), "")  # fmt: skip
        lines += _columns(header, rows)
        return "\n".join([*lines, "", f"verdict: {self.verdict()}"])


def _pairs(values: dict[str, float], fmt: str) -> str:
    return " / ".join(f"{k} {fmt.format(v)}" for k, v in values.items())


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return [
        "  " + "  ".join(f"{v:<{w}}" for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


# -- the options ------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """The device to diagnose: cuda where torch sees a GPU, else cpu. A GPU is named with its
    index, as its tensors' devices are (the self-check keeps verdicts per tensor device)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
            raise InputError(f"--device {device}: torch sees no CUDA GPU here (torch "
                             f"{torch.__version__}, {build})")  # fmt: skip
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        if resolved.index >= count:
            raise InputError(f"--device {device}: torch sees {count} GPU(s), cuda:0..{count - 1}")
    return resolved


def parse_sizes(text: str) -> tuple[int, ...]:
    """'64,256' -> (64, 256): the image sizes to time."""
    sizes: list[int] = []
    for part in text.split(","):
        if part.strip() not in {str(s) for s in SIZES}:
            valid = ", ".join(map(str, SIZES))
            raise InputError(
                f"--sizes {text!r}: expected sizes among {valid}, comma-separated (e.g. 64,256)"
            )
        if int(part) not in sizes:
            sizes.append(int(part))
    return tuple(sizes)


def parse_runtimes(text: str) -> tuple[str, ...]:
    """'onnxruntime' -> ('eager', 'onnxruntime'): eager is always timed; 'all': every runtime."""
    names = [p.strip() for p in text.split(",")]
    if names == ["all"]:
        return RUNTIMES
    bad = [n for n in names if n not in RUNTIMES]
    if bad:
        raise InputError(f"--runtimes {text!r}: {bad[0]!r} is not a runtime; expected "
                         f"{', '.join(RUNTIMES)} (comma-separated) or all")  # fmt: skip
    return tuple(r for r in RUNTIMES if r == "eager" or r in names)


# -- the timings ------------------------------------------------------------------------------


def time_guided_step(size: int, runtime: str, device: torch.device) -> Timing:
    """One guided step of the {size}x{size} preset and its classifier (random weights, auto
    precision, batch 1) through `Pipeline` on its device's default path, after a warm-up run that
    exports, compiles, self-checks and captures as a first run does."""
    cuda = device.type == "cuda"
    steps, repeats = (10, 3) if cuda else (1, 1)  # a CPU step takes seconds
    timing = Timing(size, runtime, steps=steps, repeats=repeats)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _guided_runs(size, runtime, device, steps, repeats, timing)
            timing.first_s = seconds[0]
            timing.ms = statistics.median(seconds[1:]) / steps * 1e3
            if cuda:
                timing.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        notes = [str(w.message).splitlines()[0] for w in caught
                 if not issubclass(w.category, DeprecationWarning)]  # fmt: skip
        timing.note = "; ".join(dict.fromkeys(notes))
    except Exception as e:  # the runtime was asked for and is installed: its failure is reported
        timing.failed = True
        timing.note = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
    finally:
        gc.collect()  # the networks of this size go before the next are built
        if cuda:
            torch.cuda.empty_cache()
    return timing


def _guided_runs(size, runtime, device, steps, repeats, timing) -> list[float]:
    """Seconds of the warm-up run and of each timed run of `steps` guided steps."""
    from .catalog import PRESETS
    from .checkpoint import create_model
    from .pipeline import Pipeline

    preset = PRESETS[f"{size}x{size}_diffusion"]
    model = create_model(preset.name, device)
    timing.dtype = str(model.dtype).replace("torch.float", "fp").replace("torch.", "")
    classifier = create_model(preset.classifier, device)
    pipe = Pipeline(model, preset.diffusion, classifier, device=device, runtime=runtime)
    seconds = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        pipe.generate(
            1, batch_size=1, classes=0, sampler="ddim", steps=str(steps), seed=0, progress=False
        )  # fmt: skip  (returns numpy: synchronized)
        seconds.append(time.perf_counter() - start)
    return seconds


def _timings(device: torch.device, sizes: Iterable[int], runtimes: Iterable[str],
             log: Log | None) -> list[Timing]:  # fmt: skip
    """Every asked runtime at every size, and a row for each other runtime saying why not; each
    figure logged as it comes (a run cut at its time limit still leaves them in its log)."""
    timings = []
    for runtime in RUNTIMES:
        problem = runtime_problem(runtime, device)
        if runtime not in runtimes or problem:
            where = "minutes on a CPU" if device.type == "cpu" else "minutes"
            note = problem or (f"needs an export first ({where}); --runtimes {runtime} times it")
            timings.append(Timing(None, runtime, note=note))
            continue
        for size in sizes:
            if log:
                log(f"timing: {size}x{size} {runtime}")
            timing = (time_guided_step if runtime == "eager" else _exported_step)(
                size, runtime, device
            )
            timings.append(timing)
            if log and timing.failed:
                log(f"{size}x{size} {runtime}: FAILED: {timing.note}")
            elif log:
                log(f"{size}x{size} {runtime}: {timing.ms:.1f} ms/step, first run "
                    f"{timing.first_s:.1f} s")  # fmt: skip
    return timings


def _exported_step(size: int, runtime: str, device: torch.device) -> Timing:
    """time_guided_step with the export in a temporary cache: random weights' graphs are of no
    later use, and nothing is left behind."""
    previous = os.environ.get("FASTSAMPLE_CACHE")
    with tempfile.TemporaryDirectory(prefix="fastsample-doctor-") as cache:
        os.environ["FASTSAMPLE_CACHE"] = cache
        try:
            return time_guided_step(size, runtime, device)
        finally:
            if previous is None:
                del os.environ["FASTSAMPLE_CACHE"]
            else:
                os.environ["FASTSAMPLE_CACHE"] = previous


def _gpu_title(device: torch.device, checks: list[Check]) -> str:
    forced = os.environ.get(selfcheck.FORCE_ENV, "").strip()
    if forced == "torch":
        return f"{selfcheck.FORCE_ENV}=torch: the fast paths are off, PyTorch's ops run"
    if forced == "triton":
        return f"{selfcheck.FORCE_ENV}=triton: the Triton kernels run unchecked"
    if not ops.triton_available():
        return "Triton absent: PyTorch's ops run (pip install 'fastsample[triton]')"
    title = f"self-check of the fast paths on {torch.cuda.get_device_name(device)}"
    return title if checks else title + ": no verdict was recorded"


def diagnose(device: str | None = None, sizes: Iterable[int] = DEFAULT_SIZES,
             runtimes: Iterable[str] = ("eager",), log: Log | None = None) -> Report:  # fmt: skip
    """Environment, checks and timings of one device (default: cuda if present, else cpu)."""
    start = time.perf_counter()
    device = resolve_device(device)
    sizes, runtimes = tuple(sizes), tuple(runtimes)
    env = environment(device)
    checks: list[Check] = []
    try:
        selfcheck.forced()
    except InputError as e:  # every "auto" run would refuse: the report names it
        checks.append(Check(selfcheck.FORCE_ENV, "-", "-", "FAILED", error=str(e)))
    if device.type == "cuda":
        selfcheck.reset(device)  # the timed steps below check every component again
        timings = _timings(device, sizes, runtimes, log)
        checks += selfcheck.decisions(device)
        title = _gpu_title(device, checks)
    else:
        if log:
            log("no GPU: CPU checks")
        checks += cpu_checks(log)
        title = "no GPU: CPU checks (onednn kernels vs the torch kernels, fp32)"
        timings = _timings(device, sizes, runtimes, log)
    return Report(str(device), env, title, checks, timings, time.perf_counter() - start)
