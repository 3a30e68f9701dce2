"""The two functions a guided sampler needs, as exportable modules with a dynamic batch.

- `UNetGraph`: (x_t, t[, low_res][, y]) -> the network output (eps and, with learned sigma, the
  variance interpolation values). t is float32, as the network's timestep embedding reads it.
- `classifier_grad_graph`: (x_t, t, y) -> grad_x log p(y | x_t), unscaled (the seam's
  `fastsample.netfns.log_prob_grad`, traced). `torch.export` and
  the ONNX exporters cannot trace `torch.autograd.grad`, so the input gradient is first traced
  into a plain forward graph with `make_fx` (a symbolic batch dimension, core ATen
  decompositions, weights passed explicitly and frozen), with decompositions for the two
  backward ops that no exporter lowers (a convolution's input gradient becomes a transposed
  convolution, an average pool's a broadcast). The result is an ordinary module that
  `torch.export` takes like any other.

Both modules keep the networks' precision: a float16/bfloat16 torso stays in that dtype while
GroupNorm statistics and softmax stay in float32, and every graph input and output is float32
(labels int64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsample.netfns import call_model, log_prob_grad
from fastsample.unet import Classifier, SuperResUNet, UNet

aten = torch.ops.aten

# An example batch that equals no static dimension of the networks (channels, sizes, classes).
EXAMPLE_BATCH = 7


@dataclass(frozen=True)
class GraphIO:
    """Names, dtypes and shapes (None: the dynamic batch) of a graph's inputs and outputs."""

    inputs: tuple[tuple[str, str, tuple[int | None, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int | None, ...]], ...]

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _, _ in self.outputs]

    def to_json(self) -> dict:
        def entry(name, dtype, shape):
            return {
                "name": name,
                "dtype": dtype,
                "shape": ["batch" if s is None else s for s in shape],
            }

        return {
            "inputs": [entry(*i) for i in self.inputs],
            "outputs": [entry(*o) for o in self.outputs],
        }

    def example(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        classes: int = 1,
        t_max: float = 1000.0,
    ) -> tuple[torch.Tensor, ...]:
        """Random inputs: images in N(0, 1), t uniform in [0, t_max), labels in [0, classes)."""
        out = []
        for name, _dtype, shape in self.inputs:
            full = [batch if s is None else s for s in shape]
            if name == "y":
                out.append(torch.randint(0, classes, full, generator=generator))
            elif name == "t":
                out.append(torch.rand(full, generator=generator) * t_max)
            else:
                out.append(torch.randn(full, generator=generator))
        return tuple(out)


class UNetGraph(torch.nn.Module):
    """The diffusion network with graph-friendly inputs: t as float32, y and low_res only
    where the network takes them."""

    def __init__(self, model: UNet, low_res_size: int | None = None):
        super().__init__()
        self.model = model
        self.super_res = isinstance(model, SuperResUNet)
        # The released upsamplers take 4x smaller images (64 -> 256, 128 -> 512).
        self.low_res_size = low_res_size or model.config.image_size // 4
        self.conditional = model.config.num_classes is not None

    def io(self) -> GraphIO:
        cfg = self.model.config
        c, s = cfg.in_channels, cfg.image_size
        inputs = [("x", "float32", (None, c, s, s)), ("t", "float32", (None,))]
        if self.super_res:
            low = self.low_res_size
            inputs.append(("low_res", "float32", (None, c, low, low)))
        if self.conditional:
            inputs.append(("y", "int64", (None,)))
        return GraphIO(tuple(inputs), (("out", "float32", (None, cfg.out_channels, s, s)),))

    def run(self, x, t, low_res=None, y=None):
        return call_model(self.model, x, t, y, low_res)


# torch.export wants a fixed signature: one subclass per input set.
class _Unconditional(UNetGraph):
    def forward(self, x, t):
        return self.run(x, t)


class _Conditional(UNetGraph):
    def forward(self, x, t, y):
        return self.run(x, t, y=y)


class _Upsampler(UNetGraph):
    def forward(self, x, t, low_res):
        return self.run(x, t, low_res=low_res)


class _ConditionalUpsampler(UNetGraph):
    def forward(self, x, t, low_res, y):
        return self.run(x, t, low_res=low_res, y=y)


def unet_graph(model: UNet, low_res_size: int | None = None) -> UNetGraph:
    """The exportable module of a diffusion network (inputs as in `UNetGraph.io`)."""
    conditional = model.config.num_classes is not None
    if isinstance(model, SuperResUNet):
        cls = _ConditionalUpsampler if conditional else _Upsampler
    else:
        cls = _Conditional if conditional else _Unconditional
    return cls(model.eval(), low_res_size)


# -- feature caching (fastsample.featcache): the UNet split at a skip depth -------------------


class _CacheGraph(UNetGraph):
    """Base of the two halves of a cached UNet call at skip `depth`. The deep feature travels
    between them as float32 (every graph input and output is): the torso's fp16/bf16 values
    round-trip through float32 exactly."""

    def __init__(self, model: UNet, depth: int, low_res_size: int | None = None):
        super().__init__(model, low_res_size)
        self.depth = model.check_depth(depth)
        self.feature_shape = feature_shape(model, depth, self.low_res_size)

    def _inputs(self, rest) -> dict:
        """The optional inputs by name (low_res, y, feature: those this graph takes)."""
        names = [name for name, _, _ in self.io().inputs[2:]]
        return dict(zip(names, rest, strict=True))

    def _feature_io(self):
        return ("feature", "float32", (None, *self.feature_shape))


class UNetSplitGraph(_CacheGraph):
    """(x_t, t[, low_res][, y]) -> (output, the deep feature): a full call that keeps the
    feature (`UNet.forward_split`)."""

    def io(self) -> GraphIO:
        base = super().io()
        return GraphIO(base.inputs, (*base.outputs, self._feature_io()))

    def forward(self, x, t, a=None, b=None):
        given = self._inputs([v for v in (a, b) if v is not None])
        if self.super_res:
            given.setdefault("low_res", None)
        out, feature = self.model.forward_split(x, t, **given, depth=self.depth)
        return out, feature.float()


class UNetShallowGraph(_CacheGraph):
    """(x_t, t[, low_res][, y], feature) -> output: the shallow blocks around a cached deep
    feature (`UNet.forward_shallow`)."""

    def io(self) -> GraphIO:
        base = super().io()
        return GraphIO((*base.inputs, self._feature_io()), base.outputs)

    def forward(self, x, t, a=None, b=None, c=None):
        given = self._inputs([v for v in (a, b, c) if v is not None])
        feature = given.pop("feature").to(self.model.dtype)
        return self.model.forward_shallow(x, t, **given, feature=feature, depth=self.depth)


def feature_shape(model: UNet, depth: int, low_res_size: int | None = None) -> tuple[int, ...]:
    """The deep feature's [C, H, W] at skip `depth` (from a batch of one on the meta device)."""
    from fastsample.unet import network_class

    cfg = model.config
    with torch.device("meta"):
        probe = network_class(cfg)(cfg).set_precision(torch.float32)
        size, channels = cfg.image_size, cfg.in_channels
        x, t = torch.zeros(1, channels, size, size), torch.zeros(1)
        kwargs = {"y": torch.zeros(1, dtype=torch.long)} if cfg.num_classes is not None else {}
        if isinstance(model, SuperResUNet):
            low = low_res_size or size // 4
            kwargs["low_res"] = torch.zeros(1, channels, low, low)
        _, feature = probe.forward_split(x, t, **kwargs, depth=depth)
    return tuple(feature.shape[1:])


def unet_cache_graphs(model: UNet, depth: int, low_res_size: int | None = None):
    """The exportable split and shallow modules of a diffusion network at skip `depth`."""
    model = model.eval()
    return UNetSplitGraph(model, depth, low_res_size), UNetShallowGraph(model, depth, low_res_size)


# -- the guidance gradient ---------------------------------------------------------------------


def _conv_input_grad(
    grad_out,
    inp,
    weight,
    bias_sizes,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
):
    """aten.convolution_backward, input gradient only: the transposed convolution."""
    if transposed:
        raise NotImplementedError("gradient through a transposed convolution is not exported")
    if output_mask[1] or output_mask[2]:
        raise NotImplementedError("weight gradients are not exported: freeze the classifier")
    spatial = inp.dim() - 2
    # The transposed convolution reproduces the input size up to the rows a strided forward
    # convolution never read: output_padding gives them back (as zeros).
    extra = []
    for d in range(spatial):
        size_in = inp.shape[2 + d]
        size_out = grad_out.shape[2 + d]
        k = weight.shape[2 + d]
        covered = (size_out - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k - 1) + 1
        extra.append(int(size_in - covered))
    grad_in = aten.convolution(
        grad_out, weight, None, stride, padding, dilation, True, extra, groups
    )
    return grad_in, None, None


def _avg_pool_input_grad(
    grad_out, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    """aten.avg_pool2d_backward for non-overlapping windows (ADM's 2x2 downsampling)."""
    kh, kw = (kernel_size * 2)[:2] if len(kernel_size) == 1 else kernel_size
    stride = list(stride) or [kh, kw]
    sh, sw = (stride * 2)[:2] if len(stride) == 1 else stride
    if (kh, kw) != (sh, sw) or any(padding) or ceil_mode:
        raise NotImplementedError(
            f"average-pool gradient with kernel {kernel_size}, stride {stride}, padding "
            f"{padding}: only non-overlapping, unpadded windows are exported"
        )
    divisor = divisor_override or kh * kw
    n, c, ho, wo = grad_out.shape
    g = (grad_out / divisor)[:, :, :, None, :, None].expand(n, c, ho, kh, wo, kw)
    g = g.reshape(n, c, ho * kh, wo * kw)
    pad_h = int(inp.shape[2] - ho * kh)
    pad_w = int(inp.shape[3] - wo * kw)
    if pad_h or pad_w:  # rows and columns the pool never read get no gradient
        g = F.pad(g, (0, pad_w, 0, pad_h))
    return g


def _empty_permuted(size, physical_layout, dtype=None, layout=None, device=None, pin_memory=None):
    return torch.zeros(size, dtype=dtype, device=device)


def _decompositions() -> dict:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_input_grad
    table[aten.avg_pool2d_backward.default] = _avg_pool_input_grad
    table[aten.empty_permuted.default] = _empty_permuted
    return table


class ClassifierGradGraph(torch.nn.Module):
    """grad_x sum_i log softmax(classifier(x, t))[i, y_i] as a plain forward graph.

    Built by `classifier_grad_graph`; its weights are buffers (nothing is trainable)."""

    def __init__(self, traced: torch.fx.GraphModule, weights: list[torch.Tensor], io: GraphIO):
        super().__init__()
        self.traced = traced
        self._io = io
        self.n_weights = len(weights)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w, persistent=False)

    def io(self) -> GraphIO:
        return self._io

    def forward(self, x, t, y):
        weights = [getattr(self, f"w{i}") for i in range(self.n_weights)]
        return self.traced(x, t, y, *weights)


def classifier_io(classifier: Classifier) -> GraphIO:
    cfg = classifier.config
    c, s = cfg.in_channels, cfg.image_size
    image = (None, c, s, s)
    return GraphIO(
        (("x", "float32", image), ("t", "float32", (None,)), ("y", "int64", (None,))),
        (("grad", "float32", image),),
    )


def classifier_grad_graph(classifier: Classifier) -> ClassifierGradGraph:
    """Trace the classifier's input gradient into a forward-only module (see the module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    classifier = classifier.eval()
    named = list(classifier.named_parameters()) + list(classifier.named_buffers())
    names = [n for n, _ in named]
    weights = [w.detach() for _, w in named]

    def grad_fn(x, t, y, *ws):
        state = dict(zip(names, ws, strict=True))
        return log_prob_grad(
            lambda x_in: torch.func.functional_call(classifier, state, (x_in, t)), x, y
        )

    io = classifier_io(classifier)
    example = io.example(EXAMPLE_BATCH, classes=classifier.config.out_channels)
    device = weights[0].device
    # Only the batch is symbolic: fixed image sizes keep the trace small and fast.
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(tensor: torch.Tensor, batch_dynamic: bool):
        sizes = [
            DimDynamic.DYNAMIC if (i == 0 and batch_dynamic) else DimDynamic.STATIC
            for i in range(tensor.dim())
        ]
        return mode.from_tensor(
            tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)
        )

    args = [fake(a.to(device), True) for a in example] + [fake(w, False) for w in weights]
    traced = make_fx(grad_fn, tracing_mode="symbolic", decomposition_table=_decompositions())(*args)
    return ClassifierGradGraph(traced, weights, io)


def export_program(
    module: torch.nn.Module, io: GraphIO, device: torch.device | str = "cpu", classes: int = 1
) -> torch.export.ExportedProgram:
    """torch.export with the batch dimension of every input dynamic (1 .. 4096)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    args = tuple(a.to(device) for a in io.example(EXAMPLE_BATCH, classes=classes))
    dynamic = tuple({0: batch} for _ in args)
    return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
