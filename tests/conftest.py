"""Shared test fixtures: the reference data (tests/data, or another copy named by the
environment) and the set-up of the Triton kernel tests (tests/kernels)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The suite's own cache (cache exports, self-check verdicts): nothing is read from or left in
# the user's ~/.cache/fastsample, and parallel workers (pytest -n) never share a directory.
if "FASTSAMPLE_CACHE" not in os.environ:
    os.environ["FASTSAMPLE_CACHE"] = tempfile.mkdtemp(prefix="fastsample-tests-")
    atexit.register(shutil.rmtree, os.environ["FASTSAMPLE_CACHE"], ignore_errors=True)
# Under pytest -n N each worker computes on one thread: N workers share the cores instead of
# oversubscribing them (the golden tests are bit-exact on one thread either way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The reference implementation's outputs, vendored in tests/data (tests/data/README.md).
# FASTSAMPLE_SHARED_DIR names another copy laid out as ../shared (reference_data/,
# checkpoint_manifests/); FASTSAMPLE_GOLDEN_DIR another golden set in golden_tiny's format.
_shared = os.environ.get("FASTSAMPLE_SHARED_DIR")
if _shared:
    SCHEDULES = Path(_shared) / "reference_data" / "diffusion_schedules.json"
    MANIFEST_DIR = Path(_shared) / "checkpoint_manifests"
    _golden_default = Path(_shared) / "reference_data" / "golden_tiny"
else:
    SCHEDULES = ROOT / "tests" / "data" / "diffusion_schedules.json"
    MANIFEST_DIR = ROOT / "tests" / "data" / "checkpoint_manifests"
    _golden_default = ROOT / "tests" / "data" / "golden_tiny"
GOLDEN_DIR = Path(os.environ.get("FASTSAMPLE_GOLDEN_DIR", _golden_default))
# The FID Inception oracle (torch-fidelity's outputs on random weights, 51 MB: not vendored):
# FASTSAMPLE_SHARED_DIR's copy, else ../shared beside the checkout (where CI keeps it).
INCEPTION_GOLDEN = Path(_shared or ROOT.parent / "shared") / "reference_data" / "inception_golden"


@pytest.fixture(scope="session")
def inception_golden():
    """(path of the random fp16 weights in the published file's format, golden.pt's tensors)."""
    weights = INCEPTION_GOLDEN / "weights_random_fp16.pt"
    if not weights.is_file():
        pytest.fail(f"the Inception oracle is not at {INCEPTION_GOLDEN} (see tests/data/README.md)")
    tensors = torch.load(INCEPTION_GOLDEN / "golden.pt", map_location="cpu", weights_only=True)
    return weights, tensors


def manifest_stems() -> list[str]:
    if not MANIFEST_DIR.is_dir():
        return []
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.json") if not p.stem.startswith("_"))


def load_manifest(stem: str) -> dict:
    return json.loads((MANIFEST_DIR / f"{stem}.json").read_text())


@pytest.fixture(scope="session")
def golden():
    """(config.json as a dict, golden.pt as a dict of tensors) from the reference run."""
    if not (GOLDEN_DIR / "config.json").is_file():
        pytest.fail(f"reference golden data not found at {GOLDEN_DIR}")
    config = json.loads((GOLDEN_DIR / "config.json").read_text())
    tensors = torch.load(GOLDEN_DIR / "golden.pt", map_location="cpu", weights_only=True)
    return config, tensors


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the scale (max |expected|) of the reference output."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def golden_labels(model_config: dict, tensors: dict) -> torch.Tensor | None:
    """The golden labels for a class-conditional config, None for an unconditional one."""
    return tensors["in_y"] if model_config.get("num_classes") is not None else None


def replay_reference_rng(rng_calls, seed=0):
    """Draw, from torch.manual_seed(seed), exactly the reference's RNG calls of a golden sampling
    run; return the labels and the noise tensor [steps + 1, ...] (x_T first)."""
    torch.manual_seed(seed)
    labels, draws = None, []
    for name, shape in rng_calls:
        if name == "randint":
            labels = torch.randint(0, 10, shape)
        else:
            draws.append(torch.randn(shape))
    return labels, torch.stack(draws)


@pytest.fixture(scope="session")
def tiny_checkpoints(golden, tmp_path_factory):
    """The golden tiny UNet and classifier saved as .safetensors (config and diffusion settings
    in the metadata), as a user's own small checkpoints would be."""
    from fastsample import Classifier, Diffusion, UNet, save_checkpoint

    config, g = golden
    root = tmp_path_factory.mktemp("tiny")
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    classifier = Classifier(**config["classifier"])
    classifier.load_state_dict(g["classifier_state_dict"])
    diffusion = Diffusion(noise_schedule="linear", timestep_respacing="ddim4")
    return {
        "model": save_checkpoint(unet, root / "tiny.safetensors", diffusion=diffusion),
        "classifier": save_checkpoint(classifier, root / "tiny_classifier.safetensors"),
        "diffusion": diffusion,
    }


# -- Triton kernel tests (tests/kernels) -----------------------------------------------------
#
# They run the kernels for real: compiled on a CUDA GPU, else under Triton's interpreter.
# Triton decides interpretation when @triton.jit runs, i.e. when a kernel module is imported,
# so without a GPU the kernel modules are imported here, before any test module, with
# TRITON_INTERPRET=1. The variable is then removed again: every other test, and every process
# a test starts, keeps the environment it was given (the engine's eager fallback on the CPU,
# the triton backend refused there). The `triton_kernels` fixture sets it for the kernel tests,
# whose code paths (ops.resolve_backend, engine.kernel_available) read it when they run.

KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
KERNEL_DEVICE = "cpu" if KERNELS_INTERPRETED else "cuda"
_KERNEL_MODULES = ("attention", "group_norm", "sampler_step")

if KERNELS_INTERPRETED and "TRITON_INTERPRET" not in os.environ:
    import importlib

    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for _name in _KERNEL_MODULES:
            importlib.import_module(f"fastsample.kernels.{_name}")
    finally:
        del os.environ["TRITON_INTERPRET"]


def _kernels_compiled() -> list[str]:
    """The kernel modules holding compiled (not interpreted) @triton.jit functions."""
    import importlib

    from triton.runtime.jit import JITFunction

    return [
        name
        for name in _KERNEL_MODULES
        if any(
            isinstance(value, JITFunction)
            for value in vars(importlib.import_module(f"fastsample.kernels.{name}")).values()
        )
    ]


@pytest.fixture
def triton_kernels(monkeypatch):
    """The kernels' environment. Interpreted (no GPU): TRITON_INTERPRET=1 while the test runs.
    On CUDA: TF32 off, since the checks hold float32 results to 1e-5 of float32 references
    (golden data computed on the CPU, the torch backend), and cuDNN's and cuBLAS's default TF32
    keeps 10 mantissa bits (~5e-4)."""
    if KERNELS_INTERPRETED:
        compiled = _kernels_compiled()
        if compiled:
            pytest.fail(f"fastsample.kernels {compiled} were imported before tests/conftest.py "
                        "set TRITON_INTERPRET=1: their kernels cannot run on the CPU")  # fmt: skip
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rms_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: the error over the whole tensor."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_as_close_as_torch(
    kernel: torch.Tensor, torch_low: torch.Tensor, reference: torch.Tensor, what: str = ""
) -> None:
    """The three-way check of a float16/bfloat16 result against the float32 (or float64)
    reference computed on the same rounded inputs: the kernel may not be less accurate than
    torch's own ops at that dtype (ADM's arithmetic, op by op). Both round to the dtype where the
    result is stored, and the kernel no more often than torch, so over the whole tensor (RMS)
    it gets within 1.5x of torch's error (measured: at most 1.2x); its worst element within 3x of
    torch's worst (the maximum over a few thousand half-ulp errors varies more: measured 2.2x at
    bfloat16). 1e-5: float32 noise, for results both compute in float32.

    Triton's interpreter converts float32 to bfloat16 by truncation, not to the nearest value as
    a GPU and torch do: one ulp of error instead of half an ulp, so interpreted bfloat16 results
    get twice the allowance."""
    truncated = KERNELS_INTERPRETED and kernel.dtype == torch.bfloat16
    err = {
        "rms": (rms_err(kernel, reference), rms_err(torch_low, reference), 1.5),
        "max": (rel_err(kernel, reference), rel_err(torch_low, reference), 3.0),
    }
    for name, (err_kernel, err_torch, factor) in err.items():
        factor *= 2 if truncated else 1
        assert err_kernel <= factor * err_torch + 1e-5, (what, name, err_kernel, err_torch)


@pytest.fixture
def no_fma_contraction(monkeypatch):
    """For the checks of the fused update against the eager loops. Compiled for a GPU, Triton
    contracts a * b + c into one FMA (one rounding instead of two), which the eager loops'
    separate ops never do; x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) then amplifies that
    difference by up to 1/sqrt(abar) (2e4 at the cosine schedule's t = 999), past 1e-5. These
    checks compile without contraction (Triton reads the variable at each launch); production
    launches keep Triton's default."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
