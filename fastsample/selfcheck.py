"""The GPU fast paths check themselves on first use, and remember what they found.

With `kernels="auto"` on CUDA, the first time a device and dtype runs a shape class, each fast
component is compared with the plain-torch reference on inputs of that shape class and timed
against PyTorch's own path:

- "group_norm": the Triton GroupNorm (forward; forward and backward where autograd records, as
  classifier guidance does) against native GroupNorm;
- "attention": the Triton attention (forward; and backward) against SDPA;
- "fused_update": the fused sampler-step kernel against the eager update (`FastEngine`; used
  wherever it is correct, as the captured step needs it; its time is recorded);
- "cuda_graph": one replay of the engine's captured step against one eager step.

Accuracy is judged against a float64 computation on the same inputs: a candidate may be at
most `FACTOR` times less accurate than the plain-torch reference at the same dtype, plus a floor
of a few units in the dtype's last place. A component that raises or falls outside that is
disabled for the shape class, with one warning per component and process naming it; among the
correct candidates the fastest runs. Decisions are cached on disk (`cache_path`) under a key of
GPU name, compute capability, driver, CUDA, torch, triton and fastsample versions, so later runs
pay nothing; a new driver or release checks again.

`FASTSAMPLE_KERNELS=torch` makes "auto" mean PyTorch's ops (and the engine's eager update);
`FASTSAMPLE_KERNELS=triton` makes it the Triton kernels without checking. Explicit
`kernels="triton"` is never checked either.
"""

from __future__ import annotations

import math

import torch

from .verdicts import (  # noqa: F401  (the self-check's API, kept under this module's name)
    FACTOR,
    FLOOR,
    FORCE_ENV,
    Check,
    Status,
    _forget,
    cache_dir,
    cache_path,
    cached,
    decide,
    decisions,
    environment,
    forced,
    judge,
    record,
    rel_err,
    reset,
    stopwatch,
    time_ms,
)


def _generator(device: torch.device) -> torch.Generator:
    """A private generator: checking never moves the caller's random streams."""
    return torch.Generator(device).manual_seed(0)


def _randn(shape, gen, dtype, device, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    channels_last = like is not None and like.ndim == 4 and not like.is_contiguous()
    if channels_last and like.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _grads(fn, inputs: tuple, dy: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """fn(*inputs), and its input gradient for dy when dy is given."""
    if dy is None:
        return (fn(*inputs),)
    with torch.enable_grad():
        x = inputs[0].detach().requires_grad_()
        y = fn(x, *inputs[1:])
        (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def _layout_name(x: torch.Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided" + str(tuple(x.stride()))


# -- GroupNorm ----------------------------------------------------------------------------------


def group_norm_choice(x, num_groups, weight, bias, eps, scale, shift, silu) -> str:
    """What runs ("triton" or "torch") for this GroupNorm's shape class (see the module doc)."""
    grad = torch.is_grad_enabled() and x.requires_grad
    affine = None if weight is None else weight.dtype
    key = (x.dtype, tuple(x.shape), x.stride(), num_groups, affine, scale is not None, silu, grad)

    def describe() -> str:
        spatial = "x".join(str(s) for s in x.shape[2:])
        parts = [str(x.dtype).removeprefix("torch."), f"N{x.shape[0]} C{x.shape[1]}",
                 f"G{num_groups}", spatial, _layout_name(x)]  # fmt: skip
        parts += ["affine"] if weight is not None else []
        parts += ["scale-shift"] if scale is not None else []
        parts += ["silu"] if silu else []
        parts += ["fwd+bwd"] if grad else []
        return " ".join(parts)

    def run() -> Check:
        return _check_group_norm(x, num_groups, weight, bias, eps, scale, shift, silu, grad,
                                 describe())  # fmt: skip

    return decide("group_norm", key, x.device, describe, run, "torch")


def _check_group_norm(x, num_groups, weight, bias, eps, scale, shift, silu, grad, shape_class):
    from fastsample.kernels import group_norm as kernel
    from fastsample.kernels.reference import group_norm_reference

    device, dtype = x.device, x.dtype
    gen = _generator(device)
    xs = (_randn(x.shape, gen, torch.float32, device, like=x) * 2 + 0.5).to(dtype)
    w = None if weight is None else _randn(weight.shape, gen, weight.dtype, device)
    b = None if bias is None else _randn(bias.shape, gen, bias.dtype, device)
    sc = None if scale is None else _randn(scale.shape, gen, scale.dtype, device) * 0.5
    sh = None if shift is None else _randn(shift.shape, gen, shift.dtype, device)
    dy = _randn(x.shape, gen, dtype, device, like=x) if grad else None
    if x.stride() != xs.stride():  # the caller's own strides (a token view, say)
        xs = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device=device).copy_(xs)

    def torch_path(v, w=w, b=b, sc=sc, sh=sh):
        return group_norm_reference(v, num_groups, w, b, eps, sc, sh, silu)

    def triton_path(v):
        return kernel.group_norm(v, num_groups, w, b, eps, scale=sc, shift=sh, silu=silu)

    def float64(v):
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return group_norm_reference(v.double(), num_groups, d(w), d(b), eps, d(sc), d(sh), silu)

    return judge(
        "group_norm", shape_class, dtype, device,
        reference=lambda: _grads(float64, (xs,), None if dy is None else dy.double()),
        candidates={"triton": lambda: _grads(triton_path, (xs,), dy),
                    "torch": lambda: _grads(torch_path, (xs,), dy)},
        baseline="torch", fast=("triton",), outputs=("output", "input gradient"),
    )  # fmt: skip


# -- attention ----------------------------------------------------------------------------------


def attention_choice(qkv: torch.Tensor, heads: int, order: str, queries: int | None) -> str:
    """What runs ("triton", "sdpa" or "torch") for this attention's shape class."""
    grad = torch.is_grad_enabled() and qkv.requires_grad
    key = (qkv.dtype, tuple(qkv.shape), qkv.stride(), heads, order, queries, grad)

    def describe() -> str:
        n, width, t = qkv.shape
        parts = [str(qkv.dtype).removeprefix("torch."), f"N{n} H{heads} D{width // (3 * heads)}",
                 f"T{t}", f"queries {queries or t}", order, _layout_name(qkv)]  # fmt: skip
        parts += ["fwd+bwd"] if grad else []
        return " ".join(parts)

    def run() -> Check:
        return _check_attention(qkv, heads, order, queries, grad, describe())

    return decide("attention", key, qkv.device, describe, run, "torch")


def _check_attention(qkv, heads, order, queries, grad, shape_class):
    from fastsample.kernels import attention as kernel
    from fastsample.kernels.reference import attention_reference

    from .ops import sdpa_attention

    device, dtype = qkv.device, qkv.dtype
    gen = _generator(device)
    q = _randn(qkv.shape, gen, dtype, device)
    if q.stride() != qkv.stride():
        q = torch.empty_strided(qkv.shape, qkv.stride(), dtype=dtype, device=device).copy_(q)
    rows = queries or qkv.shape[2]
    dy = _randn((qkv.shape[0], qkv.shape[1] // 3, rows), gen, dtype, device) if grad else None

    def path(fn):
        return lambda: _grads(lambda v: fn(v, heads, order, queries), (q,), dy)

    return judge(
        "attention", shape_class, dtype, device,
        reference=lambda: _grads(lambda v: attention_reference(v, heads, order, queries),
                                 (q.double(),), None if dy is None else dy.double()),
        candidates={"triton": path(kernel.attention), "sdpa": path(sdpa_attention),
                    "torch": path(attention_reference)},
        baseline="torch", fast=("triton",), outputs=("output", "input gradient"),
    )  # fmt: skip


# -- the fused update ---------------------------------------------------------------------------


def fused_update_choice(solver, tables, spec, shape: tuple, device: torch.device, guided: bool,
                        adds_noise: bool) -> str:  # fmt: skip
    """What runs ("fused" or "eager") for the fast engine's update of this shape class: the
    fused kernel against the eager update at the first, a middle and the last step."""
    shape = tuple(int(s) for s in shape)
    key = (solver.name, shape, tuple(spec), guided, adds_noise)

    def describe() -> str:
        parts = [solver.name, "x".join(map(str, shape))]
        parts += ["guided"] if guided else []
        parts += ["noise"] if adds_noise else []
        parts += ["learn-sigma"] if spec.learn_sigma else []
        parts += ["predicts-x0"] if spec.predict_xstart else []
        parts += ["clip"] if spec.clip else []
        return " ".join(parts)

    def run() -> Check:
        return _check_fused_update(solver, tables, spec, shape, device, guided, adds_noise,
                                   describe())  # fmt: skip

    return decide("fused_update", key, device, describe, run, "eager")


def _check_fused_update(solver, tables, spec, shape, device, guided, adds_noise, shape_class):
    from fastsample.kernels.sampler_step import sampler_step

    gen = _generator(device)
    n_steps = len(tables["t_model"])
    steps = sorted({n_steps - 1, n_steps // 2, 0}, reverse=True)
    out_shape = (shape[0], shape[1] * (2 if spec.learn_sigma else 1), *shape[2:])
    data = []
    for _ in steps:
        x = _randn(shape, gen, torch.float32, device)
        out = _randn(out_shape, gen, torch.float32, device).clamp(-3, 3)
        grad = _randn(shape, gen, torch.float32, device) if guided else None
        z = _randn(shape, gen, torch.float32, device) if adds_noise else None
        hist_shape = solver.history_shape(shape)
        history = None if hist_shape is None else _randn(hist_shape, gen, torch.float32, device)
        data.append((x, out, grad, z, history))
    scale = 2.5 if guided else 0.0
    index = [torch.full((), i, dtype=torch.int32, device=device) for i in steps]
    as64 = {name: t.double() if t.is_floating_point() else t for name, t in tables.items()}

    def copy(t, dtype=None):
        return None if t is None else t.to(dtype or t.dtype, copy=True)

    def eager(float64: bool):
        dtype = torch.float64 if float64 else None
        results = []
        for i, (x, out, grad, z, history) in zip(steps, data, strict=True):
            x_next, x0 = solver.update(
                as64 if float64 else tables, i, copy(x, dtype), copy(out, dtype),
                copy(grad, dtype), scale, copy(z, dtype), copy(history, dtype), spec,
            )  # fmt: skip
            results += [x_next, x0]
        return tuple(results)

    def fused():
        results = []
        for step, (x, out, grad, z, history) in zip(index, data, strict=True):
            results += sampler_step(
                solver.name, x, out, step, tables, grad=grad, scale=scale, z=z,
                history=copy(history), clip=spec.clip, learn_sigma=spec.learn_sigma,
                predict_xstart=spec.predict_xstart,
            )  # fmt: skip
        return tuple(results)

    names = tuple(f"{what} at step {i}" for i in steps for what in ("x_next", "x0"))
    # A correct fused update is used even where the eager one times faster: the captured step
    # reads its index from the device, which only the fused kernel does; without it the engine
    # loses its graphs, not one update's microseconds.
    return judge(
        "fused_update", shape_class, torch.float32, device,
        reference=lambda: eager(True), candidates={"fused": fused, "eager": lambda: eager(False)},
        baseline="eager", fast=("fused",), outputs=names, fastest=False,
    )  # fmt: skip


# -- the CUDA graph ---------------------------------------------------------------------------


def graph_class(solver: str, shape: tuple, dtype: torch.dtype, params: int, guided: bool) -> str:
    """The shape class of an engine step's graph."""
    parts = [solver, "x".join(map(str, shape)), str(dtype).removeprefix("torch."),
             f"{params / 1e6:.1f}M parameters"]  # fmt: skip
    return " ".join(parts + (["guided"] if guided else []))


def graph_verdict(shape_class: str, dtype: torch.dtype, replayed: tuple, eager: tuple,
                  ms: dict[str, float]) -> Check:  # fmt: skip
    """The verdict on one replay of a captured step against one eager step from the same
    state (the same kernels: they agree to the dtype's rounding or the graph is wrong)."""
    errors = [rel_err(r, e) for r, e in zip(replayed, eager, strict=True)]
    worst = max(errors)
    ok = worst <= FACTOR * FLOOR.get(dtype, 1e-5)
    error = "" if ok else f"the replay's step is off by {worst:.2g} (relative) from the eager step"
    status: Status = "FAILED" if not ok else "ok" if ms["graph"] <= ms["eager"] else "slower"
    use = "graph" if ok and status == "ok" else "eager"
    finite = {"graph": worst} if math.isfinite(worst) else {}
    return Check("cuda_graph", shape_class, use, status, error, finite, dict(ms))
