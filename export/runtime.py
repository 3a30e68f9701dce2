"""Running an export directory: the UNet and the guidance gradient on ONNX Runtime, TensorRT or
AOTInductor, behind the same seam as the eager networks (`fastsample.netfns`): `model_fn` gives
`model(x, t)` and `guidance_fn` the unscaled gradient `guidance(x, t)`."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

import torch

from fastsample._deprecation import _UNSET, renamed
from fastsample.config import config_from_dict
from fastsample.errors import ExportError, InputError, IntegrityError
from fastsample.sampling import RUNTIMES
from fastsample.schedule import Diffusion

from .bundle import (
    check_hashes,
    diffusion_from_schedule,
    graph_io,
    read_manifest,
    weights_sha256,
)

BACKENDS = RUNTIMES  # the old name
CACHE_GRAPHS = ("unet_split", "unet_shallow")
# Which export target each runtime runs from.
_TARGET_OF = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "aoti": "aoti"}


class ExportedGraphs:
    """An export directory loaded on one runtime.

    `unet(x, t[, low_res][, y])` and `classifier_grad(x, t, y)` take and return torch tensors
    (float32 images, float32 t, int64 y) on `device`. Hashes are checked on load."""

    def __init__(
        self,
        directory: str | os.PathLike,
        runtime: str | None = None,
        device: str | None = None,
        providers: list[str] | None = None,
        backend=_UNSET,
    ):
        runtime = renamed("runtime", runtime, "backend", backend, None)
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        bad = check_hashes(self.directory, self.manifest)
        if bad:
            raise IntegrityError(f"{self.directory}: {'; '.join(bad)}")
        target = self.manifest["target"]
        if runtime is None:
            runtime = {v: k for k, v in _TARGET_OF.items()}[target]
        if runtime not in _TARGET_OF:
            raise ExportError(f"runtime {runtime!r}: expected one of {', '.join(_TARGET_OF)}")
        want = _TARGET_OF[runtime]
        # A TensorRT engine can be built from an ONNX export on the spot.
        if want != target and not (runtime == "tensorrt" and target == "onnx"):
            raise ExportError(
                f"{self.directory} holds a {target!r} export; runtime {runtime!r} needs "
                f"--target {want}"
            )
        self.runtime = runtime
        self.schedule = json.loads((self.directory / "schedule.json").read_text())
        self.diffusion: Diffusion = diffusion_from_schedule(self.schedule)
        self.config = config_from_dict(self.manifest["model"]["config"])
        clf = self.manifest.get("classifier")
        self.classifier_config = config_from_dict(clf["config"]) if clf else None
        self.guidance_scale = float(self.manifest.get("guidance_scale", 0.0))
        self.preset = self.manifest["model"].get("preset")
        self.graphs: dict[str, Any] = {}
        for name, entry in self.manifest["graphs"].items():
            if runtime == "tensorrt" and name in CACHE_GRAPHS:
                continue  # (engines of one output only: no feature caching on TensorRT)
            self.graphs[name] = self._load(name, entry, device, providers)
        self.device = self.graphs["unet"].device

    def _load(self, name: str, entry: dict, device: str | None, providers):
        io = graph_io(entry)
        if self.runtime == "onnxruntime":
            from .onnx import OrtGraph, choose_providers

            return OrtGraph(
                self.directory / entry["file"], io, providers or choose_providers(device=device)
            )
        if self.runtime == "aoti":
            from .aoti import AotiGraph

            return AotiGraph(self.directory / entry["file"], io, self.manifest["device"])
        from .tensorrt import TrtGraph, build_engine

        if self.manifest["target"] == "tensorrt":
            return TrtGraph(self.directory / entry["file"], io)
        engine = Path(_cache_root()) / "engines" / f"{self.directory.name}-{name}.engine"
        engine.parent.mkdir(parents=True, exist_ok=True)
        build_engine(
            self.directory / entry["file"], io, engine, max_batch=int(self.manifest["max_batch"])
        )
        return TrtGraph(engine, io)

    @property
    def unet(self):
        return self.graphs["unet"]

    @property
    def classifier_grad(self):
        return self.graphs.get("classifier_grad")

    @property
    def super_res(self) -> bool:
        return self.manifest["model"]["kind"] == "SuperResUNet"

    @property
    def backend(self) -> str:  # the old name of runtime
        return self.runtime

    def model_fn(self, y: torch.Tensor | None = None, low_res: torch.Tensor | None = None):
        """model(x, t) for the solvers: the exported UNet with the inputs its graph declares
        after x and t (low_res for upsamplers, y for conditional models) bound."""
        given = {"low_res": low_res, "y": y}
        extra = [given[name] for name in self.unet.io.input_names[2:]]

        def model(x, t):
            return self.unet(x, t.float(), *extra)

        return model

    @property
    def cache_depth(self) -> int | None:
        """The skip depth of the export's feature-caching graphs (None: it has none here)."""
        if not all(name in self.graphs for name in CACHE_GRAPHS):
            return None
        return int(self.schedule["sampling"]["cache_depth"])

    def cached_model_fn(self, y=None, low_res=None, *, interval: int, depth: int | None = None):
        """model_fn with DeepCache feature reuse (`fastsample.featcache`): the split graph at
        every interval-th call, the shallow graph in between, at the export's skip depth."""
        from fastsample.featcache import CachedModelFn

        if self.runtime == "tensorrt":
            raise InputError(f"cache_interval={interval}: TensorRT engines hold the whole UNet "
                             "only; feature caching runs on onnxruntime and aoti")  # fmt: skip
        if self.cache_depth is None:
            raise InputError(
                f"cache_interval={interval}: {self.directory} has no feature-caching graphs "
                "(export it with a recipe that caches: `fastsample export --recipe FILE` with "
                "cache_interval > 1)"
            )
        if depth is not None and depth != self.cache_depth:
            raise InputError(f"cache_depth={depth}: this export's caching graphs split the UNet "
                             f"at depth {self.cache_depth}")  # fmt: skip
        given = {"low_res": low_res, "y": y}
        extra = [given[name] for name in self.unet.io.input_names[2:]]
        split, shallow = self.graphs["unet_split"], self.graphs["unet_shallow"]
        return CachedModelFn.of_functions(
            self.model_fn(y, low_res),
            lambda x, t: split(x, t.float(), *extra),
            lambda x, t, feature: shallow(x, t.float(), *extra, feature),
            interval, self.cache_depth,
        )  # fmt: skip

    def guidance_fn(self, y: torch.Tensor):
        """The exported classifier gradient for labels y (unscaled), for the solvers."""
        if self.classifier_grad is None:
            raise ExportError(f"{self.directory} has no classifier_grad graph")

        def guidance(x, t):
            return self.classifier_grad(x, t.float(), y)

        return guidance


def require_runtime(runtime: str) -> None:
    """Refuse at once (BackendUnavailable) where a runtime's package or device is missing."""
    if runtime == "onnxruntime":
        from .onnx import require_onnxruntime

        require_onnxruntime()
    elif runtime == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()


def _cache_root() -> Path:
    return Path(os.environ.get("FASTSAMPLE_CACHE") or Path.home() / ".cache" / "fastsample")


require_backend = require_runtime  # the old name


def graphs_for(
    model,
    classifier,
    runtime: str,
    diffusion: Diffusion,
    max_batch: int = 64,
    device: str | None = None,
    cache_depth: int | None = None,
) -> ExportedGraphs:
    """Export (once, into the cache) and load the graphs of eager networks for a runtime.

    Loaded graphs are kept per network object while its weights are unchanged (torch's
    in-place version counters), so repeated calls neither re-hash the weights nor reopen
    sessions."""
    if runtime not in _TARGET_OF:
        raise InputError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    require_runtime(runtime)
    memo_key = (runtime, device, max_batch, model.dtype, cache_depth, *_versions(model),
                id(classifier), *_versions(classifier))  # fmt: skip
    loaded = _LOADED.setdefault(model, {})
    if memo_key not in loaded:
        loaded.clear()  # weights or settings changed: drop the stale sessions
        loaded[memo_key] = _export_and_load(
            model, classifier, runtime, diffusion, max_batch, device, cache_depth
        )
    return loaded[memo_key]


def _versions(module) -> tuple[int, ...]:
    if module is None:
        return ()
    return tuple(t._version for t in (*module.parameters(), *module.buffers()))


_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _export_and_load(model, classifier, runtime, diffusion, max_batch, device,
                     cache_depth) -> ExportedGraphs:  # fmt: skip
    from .bundle import DTYPES, export

    dtype = {v: k for k, v in DTYPES.items()}[model.dtype]
    target = "onnx" if runtime in ("onnxruntime", "tensorrt") else "aoti"
    aoti_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key_parts = [
        weights_sha256(model),
        json.dumps(model.preset),
        dtype,
        target,
        torch.__version__,
        weights_sha256(classifier) if classifier is not None else "-",
        aoti_device if target == "aoti" else "-",
        *([] if cache_depth is None else [f"cache_depth={cache_depth}"]),
    ]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:24]
    out = _cache_root() / "exports" / key
    if not (out / "manifest.json").is_file():
        export(
            model,
            diffusion,
            out,
            classifier=classifier,
            target=target,
            dtype=dtype,
            max_batch=max_batch,
            device=aoti_device,
            overwrite=True,
            sampling={"cache_depth": cache_depth},
        )
    return ExportedGraphs(out, runtime=runtime, device=device)
