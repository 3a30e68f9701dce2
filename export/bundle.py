"""Export directories: graphs of the UNet and of the guidance gradient, the sampling schedule
and a manifest that pins every file by sha256.

    DIR/manifest.json          versions, dtypes, graph inputs/outputs, sources, sha256 of files
    DIR/schedule.json          the respaced schedule: settings, timestep map, per-step tables
    DIR/unet.onnx              (x, t[, low_res][, y]) -> network output      --target onnx
    DIR/classifier_grad.onnx   (x, t, y) -> grad_x log p(y | x_t), unscaled   (with a classifier)
    DIR/*.engine               TensorRT engines of the same graphs            --target tensorrt
    DIR/*.pt2                  AOTInductor packages of the same functions     --target aoti
    DIR/unet_split.*, DIR/unet_shallow.*   the UNet split at a skip depth, for feature caching
                               (an export made for a recipe that caches; onnx and aoti)

A directory is written under a temporary name beside DIR and renamed into place when complete:
an interrupted export leaves no partial DIR, and an existing DIR is replaced only on request.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastsample.config import config_to_dict
from fastsample.errors import ExportError
from fastsample.image_io import file_sha256 as sha256_file
from fastsample.schedule import Diffusion
from fastsample.unet import Classifier, UNet

from .graphs import GraphIO, classifier_grad_graph, classifier_io, unet_cache_graphs, unet_graph

FORMAT = "fastsample-export"
FORMAT_VERSION = 1
TARGETS = ("onnx", "tensorrt", "aoti")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_NAMES = ("unet", "classifier_grad", "unet_split", "unet_shallow")
GRAPH_FILES = {
    target: {name: f"{name}.{suffix}" for name in GRAPH_NAMES}
    for target, suffix in (("onnx", "onnx"), ("aoti", "pt2"), ("tensorrt", "engine"))
}


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes, bytes) in its order."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def schedule_json(
    diffusion: Diffusion, clip_denoised: bool = True, sampling: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The respaced schedule as plain numbers: what a sampler without Python needs.

    Tables are float64 (JSON round-trips them exactly) and indexed by respaced step i; a sampler
    runs i = num_steps - 1 down to 0 and gives the networks t_model[i] (fractional under a
    time schedule other than "respace": the graphs take float t). guide[i] is 1 where a guided
    DDIM step applies the classifier gradient, 0 where the pipeline's stable guidance skips it
    (alpha_bar < ~1e-6: `fastsample.guidance`).

    sampling: the run the export is made for (`sampling_settings`: a recipe's sampler and
    guidance budget; None: guided DDIM, the gradient at every step). It is recorded as such, and
    as the guidance plans of the two samplers fastsample-run has: `<sampler>_use[i]` (the update
    applies a gradient) and `<sampler>_compute[i]` (the classifier is called; a used step that
    does not call it reuses the last gradient), for ddim and ddpm."""
    from fastsample.guidance import guidance_plan

    sampling = sampling_settings(**(sampling or {}))
    budget = (sampling["guidance_interval"], sampling["guidance_every"],
              sampling["stable_guidance"])  # fmt: skip
    plans = {s: guidance_plan(s, diffusion, *budget) for s in ("ddim", "ddpm")}
    c = diffusion.coefficients()
    tables = {
        "t_model": diffusion.model_timesteps(),
        "alphas_cumprod": c.alphas_cumprod,
        "alphas_cumprod_prev": c.alphas_cumprod_prev,
        "sqrt_recip_alphas_cumprod": c.sqrt_recip_alphas_cumprod,
        "sqrt_recipm1_alphas_cumprod": c.sqrt_recipm1_alphas_cumprod,
        "posterior_mean_coef1": c.posterior_mean_coef1,
        "posterior_mean_coef2": c.posterior_mean_coef2,
        "posterior_log_variance_clipped": c.posterior_log_variance_clipped,
        "log_betas": c.log_betas,
        "fixed_large_log_variance": c.fixed_large_log_variance,
        "guide": [float(u) for u in guidance_plan("ddim", diffusion, stable=True).use],
    }
    for name, plan in plans.items():
        tables[f"{name}_use"] = [float(u) for u in plan.use]
        tables[f"{name}_compute"] = [float(u) for u in plan.compute]
    return {
        "diffusion": dataclasses.asdict(diffusion),
        "sampling": sampling,
        "num_steps": diffusion.num_steps,
        "clip_denoised": clip_denoised,
        # integers (respacing), or a time schedule's fractional timesteps
        "timestep_map": c.timestep_map.tolist(),
        "tables": {k: [float(v) for v in a] for k, a in tables.items()},
    }


def sampling_settings(
    sampler: str = "ddim",
    guidance_every: int = 1,
    guidance_interval=None,
    stable_guidance: bool = True,
    recipe: str | None = None,
    cache_interval: int = 1,
    cache_depth: int | None = None,
) -> dict[str, Any]:
    """The run an export is made for, as schedule.json records it (checked: one error each).
    recipe: the recipe's name when one chose these settings (Pipeline.from_export then runs
    them by default), else None. cache_depth: the skip depth of the feature-caching graphs
    the export holds (None: none), cache_interval: the recipe's (`fastsample.featcache`)."""
    from fastsample.featcache import check_interval
    from fastsample.guidance import check_guidance_budget
    from fastsample.sampler import get_solver

    get_solver(sampler)
    interval, every = check_guidance_budget(guidance_interval, guidance_every)
    cache_interval = check_interval(cache_interval)
    if cache_depth is not None and (
        isinstance(cache_depth, bool) or not isinstance(cache_depth, int) or cache_depth < 1
    ):
        raise ExportError(f"cache_depth={cache_depth!r}: expected a positive integer or None")
    if cache_interval != 1 and cache_depth is None:
        raise ExportError(f"cache_interval={cache_interval} needs a cache_depth to export at")
    return {
        "recipe": recipe,
        "sampler": sampler,
        "guidance_every": every,
        "guidance_interval": None if interval is None else list(interval),
        "stable_guidance": bool(stable_guidance),
        "cache_interval": cache_interval,
        "cache_depth": cache_depth,
    }


def diffusion_from_schedule(schedule: dict[str, Any]) -> Diffusion:
    """The Diffusion of a schedule.json (written before time schedules: "respace", the default)."""
    return Diffusion(**schedule["diffusion"])


def _versions() -> dict[str, str]:
    import fastsample

    versions = {
        "fastsample": fastsample.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in ("onnx", "onnxscript", "onnxruntime", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _source(module: torch.nn.Module, source: str | None) -> dict[str, Any]:
    return {
        "source": source,
        "preset": module.preset,
        "kind": type(module).__name__,
        "config": config_to_dict(module.config),
        "weights_sha256": weights_sha256(module),
    }


def _stage(out: Path, overwrite: bool) -> Path:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"{out} is not empty; choose another directory or overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))


def _commit(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`, replacing what was there only now."""
    os.chmod(staging, 0o777 & ~_umask())
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(
    model: UNet,
    diffusion: Diffusion,
    out: str | os.PathLike,
    *,
    classifier: Classifier | None = None,
    target: str = "onnx",
    dtype: str = "fp32",
    max_batch: int = 64,
    guidance_scale: float | None = None,
    sampling: dict[str, Any] | None = None,
    model_source: str | None = None,
    classifier_source: str | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Write an export directory (see the module doc); returns its path.

    dtype sets the networks' torso precision in the graphs (GroupNorm statistics, softmax and
    every graph input/output stay float32). diffusion is the respaced process the schedule
    describes; sampling the run it is made for (see `schedule_json`). device is where
    AOTInductor packages and TensorRT engines will run."""
    if target not in TARGETS:
        raise ExportError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ExportError(f"max_batch={max_batch!r}: expected a positive integer")
    if not isinstance(model, UNet):
        raise ExportError(f"model: expected a UNet or SuperResUNet, got {type(model).__name__}")
    if classifier is not None and not isinstance(classifier, Classifier):
        raise ExportError(f"classifier: expected a Classifier, got {type(classifier).__name__}")
    if classifier is not None and classifier.config.image_size != model.config.image_size:
        raise ExportError(
            f"classifier of {classifier.config.image_size}x{classifier.config.image_size} images "
            f"cannot guide a {model.config.image_size}x{model.config.image_size} model"
        )
    sampling = sampling_settings(**(sampling or {}))  # (checked before any work)
    if sampling["cache_depth"] is not None:
        if target == "tensorrt":
            raise ExportError("feature-caching graphs (cache_depth) are exported for the onnx "
                              "and aoti targets, not tensorrt")  # fmt: skip
        model.check_depth(sampling["cache_depth"])
    device = torch.device(device)
    if target == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()  # refuse before any work
    out = Path(out)
    staging = _stage(out, overwrite)
    try:
        manifest = _write_graphs(
            model,
            diffusion,
            staging,
            classifier=classifier,
            target=target,
            dtype=dtype,
            max_batch=max_batch,
            guidance_scale=guidance_scale,
            sampling=sampling,
            model_source=model_source,
            classifier_source=classifier_source,
            device=device,
            log=log,
        )
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _commit(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_graphs(
    model,
    diffusion,
    staging: Path,
    *,
    classifier,
    target,
    dtype,
    max_batch,
    guidance_scale,
    sampling,
    model_source,
    classifier_source,
    device,
    log,
) -> dict:
    torch_dtype = DTYPES[dtype]
    sources = {
        "model": _source(model, model_source),
        "classifier": _source(classifier, classifier_source) if classifier is not None else None,
    }
    # Graphs are made from copies: the caller's networks keep their weights and precision.
    # Graphs are traced on the device they will run on (ONNX and TensorRT graphs: the CPU).
    trace_device = device if target == "aoti" else torch.device("cpu")
    # Exported graphs use the plain-torch ops (no Triton kernels inside ONNX or AOTI graphs).
    model = copy.deepcopy(model).to(trace_device).set_precision(torch_dtype).set_kernels("torch")
    net = unet_graph(model)
    classes = model.config.num_classes or 1
    graphs: dict[str, tuple[torch.nn.Module, GraphIO, int]] = {"unet": (net, net.io(), classes)}
    if sampling["cache_depth"] is not None:
        split, shallow = unet_cache_graphs(model, sampling["cache_depth"])
        graphs["unet_split"] = (split, split.io(), classes)
        graphs["unet_shallow"] = (shallow, shallow.io(), classes)
    if classifier is not None:
        classifier = (
            copy.deepcopy(classifier)
            .to(trace_device)
            .set_precision(torch_dtype)
            .set_kernels("torch")
        )
        log("tracing the classifier's input gradient")
        grad = classifier_grad_graph(classifier)
        graphs["classifier_grad"] = (
            grad,
            classifier_io(classifier),
            classifier.config.out_channels,
        )
    files: dict[str, str] = {}
    entries: dict[str, Any] = {}
    for name, (module, io, classes) in graphs.items():
        module = module.to(trace_device)
        onnx_name = GRAPH_FILES["onnx"][name]
        if target in ("onnx", "tensorrt"):
            from .onnx import OPSET, OPSET_BF16, export_onnx

            log(f"exporting {onnx_name}")
            opset = OPSET_BF16 if dtype == "bf16" else OPSET
            export_onnx(module, io, staging / onnx_name, classes=classes, opset=opset)
            files[onnx_name] = sha256_file(staging / onnx_name)
        entry = {"file": GRAPH_FILES[target][name], **io.to_json()}
        if target == "onnx":
            entry["file"] = onnx_name
        elif target == "aoti":
            from .aoti import compile_package

            log(f"compiling {entry['file']} with AOTInductor ({device.type})")
            compile_package(module, io, staging / entry["file"], device, classes=classes)
            files[entry["file"]] = sha256_file(staging / entry["file"])
        else:
            from .tensorrt import build_engine

            log(f"building {entry['file']} with TensorRT")
            engine_info = build_engine(
                staging / onnx_name, io, staging / entry["file"], max_batch=max_batch
            )
            entry["onnx"] = onnx_name
            entry["tensorrt"] = engine_info
            files[entry["file"]] = sha256_file(staging / entry["file"])
        entries[name] = entry
    schedule = schedule_json(diffusion, sampling=sampling)
    if classifier is not None:
        from fastsample.guidance import guidance_plan

        budget = (sampling["guidance_interval"], sampling["guidance_every"], True)
        skipped = guidance_plan(sampling["sampler"], diffusion, *budget).unstable
        if skipped and sampling["stable_guidance"]:
            log(f"schedule.json: guided {sampling['sampler']} skips the classifier gradient at "
                f"t = {', '.join(f'{t:g}' for t in skipped)}, where alpha_bar < 1e-6 would turn "
                "samples into noise (the pipeline's stable guidance)")  # fmt: skip
    (staging / "schedule.json").write_text(json.dumps(schedule) + "\n")
    files["schedule.json"] = sha256_file(staging / "schedule.json")
    if guidance_scale is None:
        from fastsample.catalog import PRESETS

        preset = PRESETS.get(model.preset or "")
        guidance_scale = preset.classifier_scale if preset and preset.classifier_scale else 1.0
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": target,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "dtype": dtype,
        "io_dtype": "float32",
        "max_batch": max_batch,
        "device": device.type,
        "guidance_scale": float(guidance_scale) if classifier is not None else 0.0,
        **sources,
        "graphs": entries,
        "files": files,
    }


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory")
    if not path.is_file():
        raise ExportError(f"{directory} has no manifest.json: not a fastsample export")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path} is not a fastsample export manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version {manifest.get('format_version')!r}, this fastsample reads "
            f"{FORMAT_VERSION}"
        )
    return manifest


def check_hashes(directory: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """The files whose sha256 differs from the manifest's (or that are missing)."""
    bad = []
    for name, digest in manifest["files"].items():
        path = Path(directory) / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            bad.append(f"{name}: sha256 differs from the manifest")
    return bad


def graph_io(entry: dict[str, Any]) -> GraphIO:
    def parse(items):
        return tuple(
            (i["name"], i["dtype"], tuple(None if s == "batch" else int(s) for s in i["shape"]))
            for i in items
        )

    return GraphIO(parse(entry["inputs"]), parse(entry["outputs"]))
