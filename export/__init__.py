"""Export of fastsample networks for deployment (installed as fastsample.export).

`export(model, diffusion, out, classifier=..., target="onnx" | "tensorrt" | "aoti")` writes a
directory of graphs (the UNet and the classifier-guidance gradient), the respaced schedule and a
manifest; `load(out, runtime=...)` runs it behind the samplers' seam (`fastsample.netfns`);
`verify(out)` re-checks it against eager PyTorch. Heavy dependencies (onnx, onnxruntime,
tensorrt) load only when used.
"""

from fastsample._deprecation import _UNSET, renamed
from fastsample.errors import ExportError

from .bundle import TARGETS, export, read_manifest
from .runtime import BACKENDS, RUNTIMES, ExportedGraphs


def load(directory, runtime: str | None = None, device: str | None = None, backend=_UNSET):
    """An export directory on a runtime (default: the one its target is for); backend= is the
    old name of runtime=."""
    runtime = renamed("runtime", runtime, "backend", backend, None)
    return ExportedGraphs(directory, runtime=runtime, device=device)


__all__ = [
    "BACKENDS",
    "RUNTIMES",
    "TARGETS",
    "ExportError",
    "ExportedGraphs",
    "export",
    "load",
    "read_manifest",
]
