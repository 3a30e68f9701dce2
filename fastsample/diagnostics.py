"""What `fastsample doctor` reads of a machine: the facts a bug report needs (versions, devices,
runtimes and why one cannot run), and the CPU's checks (the onednn kernels against the torch
kernels, the reference's operations, on the embedded demo networks)."""

from __future__ import annotations

import importlib
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Callable

import torch

from . import ops, selfcheck
from .selfcheck import Check, rel_err

FP32_TOL = 1e-5  # onednn vs torch kernels: a few float32 ulps per layer (tests/test_onednn.py)
SAMPLING_TOL = 1e-4  # after five guided DDIM steps (measured ~1e-6)
Log = Callable[[str], None]


# -- the environment --------------------------------------------------------------------------


def _version(module: str) -> str:
    """A module's version, "absent", or why importing it fails."""
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "absent"
    except Exception as e:  # a broken install is worth a line of the report, not a crash
        return f"broken ({type(e).__name__}: {e})"


def _present(version: str) -> bool:
    return version != "absent" and not version.startswith("broken")


def _cpu_name() -> str:
    try:
        found = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    """The facts a bug report needs, as printable strings."""
    from . import __version__

    env = {
        "fastsample": __version__,
        "python": f"{platform.python_version()} ({platform.platform()})",
        "torch": torch.__version__
        + (f" (CUDA {torch.version.cuda} build)" if torch.version.cuda else " (CPU build)"),
        "triton": _version("triton"),
        "CUDA available": (
            f"yes, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no"
        ),
    }
    if device.type == "cuda":
        facts = selfcheck.environment(device)
        env["GPU"] = (f"{facts['gpu']} (compute capability {facts['capability']}, driver "
                      f"{facts['driver']}, CUDA {facts['cuda']})")  # fmt: skip
        env["cuDNN"] = str(torch.backends.cudnn.version())
    else:
        env["GPU"] = "none"
    found = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    env["oneDNN"] = ((f"v{found.group(1)}" if found else "present") if ops.onednn_available()
                     else "absent (the torch kernels run on the CPU)")  # fmt: skip
    env["CPU"] = (f"{_cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, "
                  f"{torch.get_num_threads()} threads of {os.cpu_count()} CPUs")  # fmt: skip
    env["onnx"] = _version("onnx")
    env["onnxruntime"] = _version("onnxruntime")
    if _present(env["onnxruntime"]):
        import onnxruntime

        env["onnxruntime"] += f" ({', '.join(onnxruntime.get_available_providers())})"
    env["TensorRT"] = _version("tensorrt")
    env[selfcheck.FORCE_ENV] = os.environ.get(selfcheck.FORCE_ENV) or "unset"
    return env


def runtime_problem(runtime: str, device: torch.device) -> str | None:
    """Why a runtime cannot run on the device (None: it can)."""
    if runtime == "eager":
        return None
    if runtime in ("onnxruntime", "tensorrt"):
        for module in ("onnx", "onnxscript"):
            if not _present(_version(module)):
                return f"{module} {_version(module)} (pip install 'fastsample[onnx]')"
    if runtime == "onnxruntime":
        ort = _version("onnxruntime")
        if not _present(ort):
            return f"onnxruntime {ort} (pip install 'fastsample[onnx]')"
        if device.type == "cuda":
            import onnxruntime

            providers = onnxruntime.get_available_providers()
            if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers):
                return "ONNX Runtime has no CUDA provider (pip install 'fastsample[onnx-gpu]')"
    if runtime == "tensorrt":
        trt = _version("tensorrt")
        if not _present(trt):
            return f"TensorRT {trt}"
        if device.type != "cuda":
            return "TensorRT runs on CUDA GPUs only"
    if runtime == "aoti":
        if not hasattr(importlib.import_module("torch._inductor"), "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no AOTInductor packaging"
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
            return "no C++ compiler (AOTInductor compiles the graphs)"
    return None


# -- the checks -------------------------------------------------------------------------------


def _against_torch(component: str, shape_class: str, run, tol: float) -> Check:
    """run(kernels) on the onednn kernels against run("torch"), timed after a warm-up (oneDNN
    packs the weights on first use)."""
    out, ms = {}, {}
    for kernels in ("onednn", "torch"):
        run(kernels)
        start = time.perf_counter()
        out[kernels] = run(kernels)
        ms[kernels] = (time.perf_counter() - start) * 1e3
    err = rel_err(out["onednn"], out["torch"])  # inf where not finite
    if err <= tol:
        return Check(component, shape_class, "onednn", "ok", err={"onednn": err}, ms=ms)
    error = f"relative error {err:.1e} > {tol:.0e}" if math.isfinite(err) else "non-finite output"
    figures = {"onednn": err} if math.isfinite(err) else {}  # (JSON has no inf)
    return Check(component, shape_class, "onednn", "FAILED", error=error, err=figures, ms=ms)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 32, 32, generator=gen), torch.tensor([10, 900]), torch.tensor([3, 7])


def _unet_run(unet, clf):
    x, t, y = _inputs(0)

    def run(kernels):
        with torch.no_grad():
            return unet.set_kernels(kernels)(x, t, y)

    return run


def _guidance_run(unet, clf):
    from .netfns import guidance_fn

    x, t, y = _inputs(1)
    return lambda kernels: guidance_fn(clf.set_kernels(kernels), y)(x, t)


def _winograd_run(unet, clf):
    """A 3x3 convolution of the shape class the onednn kernels compute by Winograd F(2x2, 3x3)
    (wide 32x32 maps, as at the 256x256 networks' 32x32 level)."""
    from .unet import Conv2d

    gen = torch.Generator().manual_seed(2)
    conv = Conv2d(384, 384, 3, padding=1).requires_grad_(False)
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / 60)
    x = torch.randn(1, 384, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)

    def run(kernels):
        with torch.no_grad():
            return ops.conv2d(conv, x, kernels)

    return run


def _sampling_run(unet, clf):
    """Five guided DDIM steps of the demo, the CPU's default path (eager loop, onednn)."""
    from .catalog import DEMO_UNET, PRESETS
    from .sampling import sample

    preset = PRESETS[DEMO_UNET]
    diffusion, scale = preset.diffusion.respaced("ddim5"), preset.classifier_scale

    def run(kernels):
        unet.set_kernels(kernels), clf.set_kernels(kernels)
        return sample(unet, diffusion, (2, 1, 32, 32), y=torch.tensor([3, 7]), sampler="ddim",
                      classifier=clf, guidance_scale=scale, seed=[0, 1])  # fmt: skip

    return run


# component, shape class, tolerance, run(unet, clf) -> run(kernels)
CPU_CHECKS = (
    ("onednn unet", "demo-mnist 32x32 b2 fp32", FP32_TOL, _unet_run),
    ("onednn classifier gradient", "demo-mnist-classifier 32x32 b2 fp32", FP32_TOL,
     _guidance_run),
    ("onednn conv 3x3 (Winograd)", "384 ch 32x32 b1 fp32", FP32_TOL, _winograd_run),
    ("guided sampling", "demo-mnist ddim5 b2 fp32", SAMPLING_TOL, _sampling_run),
)  # fmt: skip


def cpu_checks(log: Log | None = None) -> list[Check]:
    """The CPU's checks, each the onednn kernels against the torch kernels on the embedded demo
    networks (seconds in all); a check that raises FAILED with its error."""
    from .catalog import DEMO_CLASSIFIER, DEMO_UNET
    from .checkpoint import load_model

    unet, clf = load_model(DEMO_UNET), load_model(DEMO_CLASSIFIER)
    checks = []
    for component, shape_class, tol, make in CPU_CHECKS:
        if not ops.onednn_available():
            note = "oneDNN absent: the torch kernels run, nothing to compare"
            checks.append(Check(component, shape_class, "torch", "ok", error=note))
            continue
        try:
            checks.append(_against_torch(component, shape_class, make(unet, clf), tol))
        except Exception as e:  # a crash of a checked path is its failure, reported with the rest
            error = f"{type(e).__name__}: {e}"
            checks.append(Check(component, shape_class, "onednn", "FAILED", error=error))
        if log:
            log(f"check: {component}: {checks[-1].status}")
    return checks
