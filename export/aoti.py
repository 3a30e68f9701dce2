"""AOTInductor packages (.pt2): compiled graphs that libtorch loads without Python.

A package runs only on the kind of device it was compiled for, with the torch version that
compiled it (the manifest records both)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastsample.errors import BackendUnavailable

from .graphs import GraphIO, export_program


def compile_package(
    module: torch.nn.Module,
    io: GraphIO,
    path: str | os.PathLike,
    device: torch.device,
    classes: int = 1,
) -> Path:
    program = export_program(module, io, device=device, classes=classes)
    out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return Path(out)


class AotiGraph:
    """A loaded .pt2 package, called with torch tensors like the module it was made from."""

    def __init__(self, path: str | os.PathLike, io: GraphIO, device: str):
        self.path = Path(path)
        self.io = io
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"{self.path.name} was compiled for CUDA; no CUDA device here")
        self.runner = torch._inductor.aoti_load_package(str(self.path))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        args = [
            t.to(self.device, torch.int64 if dtype == "int64" else torch.float32).contiguous()
            for (_, dtype, _), t in zip(self.io.inputs, inputs, strict=True)
        ]
        out = self.runner(*args)
        return tuple(out) if len(self.io.outputs) > 1 else out
