"""Export of fastsample networks for deployment (installed as fastsample.export).

`export(model, diffusion, out, classifier=..., target="onnx" | "tensorrt" | "aoti")` writes a
directory of graphs (the UNet and the classifier-guidance gradient), the respaced schedule and a
manifest; `load(out, backend=...)` runs it behind the samplers' seam; `verify(out)` re-checks it
against eager PyTorch. Heavy dependencies (onnx, onnxruntime, tensorrt) load only when used.
"""

from fastsample.errors import ExportError

from .bundle import TARGETS, export, read_manifest
from .runtime import BACKENDS, ExportedGraphs


def load(directory, backend: str | None = None, device: str | None = None) -> ExportedGraphs:
    """An export directory on a backend (default: the one its target is for)."""
    return ExportedGraphs(directory, backend=backend, device=device)


__all__ = [
    "BACKENDS",
    "TARGETS",
    "ExportError",
    "ExportedGraphs",
    "export",
    "load",
    "read_manifest",
]
