"""`fastsample verify DIR`: an export checked against eager PyTorch.

1. every file's sha256 against the manifest (a mismatch fails at once);
2. the eager networks, loaded from the sources the manifest names and checked against its
   weights hashes, set to the export's precision;
3. each graph run on fresh random inputs at two batch sizes next to its eager function (the
   UNet module; the classifier's autograd input gradient), reporting per output the largest
   absolute error and that error relative to the output's largest magnitude.

Tolerances (relative to the output's scale) follow the graph's precision: float32 graphs differ
from eager only in summation order (1e-5); float16 torsos round every layer to 11 significant
bits (eps 9.8e-4; errors from dozens of layers compound: 2e-2); bfloat16 to 8 bits (eps 7.8e-3:
1e-1). bfloat16 ONNX graphs (opset 22) run on TensorRT or CUDA providers; ONNX Runtime's CPU
provider has no bfloat16 convolution, and verify says so instead of guessing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastsample.errors import ExportError, IntegrityError

from .bundle import (
    DTYPES,
    check_hashes,
    graph_io,
    read_manifest,
    weights_sha256,
)

TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 1e-1}
BATCHES = (1, 5)


@dataclass
class Check:
    graph: str
    batch: int
    output: str
    max_abs: float
    max_rel: float  # max |graph - eager| / max |eager|
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_rel) and self.max_rel <= self.tolerance

    def line(self) -> str:
        verdict = "PASSED" if self.ok else "FAILED"
        return (
            f"[{verdict}] {self.graph} batch {self.batch} {self.output}: max abs error "
            f"{self.max_abs:.3e}, relative to scale {self.max_rel:.3e} (tolerance "
            f"{self.tolerance:.0e})"
        )


def _eager(entry: dict, override: str | None, role: str, dtype: torch.dtype, device):
    from fastsample.checkpoint import load_model

    source = override or entry.get("source")
    if not source:
        raise ExportError(f"the manifest names no source for the {role}; pass --{role} FILE|PRESET")
    model = load_model(str(source), preset=entry.get("preset"), device=device)
    if weights_sha256(model) != entry["weights_sha256"]:
        model.set_precision(torch.float32)
        if weights_sha256(model) != entry["weights_sha256"]:
            raise ExportError(
                f"{role} {source!r} does not hold the weights this export was made from "
                "(weights sha256 differs from the manifest)"
            )
    return model.set_precision(dtype).eval()


def verify(
    directory: str | os.PathLike,
    model: str | None = None,
    classifier: str | None = None,
    batches: tuple[int, ...] = BATCHES,
    tolerance: float | None = None,
    seed: int = 0,
    log=lambda line: None,
) -> list[Check]:
    """Check an export; returns one Check per graph, batch and output (see the module doc).
    Raises ExportError on hash mismatches and unusable directories."""
    from fastsample.netfns import guidance_fn

    from .graphs import unet_cache_graphs, unet_graph
    from .runtime import ExportedGraphs

    directory = Path(directory)
    manifest = read_manifest(directory)
    bad = check_hashes(directory, manifest)
    if bad:
        raise IntegrityError(f"{directory}: {'; '.join(bad)}")
    log(f"sha256 of {len(manifest['files'])} files: match the manifest")
    graphs = ExportedGraphs(directory)
    device = graphs.device
    dtype = DTYPES[manifest["dtype"]]
    tol = TOLERANCE[manifest["dtype"]] if tolerance is None else tolerance
    net = _eager(manifest["model"], model, "model", dtype, device)
    eager = {"unet": unet_graph(net)}
    if graphs.cache_depth is not None:
        eager["unet_split"], eager["unet_shallow"] = unet_cache_graphs(net, graphs.cache_depth)
    if "classifier_grad" in manifest["graphs"]:
        clf = _eager(manifest["classifier"], classifier, "classifier", dtype, device)

        def grad(x, t, y):
            return guidance_fn(clf, y)(x, t)

        eager["classifier_grad"] = grad
    gen = torch.Generator().manual_seed(seed)
    checks = []
    for name, entry in manifest["graphs"].items():
        io = graph_io(entry)
        classes = (
            manifest["classifier"]["config"]["config"]["out_channels"]
            if name == "classifier_grad"
            else (net.config.num_classes or 1)
        )
        for batch in batches:
            inputs = [a.to(device) for a in io.example(batch, gen, classes=classes)]
            with torch.no_grad():
                got = graphs.graphs[name](*inputs)
            want = eager[name](*inputs)
            pairs = zip(io.output_names, _outputs(got), _outputs(want), strict=True)
            for output, g, w in pairs:
                want_f, got_f = w.detach().float(), g.float()
                diff = (got_f - want_f).abs().max().item()
                scale = want_f.abs().max().item()
                rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
                check = Check(name, batch, output, diff, rel, tol)
                log(check.line())
                checks.append(check)
    return checks


def _outputs(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)
