"""ONNX graphs (opset 21, dynamic batch) and ONNX Runtime sessions driven with IO binding."""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import warnings
from pathlib import Path

import torch

from fastsample.errors import BackendUnavailable, InputTypeError

from .graphs import GraphIO, export_program

OPSET = 21  # the first opset with a native GroupNormalization node
# ONNX's Conv, ConvTranspose and AveragePool take bfloat16 from opset 22 on.
OPSET_BF16 = 22

# Execution providers in order of preference; the first installed one wins.
PROVIDER_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)

_NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64"}


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(
            "the onnxruntime runtime needs ONNX Runtime: pip install 'fastsample[onnx]' "
            "(or 'fastsample[onnx-gpu]' for CUDA)"
        ) from e
    return onnxruntime


def export_onnx(
    module: torch.nn.Module,
    io: GraphIO,
    path: str | os.PathLike,
    classes: int = 1,
    opset: int = OPSET,
) -> None:
    """Export `module` (inputs and outputs as `io` names them) to one self-contained .onnx file."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            "ONNX export needs onnx and onnxscript: pip install 'fastsample[export]'"
        ) from e
    program = export_program(module, io, classes=classes)
    args = io.example(2, classes=classes)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=io.input_names,
                output_names=io.output_names,
                verbose=False,
            )
            onnx_program.save(str(path), external_data=False)
    finally:
        quiet.setLevel(level)


def choose_providers(available: list[str] | None = None, device: str | None = None) -> list[str]:
    """The installed execution providers in fastsample's order of preference.

    device "cpu" keeps to the CPU provider; "cuda" requires a CUDA-capable one."""
    if available is None:
        available = require_onnxruntime().get_available_providers()
    ordered = [p for p in PROVIDER_ORDER if p in available]
    device = None if device is None else str(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device is not None and device.startswith("cuda"):
        gpu = [p for p in ordered if p != "CPUExecutionProvider"]
        if not gpu:
            raise BackendUnavailable(
                f"no CUDA execution provider in ONNX Runtime (installed: {', '.join(available)}): "
                "pip install 'fastsample[onnx-gpu]'"
            )
        return gpu + ["CPUExecutionProvider"]
    return ordered or ["CPUExecutionProvider"]


class OrtGraph:
    """One ONNX graph on an ONNX Runtime session; called with torch tensors, it binds their
    memory as the inputs and fresh torch tensors as the outputs (no copies through numpy); one
    output is returned as a tensor, several as a tuple."""

    def __init__(
        self,
        path: str | os.PathLike,
        io: GraphIO,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        ort = require_onnxruntime()
        self.path = Path(path)
        self.io = io
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or choose_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own exception types
            if "NOT_IMPLEMENTED" not in str(e):
                raise
            raise BackendUnavailable(
                f"ONNX Runtime ({', '.join(providers)}) cannot run {self.path.name}: "
                f"{str(e).split(':')[-1].strip()} (bf16 graphs need TensorRT or a CUDA provider)"
            ) from None
        self.providers = self.session.get_providers()
        gpu = self.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        )
        self._out_dtype = {"float32": torch.float32, "float16": torch.float16}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.io.inputs):
            raise InputTypeError(f"{self.path.name} takes {', '.join(self.io.input_names)}")
        binding = self.session.io_binding()
        kept = []
        batch = inputs[0].shape[0]
        for (name, dtype, _), tensor in zip(self.io.inputs, inputs, strict=True):
            want = torch.int64 if dtype == "int64" else torch.float32
            tensor = tensor.to(device=self.device, dtype=want).contiguous()
            kept.append(tensor)
            binding.bind_input(
                name,
                self.device.type,
                self.device.index or 0,
                _NUMPY_DTYPES[dtype],
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        outs = []
        for name, dtype, shape in self.io.outputs:
            out = torch.empty(
                [batch if s is None else s for s in shape],
                dtype=self._out_dtype[dtype],
                device=self.device,
            )
            binding.bind_output(
                name,
                self.device.type,
                self.device.index or 0,
                _NUMPY_DTYPES[dtype],
                tuple(out.shape),
                out.data_ptr(),
            )
            outs.append(out)
        if self.device.type == "cuda":
            binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        if self.device.type == "cuda":
            binding.synchronize_outputs()
        return outs[0] if len(outs) == 1 else tuple(outs)
