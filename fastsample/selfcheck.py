"""The GPU fast paths check themselves on first use, and remember what they found.

With `kernels="auto"` on CUDA, the first time a device and dtype runs a shape class, each fast
component is compared with the plain-torch reference on inputs of that shape class and timed
against PyTorch's own path:

- "group_norm": the Triton GroupNorm (forward; forward and backward where autograd records, as
  classifier guidance does) against native GroupNorm;
- "attention": the Triton attention (forward; and backward) against SDPA;
- "fused_update": the fused sampler-step kernel against the eager update (`FastEngine`);
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


_STORES: dict[str, _Store] = {}
_LOCK = threading.RLock()
_WARNED: set[str] = set()


def _class_id(component: str, shape_class: str) -> str:
    return f"{component}|{shape_class}"


def _store(device: torch.device) -> _Store:
    key = str(device) if device.type == "cuda" else device.type
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
