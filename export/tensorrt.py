"""TensorRT engines from the exported ONNX graphs, and a runtime that drives them from torch.

Networks are built strongly typed: the precision of every layer comes from the ONNX graph (an
fp16 export keeps GroupNorm statistics and softmax in float32 through explicit casts), not from
builder flags. One optimization profile spans batch 1..max_batch. Builds reuse a timing cache,
and finished engines are kept in a cache keyed by the graph's sha256, the TensorRT version, the
GPU's name and the profile, since an engine runs only where it was built.

Everything that does not need TensorRT itself (profiles, cache keys, the op check) is plain
Python and is tested everywhere; building and running need `import tensorrt` and a CUDA GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from fastsample.errors import BackendUnavailable, InputError, RuntimeFailure

from .graphs import GraphIO

# Ops of the exported UNet and gradient graphs, all in TensorRT's ONNX parser's support matrix.
SUPPORTED_OPS = frozenset(
    """Add AveragePool Cast Concat Constant ConstantOfShape Conv ConvTranspose Cos Div Einsum Equal
    Exp Expand Gather GatherElements Gemm GroupNormalization Identity InstanceNormalization
    LogSoftmax MatMul Mul Neg Pad Range ReduceMax ReduceMean ReduceSum Reshape Resize
    ScatterElements Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tile Transpose
    Unsqueeze Where""".split()
)


def require_tensorrt():
    """The tensorrt module, or a clear refusal where TensorRT or a CUDA GPU is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed: the tensorrt target and backend need NVIDIA's tensorrt "
            "Python package and a CUDA GPU (use --target onnx or aoti here)"
        ) from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, and torch sees none here")
    return tensorrt


def unsupported_ops(onnx_path: str | os.PathLike) -> list[str]:
    """Op types of the graph that TensorRT's ONNX parser does not take (empty when it can)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({n.op_type for n in model.graph.node} - SUPPORTED_OPS)


def profile_shapes(
    io: GraphIO, max_batch: int, opt_batch: int | None = None
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every input for one optimization profile over the batch."""
    if max_batch < 1:
        raise InputError(f"max_batch={max_batch}: expected >= 1")
    opt = min(max(opt_batch or 1, 1), max_batch)

    def at(shape, b):
        return tuple(b if s is None else s for s in shape)

    return {
        name: (at(shape, 1), at(shape, opt), at(shape, max_batch)) for name, _, shape in io.inputs
    }


def engine_cache_key(
    onnx_sha256: str, tensorrt_version: str, gpu_name: str, profile: dict[str, Any]
) -> str:
    """Engines are tied to the graph, the TensorRT version and the GPU model."""
    text = json.dumps(
        {"onnx": onnx_sha256, "tensorrt": tensorrt_version, "gpu": gpu_name, "profile": profile},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    root = os.environ.get("FASTSAMPLE_CACHE") or Path.home() / ".cache" / "fastsample"
    return Path(root) / "tensorrt"


def build_engine(
    onnx_path: str | os.PathLike,
    io: GraphIO,
    engine_path: str | os.PathLike,
    max_batch: int,
    opt_batch: int | None = None,
    workspace_gib: float = 8.0,
) -> dict[str, Any]:
    """Build (or take from the engine cache) the engine of one ONNX graph; write it to
    engine_path. Returns what the manifest records about it."""
    trt = require_tensorrt()
    from .bundle import sha256_file

    bad = unsupported_ops(onnx_path)
    if bad:
        raise RuntimeFailure(f"{Path(onnx_path).name} has ops TensorRT cannot parse: {bad}")
    shapes = profile_shapes(io, max_batch, opt_batch)
    gpu = torch.cuda.get_device_name()
    key = engine_cache_key(
        sha256_file(onnx_path),
        trt.__version__,
        gpu,
        {k: [list(s) for s in v] for k, v in shapes.items()},
    )
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"{key}.engine"
    info = {
        "cache_key": key,
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
    }
    if cached.is_file():
        Path(engine_path).write_bytes(cached.read_bytes())
        return {**info, "from_cache": True}

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeFailure(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    timing_path = cache / f"timing-{trt.__version__}-{gpu.replace(' ', '_')}.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, False)
    profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in shapes.items():
        profile.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeFailure(f"TensorRT failed to build an engine from {Path(onnx_path).name}")
    timing_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    data = bytes(memoryview(serialized))
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    Path(engine_path).write_bytes(data)
    return {**info, "from_cache": False}


class TrtGraph:
    """A TensorRT engine called with torch CUDA tensors (on torch's current stream)."""

    def __init__(self, engine_path: str | os.PathLike, io: GraphIO):
        trt = require_tensorrt()
        self.path = Path(engine_path)
        self.io = io
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeFailure(
                f"{self.path} could not be loaded: built by another TensorRT version or GPU?"
            )
        self.context = self.engine.create_execution_context()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        kept = []
        for (name, dtype, _), tensor in zip(self.io.inputs, inputs, strict=True):
            want = torch.int64 if dtype == "int64" else torch.float32
            tensor = tensor.to(self.device, want).contiguous()
            kept.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        ((name, _, shape),) = self.io.outputs
        batch = kept[0].shape[0]
        out = torch.empty([batch if s is None else s for s in shape], device=self.device)
        self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeFailure(f"TensorRT failed to run {self.path.name}")
        return out
