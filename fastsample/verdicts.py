"""The verdicts of the first-use self-check (`fastsample.selfcheck`): what a check records, the
environment key and the on-disk cache, judging candidates against a float64 reference, timing,
and the per-shape-class decision with its hot-path memo. `FASTSAMPLE_KERNELS` is read here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import torch

from .errors import InputError

FORCE_ENV = "FASTSAMPLE_KERNELS"
FACTOR = 3.0  # a candidate's error may be up to 3x the plain-torch reference's at its dtype
# ... plus a floor, relative to the output's scale: a few float32 ulps; about two float16 /
# bfloat16 ulps (2**-11, 2**-8 relative), the rounding of the stored result.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

Status = Literal["ok", "slower", "FAILED"]


def forced() -> Literal["torch", "triton"] | None:
    """FASTSAMPLE_KERNELS: "torch" or "triton" forces what "auto" means on CUDA; unset or empty
    leaves it to the self-check."""
    value = os.environ.get(FORCE_ENV, "").strip()
    if not value:
        return None
    if value not in ("torch", "triton"):
        raise InputError(
            f"{FORCE_ENV}={value!r}: expected 'torch' or 'triton' (or unset: checked per shape "
            "class)"
        )
    return value  # type: ignore[return-value]


@dataclasses.dataclass
class Check:
    """One component's verdict for one shape class.

    use: what runs for the class ("triton", "torch", "sdpa", "fused", "eager", "graph").
    status: "ok" (the fast component is correct and used), "slower" (correct, but PyTorch's
    path was faster and is used), "FAILED" (it raised or disagreed: disabled).
    err: relative error of each candidate against float64; ms: each candidate's time.
    """

    component: str
    shape_class: str
    use: str
    status: Status
    error: str = ""
    err: dict[str, float] = dataclasses.field(default_factory=dict)
    ms: dict[str, float] = dataclasses.field(default_factory=dict)
    cached: bool = False  # read from the on-disk cache, not measured by this process

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict) -> Check:
        fields = {f.name for f in dataclasses.fields(cls)} - {"cached"}
        if not isinstance(d, dict) or not {"component", "shape_class", "use", "status"} <= set(d):
            raise ValueError("not a check record")
        check = cls(**{k: v for k, v in d.items() if k in fields}, cached=True)
        if check.status not in ("ok", "slower", "FAILED"):
            raise ValueError(f"status {check.status!r}")
        return check


# -- the environment key and the on-disk cache ------------------------------------------------


def _driver_version() -> str:
    """The NVIDIA driver's version (Linux: /proc), else the CUDA driver API's, else "unknown"."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-api-{version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def environment(device: torch.device | str) -> dict[str, str]:
    """What the decisions depend on: the device (GPU name, compute capability, driver, CUDA)
    and the torch, triton and fastsample versions."""
    from . import __version__

    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    env = {"torch": torch.__version__, "triton": triton_version, "fastsample": __version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device="cuda",
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
            cuda=str(torch.version.cuda),
        )
    else:
        env.update(device=device.type, processor=platform.machine(),
                   interpreted=str(os.environ.get("TRITON_INTERPRET") == "1"))  # fmt: skip
    return env


def cache_dir() -> Path:
    return Path(os.environ.get("FASTSAMPLE_CACHE") or Path.home() / ".cache" / "fastsample")


def cache_path(device: torch.device | str) -> Path:
    """The decisions file of this device's environment: FASTSAMPLE_CACHE (default
    ~/.cache/fastsample)/selfcheck/<device>-<hash of the key>.json."""
    env = environment(device)
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu", env["device"])).strip("-").lower()
    return cache_dir() / "selfcheck" / f"{name}-{digest}.json"


class _Store:
    """The decisions of one environment: in memory, mirrored to its file."""

    def __init__(self, path: Path, env: dict[str, str]):
        self.path, self.env = path, env
        self.checks: dict[str, Check] = {}
        self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("environment") != self.env:
                return
            for record in data.get("checks", []):
                check = Check.from_json(record)
                self.checks[_class_id(check.component, check.shape_class)] = check
        except (OSError, ValueError, TypeError, AttributeError):
            return  # absent or unreadable: checked again, and rewritten

    def put(self, check: Check) -> None:
        self.checks[_class_id(check.component, check.shape_class)] = check
        self._write()

    def _write(self) -> None:
        """Atomic replace; a cache that cannot be written costs a re-check next run, nothing
        else."""
        body = {
            "environment": self.env,
            "checks": [c.to_json() for c in self.checks.values()],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def clear(self) -> None:
        self.checks.clear()
        try:
            self.path.unlink()
        except OSError:
            pass


_STORES: dict[tuple[str, str], _Store] = {}  # (device, cache folder) -> its verdicts
_LOCK = threading.RLock()
_WARNED: set[str] = set()


def _class_id(component: str, shape_class: str) -> str:
    return f"{component}|{shape_class}"


def _store(device: torch.device) -> _Store:
    key = (str(device) if device.type == "cuda" else device.type, str(cache_dir()))
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = _Store(cache_path(device), environment(device))
    return store


def decisions(device: torch.device | str) -> list[Check]:
    """Every verdict this device's environment holds (measured in this process or cached)."""
    with _LOCK:
        return list(_store(torch.device(device)).checks.values())


def reset(device: torch.device | str | None = None) -> None:
    """Forget the verdicts of a device (or of all, in memory), on disk too: the next use
    checks again."""
    with _LOCK:
        if device is None:
            for store in _STORES.values():
                store.clear()
            _STORES.clear()
        else:
            _store(torch.device(device)).clear()
        _USE.clear()
        _WARNED.clear()


def _warn(check: Check) -> None:
    """One warning per failing component and process."""
    if check.component in _WARNED:
        return
    _WARNED.add(check.component)
    where = "cached verdict" if check.cached else "first use"
    warnings.warn(
        f"fastsample: the {check.component.replace('_', ' ')} fast path failed its self-check "
        f"({where}, {check.shape_class}: {check.error}); PyTorch's path runs instead. "
        "`fastsample doctor` reports it; set FASTSAMPLE_KERNELS=torch to skip the fast paths.",
        RuntimeWarning,
        stacklevel=3,
    )


# -- measuring ----------------------------------------------------------------------------------


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|, in float64; inf where actual is not finite
    where the reference is."""
    actual, reference = actual.detach().double(), reference.detach().double()
    if actual.shape != reference.shape:
        return math.inf
    diff = (actual - reference).abs()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return (diff.max() / reference.abs().max().clamp_min(1e-30)).item() if diff.numel() else 0.0


class stopwatch:
    """Times a block into ms[name]: CUDA events on CUDA (synchronising at the end), else the
    wall clock."""

    def __init__(self, device: torch.device, ms: dict[str, float], name: str):
        self.device, self.ms, self.name = device, ms, name

    def __enter__(self):
        if self.device.type == "cuda":
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.events[1].record()
            self.events[1].synchronize()
            self.ms[self.name] = self.events[0].elapsed_time(self.events[1])
        else:
            self.ms[self.name] = (time.perf_counter() - self.start) * 1e3
        return False


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """The median time of fn in ms, after one warm-up call; fewer repetitions where one call is
    slow (the CPU interpreter: at most 0.2 s of repetitions)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + 0.2
    for _ in range(reps):
        ms: dict[str, float] = {}
        with stopwatch(device, ms, "call"):
            fn()
        times.append(ms["call"])
        if device.type != "cuda" and time.perf_counter() > deadline:
            break
    times.sort()
    return times[len(times) // 2]


def judge(
    component: str,
    shape_class: str,
    dtype: torch.dtype,
    device: torch.device,
    reference: Callable[[], tuple[torch.Tensor, ...]],
    candidates: dict[str, Callable[[], tuple[torch.Tensor, ...]]],
    baseline: str,
    fast: Iterable[str],
    outputs: tuple[str, ...] = ("output",),
    fastest: bool = True,
) -> Check:
    """Run each candidate, compare its outputs with the float64 reference's, time the correct
    ones, and pick the fastest. baseline: the plain-torch path at the working dtype, which
    sets the accuracy bar (FACTOR times its error plus FLOOR) and is correct by definition;
    fast: the fastsample components whose failure is reported (status FAILED). fastest=False:
    the first correct fast component is used even where slower (its times are recorded)."""
    fast = tuple(fast)
    want = reference()
    names = (
        outputs[: len(want)]
        if len(outputs) >= len(want)
        else [f"output {i}" for i in range(len(want))]
    )
    err: dict[str, float] = {}
    problems: dict[str, str] = {}
    base: list[float] = []
    for name in [baseline, *(name for name in candidates if name != baseline)]:
        try:
            got = candidates[name]()
            errors = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
        except Exception as e:  # noqa: BLE001 - any failure disables the component
            if name == baseline:
                raise
            err[name] = math.inf
            problems[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        err[name] = max(errors)
        if name == baseline:
            base = errors
            continue
        off = [
            f"{what} off by {e:.2g} (relative; PyTorch's {b:.2g})"
            for what, e, b in zip(names, errors, base, strict=True)
            if not e <= FACTOR * b + FLOOR[dtype]
        ]
        if off:
            problems[name] = ", ".join(off)
    correct = [name for name in candidates if name not in problems]
    ms = {name: time_ms(lambda f=candidates[name]: f(), device) for name in correct}
    preferred = [name for name in fast if name in correct] if not fastest else []
    use = preferred[0] if preferred else min(correct, key=lambda n: (ms[n], n not in fast))
    failed = [name for name in fast if name in problems]
    status: Status = "FAILED" if failed else "ok" if use in fast else "slower"
    error = "; ".join(f"{name}: {why}" for name, why in problems.items())
    finite = {k: v for k, v in err.items() if math.isfinite(v)}
    return Check(component, shape_class, use, status, error, finite, ms)


# -- the decisions, on first use ----------------------------------------------------------------

_USE: dict[tuple, str] = {}  # (device, component, class key) -> what runs: the hot path's memo


def _busy(device: torch.device) -> bool:
    """Whether checking now is impossible: a CUDA graph is being captured, or torch.compile is
    tracing (no timing, no synchronisation there)."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def decide(
    component: str,
    key: tuple,
    device: torch.device,
    describe: Callable[[], str],
    run: Callable[[], Check],
    default: str,
) -> str:
    """What runs for one shape class: the memo, else the cached verdict, else run the check
    now (and cache it). `default` runs, unrecorded, where no check can run now."""
    memo = (device, component, key)
    use = _USE.get(memo)
    if use is not None:
        return use
    with _LOCK:
        store = _store(device)
        shape_class = describe()
        check = store.checks.get(_class_id(component, shape_class))
        if check is None:
            if _busy(device):
                return default
            with torch.no_grad():
                check = run()
            store.put(check)
        if check.status == "FAILED":
            _warn(check)
        _USE[memo] = check.use
        return check.use


def _forget() -> None:
    """Drop what this process holds in memory (the files stay): as a new process would start."""
    with _LOCK:
        _STORES.clear()
        _USE.clear()
        _WARNED.clear()


def cached(component: str, shape_class: str, device: torch.device) -> Check | None:
    """The verdict held for one shape class, if any (warning once where it FAILED)."""
    with _LOCK:
        check = _store(device).checks.get(_class_id(component, shape_class))
    if check is not None and check.status == "FAILED":
        _warn(check)
    return check


def record(check: Check, device: torch.device) -> None:
    """Keep a verdict measured elsewhere (the engine's graph check), warning where it
    FAILED."""
    with _LOCK:
        _store(device).put(check)
    if check.status == "FAILED":
        _warn(check)
