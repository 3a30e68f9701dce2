"""The fast engine: minimal latency per guided sampling step.

Per step: the model and the guidance gradient (parameters frozen, no recomputation, the
classifier's attention pool computing only its first query) run concurrently on two CUDA
streams, and one fused Triton kernel (`fastsample.kernels.sampler_step`) does the whole update.
On CUDA the step is captured once per request shape (batch shape, sampler, schedule, guidance) in
a CUDA graph and replayed for every step of every later batch of that shape: the step index, the
noise, x_t, the multistep history, the labels and low-resolution inputs live in static device
buffers, so a replay costs one launch.

`fused_update` is the kernel as an `update` for `fastsample.sampler.run`, the eager solvers'
loop. `FastEngine` runs its static-buffer loop wherever the kernel runs (CUDA; the CPU only under
TRITON_INTERPRET=1, which is how the tests run it without a GPU), else the eager loop. All paths
draw noise in the eager loop's order and give its samples within the dtype's tolerance for the
same seeds.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from . import netfns
from . import sampler as solvers
from .errors import InputError


def kernel_available(device: torch.device | str) -> bool:
    from fastsample.kernels import _triton

    device = torch.device(device)
    if not _triton.AVAILABLE:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_update(device: torch.device | str, solver: str) -> solvers.UpdateFn:
    """The fused kernel with the eager updates' signature, for `sampler.run(update=...)`."""
    from fastsample.kernels.sampler_step import sampler_step

    step = torch.zeros((), dtype=torch.int32, device=device)

    def update(tab, i, x, out, grad, scale, z, history, spec):
        step.fill_(i)
        return sampler_step(
            solver, x.float(), out.float(), step, tab, grad=grad, scale=scale, z=z,
            history=history, clip=spec.clip, learn_sigma=spec.learn_sigma,
            predict_xstart=spec.predict_xstart,
        )  # fmt: skip

    return update


def prepared_copy(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """An inference copy of a network for the engine: eval mode, parameters frozen and sharing
    the caller's storage (channels_last re-lays the 4-D weights into new tensors of the copy),
    the classifier's attention pool computing only its first query. The caller's module is
    left as it was."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    prepared = copy.deepcopy(module, memo).eval()
    for m in prepared.modules():
        if hasattr(m, "first_query_only"):
            m.first_query_only = True
    if channels_last:
        prepared.to(memory_format=torch.channels_last)
    return prepared


class FastEngine:
    """Guided sampling on prepared copies of the networks (see the module doc).

    model, classifier: the eager networks; the engine never changes them: it samples with
    `prepared_copy`s that share their weights. Rebuild the engine after changing the weights
    in place. compile: torch.compile the copies. cuda_graphs / streams: on CUDA only.
    """

    MAX_SHAPES = 4  # request shapes whose buffers (and captured graphs) are kept

    def __init__(
        self,
        model,
        classifier=None,
        *,
        channels_last: bool | None = None,
        compile: bool = False,
        cuda_graphs: bool = True,
        streams: bool = True,
    ):
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        self.model = prepared_copy(model, self.channels_last)
        self.classifier = (
            prepared_copy(classifier, self.channels_last) if classifier is not None else None
        )
        self._model = torch.compile(self.model) if compile else self.model
        self._classifier = (
            torch.compile(self.classifier) if compile and self.classifier is not None
            else self.classifier
        )  # fmt: skip
        self.cuda_graphs = cuda and cuda_graphs
        self.streams = cuda and streams
        # Created once: no stream is created while a graph is being captured.
        self._side = torch.cuda.Stream(self.device) if self.streams else None
        self._static: dict[tuple, _Static] = {}  # per request shape (see sample)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model_fn(self, y=None, low_res=None) -> netfns.ModelFn:
        return netfns.model_fn(self._model, y, low_res, layout=self._layout)

    def guidance_fn(self, y) -> netfns.GuidanceFn:
        return netfns.guidance_fn(self._classifier, y, layout=self._layout)

    def sample(self, sampler, diffusion, noise, *, y=None, model_y=None, low_res=None,
               eta=0.0, guidance_scale=0.0, clip_denoised=True, callback=None):  # fmt: skip
        """x_0 from noise(0) = x_T (noise(k): the fresh noise of step k), as sampler.run.

        Where the fused kernel runs (CUDA; the CPU under TRITON_INTERPRET=1) the loop runs on
        static buffers kept per request shape (`_Static`): a run's later batches of the same
        shape reuse them and, on CUDA, replay the step graph captured for the first."""
        guided = self.classifier is not None and guidance_scale != 0
        with torch.no_grad():
            if kernel_available(self.device):
                return self._static_loop(sampler, diffusion, noise, y if guided else None,
                                         model_y, low_res, float(eta), float(guidance_scale),
                                         bool(clip_denoised), callback)  # fmt: skip
            return solvers.run(
                sampler, self.model_fn(model_y, low_res), diffusion, noise,
                guidance=self.guidance_fn(y) if guided else None, guidance_scale=guidance_scale,
                eta=eta, clip_denoised=clip_denoised, callback=callback,
            )  # fmt: skip

    def _step_body(self, st: _Static, x: torch.Tensor) -> None:
        """One step on static buffers: t from the device step index, the model and the
        gradient (on a side stream when enabled), the fused update written into x in place."""
        from fastsample.kernels.sampler_step import sampler_step

        t = st.tables["t_model"].index_select(0, st.step.long().reshape(1)).expand(x.shape[0])
        grad = None
        if st.guidance is not None and self.streams:
            side = self._side
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                grad = st.guidance(x, t)
            out = st.model(x, t)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = st.model(x, t)
            if st.guidance is not None:
                grad = st.guidance(x, t)
        spec = st.spec
        sampler_step(
            st.solver.name,
            x,
            out.float(),
            st.step,
            st.tables,
            grad=grad,
            scale=st.scale,
            z=st.z,
            history=st.history,
            clip=spec.clip,
            learn_sigma=spec.learn_sigma,
            predict_xstart=spec.predict_xstart,
            x_next=x,
            x0=st.x0,
        )  # fmt: skip  (in place: each element is read, then written)

    def _prepare(self, key, sampler, diffusion, shape, y, model_y, low_res, eta, scale, clip):
        """Static buffers (and on CUDA the captured step) for one request shape."""
        solver = solvers.get_solver(sampler)
        device = self.device

        def static(t):
            return None if t is None else t.to(device).clone()

        st = _Static(
            solver=solver,
            tables=solver.tables(diffusion, device, eta),
            spec=solvers.Spec(diffusion.learn_sigma, diffusion.predict_xstart, clip),
            scale=scale,
            x=torch.zeros(shape, device=device),
            z=torch.zeros(shape, device=device) if solver.adds_noise(eta) else None,
            x0=torch.zeros(shape, device=device),
            history=torch.zeros(shape, device=device) if solver.multistep else None,
            step=torch.full((), diffusion.num_steps - 1, dtype=torch.int32, device=device),
            y=static(y),
            model_y=static(model_y),
            low_res=static(low_res),
        )
        st.model = self.model_fn(st.model_y, st.low_res)
        st.guidance = self.guidance_fn(st.y) if st.y is not None else None
        if self.cuda_graphs:
            # Warm up on a side stream (allocator, cuDNN plans, autotuning), then capture once.
            warm = torch.cuda.Stream(device)
            warm.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(warm):
                for _ in range(2):
                    self._step_body(st, st.x.clone())
            torch.cuda.current_stream(device).wait_stream(warm)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):
                self._step_body(st, st.x)
        while len(self._static) >= self.MAX_SHAPES:  # the oldest goes (dicts keep order)
            self._static.pop(next(iter(self._static)))
        self._static[key] = st
        return st

    def _static_loop(self, sampler, diffusion, noise, y, model_y, low_res, eta, scale, clip,
                     callback):  # fmt: skip
        if eta < 0:
            raise InputError(f"eta={eta}: expected >= 0")
        x_t = noise(0).float()
        key = (
            tuple(x_t.shape), sampler, diffusion, eta, scale, clip, y is not None,
            model_y is not None, None if low_res is None else tuple(low_res.shape),
        )  # fmt: skip
        st = self._static.get(key)
        if st is None:
            st = self._prepare(key, sampler, diffusion, x_t.shape, y, model_y, low_res, eta,
                               scale, clip)  # fmt: skip
        for buffer, value in ((st.y, y), (st.model_y, model_y), (st.low_res, low_res)):
            if buffer is not None:
                buffer.copy_(value)
        st.x.copy_(x_t)
        if st.history is not None:
            st.history.zero_()
        n = diffusion.num_steps
        for k in range(1, n + 1):
            st.step.fill_(n - k)
            if st.solver.draws_noise:
                fresh = noise(k)  # every step, in the eager loop's order
                if st.z is not None:
                    st.z.copy_(fresh)
            if st.graph is not None:
                st.graph.replay()
            else:
                self._step_body(st, st.x)
            if callback is not None:
                callback(k, st.x.clone(), st.x0.clone())
        return st.x.clone()


@dataclass(eq=False)
class _Static:
    """One request shape's static buffers: x_t, the step's noise, x0, the multistep history,
    the step index, labels and low-resolution inputs; the model and guidance functions bound to
    them; on CUDA the captured step graph."""

    solver: solvers.Solver
    tables: solvers.Tables
    spec: solvers.Spec
    scale: float
    x: torch.Tensor
    z: torch.Tensor | None
    x0: torch.Tensor
    history: torch.Tensor | None
    step: torch.Tensor
    y: torch.Tensor | None
    model_y: torch.Tensor | None
    low_res: torch.Tensor | None
    model: netfns.ModelFn | None = None
    guidance: netfns.GuidanceFn | None = None
    graph: torch.cuda.CUDAGraph | None = None
