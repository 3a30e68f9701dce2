"""The GPU fast paths check themselves on first use, and remember what they found.

With `kernels="auto"` on CUDA, the first time a device and dtype runs a shape class, each fast
component is compared with the plain-torch reference on inputs of that shape class and timed
against PyTorch's own path:

- "group_norm": the Triton GroupNorm (forward; forward and backward where autograd records, as
  classifier guidance does) against native GroupNorm;
- "attention": the Triton attention (forward; and backward) against SDPA;
- "fused_update": the fused sampler-step kernel against the eager update (`FastEngine`; used
  wherever it is correct, as the captured step needs it; its time is recorded);
- "cuda_graph": one replay of the engine's captured step against one eager step.

Accuracy is judged against a float64 computation on the same inputs: a candidate may be at
most `FACTOR` times less accurate than the plain-torch reference at the same dtype, plus a floor
of a few units in the dtype's last place. A component that raises or falls outside that is
disabled for the shape class, with one warning per component and process naming it; among the
correct candidates the fastest runs. Decisions are cached on disk (`cache_path`) under a key of
GPU name, compute capability, driver, CUDA, torch, triton and fastsample versions, so later runs
pay nothing; a new driver or release checks again.

`FASTSAMPLE_KERNELS=torch` makes "auto" mean PyTorch's ops (and the engine's eager update);
`FASTSAMPLE_KERNELS=triton` makes it the Triton kernels without checking. Explicit
`kernels="triton"` is never checked either.
"""

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


def _rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|, in float64; inf where actual is not finite
    where the reference is."""
    actual, reference = actual.detach().double(), reference.detach().double()
    if actual.shape != reference.shape:
        return math.inf
    diff = (actual - reference).abs()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    return (diff.max() / reference.abs().max().clamp_min(1e-30)).item() if diff.numel() else 0.0


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """The median time of fn in ms (CUDA events on CUDA), after one warm-up call; fewer
    repetitions where one call is slow (the CPU interpreter)."""
    fn()
    if device.type == "cuda":
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        times = []
        deadline = time.perf_counter() + 0.2
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > deadline:
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
) -> Check:
    """Run each candidate, compare its outputs with the float64 reference's, time the correct
    ones, and pick the fastest. baseline: the plain-torch path at the working dtype, which
    sets the accuracy bar (FACTOR times its error plus FLOOR) and is correct by definition;
    fast: the fastsample components whose failure is reported (status FAILED)."""
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
            errors = [_rel_err(g, w) for g, w in zip(got, want, strict=True)]
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
    use = min(correct, key=lambda name: (ms[name], name not in fast))
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


def _generator(device: torch.device) -> torch.Generator:
    """A private generator: checking never moves the caller's random streams."""
    return torch.Generator(device).manual_seed(0)


def _randn(shape, gen, dtype, device, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    channels_last = like is not None and like.ndim == 4 and not like.is_contiguous()
    if channels_last and like.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _grads(fn, inputs: tuple, dy: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """fn(*inputs), and its input gradient for dy when dy is given."""
    if dy is None:
        return (fn(*inputs),)
    with torch.enable_grad():
        x = inputs[0].detach().requires_grad_()
        y = fn(x, *inputs[1:])
        (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def _layout_name(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided" + str(tuple(x.stride()))


# -- GroupNorm ----------------------------------------------------------------------------------


def group_norm_choice(x, num_groups, weight, bias, eps, scale, shift, silu) -> str:
    """What runs ("triton" or "torch") for this GroupNorm's shape class (see the module doc)."""
    grad = torch.is_grad_enabled() and x.requires_grad
    affine = None if weight is None else weight.dtype
    key = (x.dtype, tuple(x.shape), x.stride(), num_groups, affine, scale is not None, silu, grad)

    def describe() -> str:
        spatial = "x".join(str(s) for s in x.shape[2:])
        parts = [str(x.dtype).removeprefix("torch."), f"N{x.shape[0]} C{x.shape[1]}",
                 f"G{num_groups}", spatial, _layout_name(x)]  # fmt: skip
        parts += ["affine"] if weight is not None else []
        parts += ["scale-shift"] if scale is not None else []
        parts += ["silu"] if silu else []
        parts += ["fwd+bwd"] if grad else []
        return " ".join(parts)

    def run() -> Check:
        return _check_group_norm(x, num_groups, weight, bias, eps, scale, shift, silu, grad,
                                 describe())  # fmt: skip

    return decide("group_norm", key, x.device, describe, run, "torch")


def _check_group_norm(x, num_groups, weight, bias, eps, scale, shift, silu, grad, shape_class):
    from fastsample.kernels import group_norm as kernel
    from fastsample.kernels.reference import group_norm_reference

    device, dtype = x.device, x.dtype
    gen = _generator(device)
    xs = (_randn(x.shape, gen, torch.float32, device, like=x) * 2 + 0.5).to(dtype)
    w = None if weight is None else _randn(weight.shape, gen, weight.dtype, device)
    b = None if bias is None else _randn(bias.shape, gen, bias.dtype, device)
    sc = None if scale is None else _randn(scale.shape, gen, scale.dtype, device) * 0.5
    sh = None if shift is None else _randn(shift.shape, gen, shift.dtype, device)
    dy = _randn(x.shape, gen, dtype, device, like=x) if grad else None
    if x.stride() != xs.stride():  # the caller's own strides (a token view, say)
        xs = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device).copy_(xs)

    def torch_path(v, w=w, b=b, sc=sc, sh=sh):
        return group_norm_reference(v, num_groups, w, b, eps, sc, sh, silu)

    def triton_path(v):
        return kernel.group_norm(v, num_groups, w, b, eps, scale=sc, shift=sh, silu=silu)

    def float64(v):
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return group_norm_reference(v.double(), num_groups, d(w), d(b), eps, d(sc), d(sh), silu)

    return judge(
        "group_norm", shape_class, dtype, device,
        reference=lambda: _grads(float64, (xs,), None if dy is None else dy.double()),
        candidates={"triton": lambda: _grads(triton_path, (xs,), dy),
                    "torch": lambda: _grads(torch_path, (xs,), dy)},
        baseline="torch", fast=("triton",), outputs=("output", "input gradient"),
    )  # fmt: skip


# -- attention ----------------------------------------------------------------------------------


def attention_choice(qkv: torch.Tensor, heads: int, order: str, queries: int | None) -> str:
    """What runs ("triton", "sdpa" or "torch") for this attention's shape class."""
    grad = torch.is_grad_enabled() and qkv.requires_grad
    key = (qkv.dtype, tuple(qkv.shape), qkv.stride(), heads, order, queries, grad)

    def describe() -> str:
        n, width, t = qkv.shape
        parts = [str(qkv.dtype).removeprefix("torch."), f"N{n} H{heads} D{width // (3 * heads)}",
                 f"T{t}", f"queries {queries or t}", order, _layout_name(qkv)]  # fmt: skip
        parts += ["fwd+bwd"] if grad else []
        return " ".join(parts)

    def run() -> Check:
        return _check_attention(qkv, heads, order, queries, grad, describe())

    return decide("attention", key, qkv.device, describe, run, "torch")


def _check_attention(qkv, heads, order, queries, grad, shape_class):
    from fastsample.kernels import attention as kernel
    from fastsample.kernels.reference import attention_reference

    from .ops import sdpa_attention

    device, dtype = qkv.device, qkv.dtype
    gen = _generator(device)
    q = _randn(qkv.shape, gen, dtype, device)
    if q.stride() != qkv.stride():
        q = torch.empty_strided(qkv.shape, qkv.stride(), dtype=dtype, device=device).copy_(q)
    rows = queries or qkv.shape[2]
    dy = _randn((qkv.shape[0], qkv.shape[1] // 3, rows), gen, dtype, device) if grad else None

    def path(fn):
        return lambda: _grads(lambda v: fn(v, heads, order, queries), (q,), dy)

    return judge(
        "attention", shape_class, dtype, device,
        reference=lambda: _grads(lambda v: attention_reference(v, heads, order, queries),
                                 (q.double(),), None if dy is None else dy.double()),
        candidates={"triton": path(kernel.attention), "sdpa": path(sdpa_attention),
                    "torch": path(attention_reference)},
        baseline="torch", fast=("triton",), outputs=("output", "input gradient"),
    )  # fmt: skip


# -- the fused update ---------------------------------------------------------------------------


def fused_update_choice(solver, tables, spec, shape: tuple, device: torch.device, guided: bool,
                        adds_noise: bool) -> str:  # fmt: skip
    """What runs ("fused" or "eager") for the fast engine's update of this shape class: the
    fused kernel against the eager update at the first, a middle and the last step."""
    shape = tuple(int(s) for s in shape)
    key = (solver.name, shape, tuple(spec), guided, adds_noise)

    def describe() -> str:
        parts = [solver.name, "x".join(map(str, shape))]
        parts += ["guided"] if guided else []
        parts += ["noise"] if adds_noise else []
        parts += ["learn-sigma"] if spec.learn_sigma else []
        parts += ["predicts-x0"] if spec.predict_xstart else []
        parts += ["clip"] if spec.clip else []
        return " ".join(parts)

    def run() -> Check:
        return _check_fused_update(solver, tables, spec, shape, device, guided, adds_noise,
                                   describe())  # fmt: skip

    return decide("fused_update", key, device, describe, run, "eager")


def _check_fused_update(solver, tables, spec, shape, device, guided, adds_noise, shape_class):
    from fastsample.kernels.sampler_step import sampler_step

    gen = _generator(device)
    n_steps = len(tables["t_model"])
    steps = sorted({n_steps - 1, n_steps // 2, 0}, reverse=True)
    out_shape = (shape[0], shape[1] * (2 if spec.learn_sigma else 1), *shape[2:])
    data = []
    for _ in steps:
        x = _randn(shape, gen, torch.float32, device)
        out = _randn(out_shape, gen, torch.float32, device).clamp(-3, 3)
        grad = _randn(shape, gen, torch.float32, device) if guided else None
        z = _randn(shape, gen, torch.float32, device) if adds_noise else None
        history = _randn(shape, gen, torch.float32, device) if solver.multistep else None
        data.append((x, out, grad, z, history))
    scale = 2.5 if guided else 0.0
    index = [torch.full((), i, dtype=torch.int32, device=device) for i in steps]
    as64 = {name: t.double() if t.is_floating_point() else t for name, t in tables.items()}

    def copy(t, dtype=None):
        return None if t is None else t.to(dtype or t.dtype, copy=True)

    def eager(float64: bool):
        dtype = torch.float64 if float64 else None
        results = []
        for i, (x, out, grad, z, history) in zip(steps, data, strict=True):
            x_next, x0 = solver.update(
                as64 if float64 else tables, i, copy(x, dtype), copy(out, dtype),
                copy(grad, dtype), scale, copy(z, dtype), copy(history, dtype), spec,
            )  # fmt: skip
            results += [x_next, x0]
        return tuple(results)

    def fused():
        results = []
        for step, (x, out, grad, z, history) in zip(index, data, strict=True):
            results += sampler_step(
                solver.name, x, out, step, tables, grad=grad, scale=scale, z=z,
                history=copy(history), clip=spec.clip, learn_sigma=spec.learn_sigma,
                predict_xstart=spec.predict_xstart,
            )  # fmt: skip
        return tuple(results)

    names = tuple(f"{what} at step {i}" for i in steps for what in ("x_next", "x0"))
    check = judge(
        "fused_update", shape_class, torch.float32, device,
        reference=lambda: eager(True), candidates={"fused": fused, "eager": lambda: eager(False)},
        baseline="eager", fast=("fused",), outputs=names,
    )  # fmt: skip
    if check.status == "slower":
        # Correct, and used even so: the captured step reads its index from the device, which
        # only the fused kernel does; without it the engine loses its graphs, not one update's
        # microseconds. The times stay in the verdict.
        check.use, check.status = "fused", "ok"
    return check


# -- the CUDA graph ---------------------------------------------------------------------------


def graph_class(solver: str, shape: tuple, dtype: torch.dtype, params: int, guided: bool) -> str:
    """The shape class of an engine step's graph."""
    parts = [solver, "x".join(map(str, shape)), str(dtype).removeprefix("torch."),
             f"{params / 1e6:.1f}M parameters"]  # fmt: skip
    return " ".join(parts + (["guided"] if guided else []))


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


def graph_verdict(shape_class: str, dtype: torch.dtype, replayed: tuple, eager: tuple,
                  ms: dict[str, float]) -> Check:  # fmt: skip
    """The verdict on one replay of a captured step against one eager step from the same
    state (the same kernels: they agree to the dtype's rounding or the graph is wrong)."""
    errors = [_rel_err(r, e) for r, e in zip(replayed, eager, strict=True)]
    worst = max(errors)
    ok = worst <= FACTOR * FLOOR.get(dtype, 1e-5)
    error = "" if ok else f"the replay's step is off by {worst:.2g} (relative) from the eager step"
    status: Status = "FAILED" if not ok else "ok" if ms["graph"] <= ms["eager"] else "slower"
    use = "graph" if ok and status == "ok" else "eager"
    finite = {"graph": worst} if math.isfinite(worst) else {}
    return Check("cuda_graph", shape_class, use, status, error, finite, dict(ms))
