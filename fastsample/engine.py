"""The fast engine: minimal latency per guided sampling step.

Per step: the model and the guidance gradient (parameters frozen, no recomputation, the
classifier's attention pool computing only its first query) run concurrently on two CUDA
streams, and one fused Triton kernel (`fastsample.kernels.sampler_step`) does the whole update.
On CUDA the step is captured once per batch size in a CUDA graph and replayed for every step: the
step index, the noise, x_t and the multistep history live in static device buffers, so a replay
costs one launch.

`fused_update` is the kernel as an `update` for `fastsample.sampler.run` (the same loop as the
eager solvers, the reference for the graphs and streams); off CUDA, `FastEngine` runs the eager
updates (the kernel runs there only under TRITON_INTERPRET=1, for tests). All paths draw noise
in the eager loop's order and give its samples within the dtype's tolerance for the same seeds.
"""

from __future__ import annotations

import copy
import os

import torch

from . import netfns
from . import sampler as solvers


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

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def model_fn(self, y=None, low_res=None) -> netfns.ModelFn:
        return netfns.model_fn(self._model, y, low_res, layout=self._layout)

    def guidance_fn(self, y) -> netfns.GuidanceFn:
        return netfns.guidance_fn(self._classifier, y, layout=self._layout)

    def sample(self, sampler, diffusion, noise, *, y=None, model_y=None, low_res=None,
               eta=0.0, guidance_scale=0.0, clip_denoised=True, callback=None):  # fmt: skip
        """x_0 from noise(0) = x_T (noise(k): the fresh noise of step k), as sampler.run."""
        model = self.model_fn(model_y, low_res)
        guided = self.classifier is not None and guidance_scale != 0
        guidance = self.guidance_fn(y) if guided else None
        with torch.no_grad():
            if self.device.type == "cuda" and (self.cuda_graphs or self.streams):
                return self._on_cuda(sampler, diffusion, noise, model, guidance, eta,
                                     guidance_scale, clip_denoised, callback)  # fmt: skip
            update = fused_update(self.device, sampler) if kernel_available(self.device) else None
            return solvers.run(
                sampler, model, diffusion, noise, guidance=guidance,
                guidance_scale=guidance_scale, eta=eta, clip_denoised=clip_denoised,
                callback=callback, update=update,
            )  # fmt: skip

    def _step_body(self, solver, spec, tab, model, guidance, scale, x, step, z, x0, history):
        """One step on static buffers: t from the device step index, the model and the
        gradient (on a side stream when enabled), the fused update written into x in place."""
        from fastsample.kernels.sampler_step import sampler_step

        t = tab["t_model"].index_select(0, step.long().reshape(1)).expand(x.shape[0])
        grad = None
        if guidance is not None and self.streams:
            side = self._side
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                grad = guidance(x, t)
            out = model(x, t)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = model(x, t)
            if guidance is not None:
                grad = guidance(x, t)
        sampler_step(
            solver.name,
            x,
            out.float(),
            step,
            tab,
            grad=grad,
            scale=scale,
            z=z,
            history=history,
            clip=spec.clip,
            learn_sigma=spec.learn_sigma,
            predict_xstart=spec.predict_xstart,
            x_next=x,
            x0=x0,
        )  # fmt: skip  (in place: each element is read, then written)

    def _on_cuda(self, sampler, diffusion, noise, model, guidance, eta, scale, clip, callback):
        """The CUDA loop on static buffers: one captured graph replayed per step, or (without
        graphs) the same step body launched op by op, streams as configured."""
        solver = solvers.get_solver(sampler)
        tab = solver.tables(diffusion, self.device, float(eta))
        spec = solvers.Spec(diffusion.learn_sigma, diffusion.predict_xstart, bool(clip))
        x_t = noise(0).float()
        x = x_t.clone()
        z = torch.zeros_like(x) if solver.adds_noise(eta) else None
        x0 = torch.empty_like(x)
        history = torch.zeros_like(x) if solver.multistep else None
        step = torch.full((), diffusion.num_steps - 1, dtype=torch.int32, device=self.device)
        args = (solver, spec, tab, model, guidance, scale)
        graph = None
        if self.cuda_graphs:
            # Warm up on a side stream (allocator, cuDNN plans, autotuning), then capture.
            warm = torch.cuda.Stream(self.device)
            warm.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(warm):
                for _ in range(2):
                    scratch = x.clone()
                    self._step_body(*args, scratch, step, z, x0, history)
            torch.cuda.current_stream(self.device).wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step_body(*args, x, step, z, x0, history)
            x.copy_(x_t)
            if history is not None:
                history.zero_()
        n = diffusion.num_steps
        for k in range(1, n + 1):
            step.fill_(n - k)
            if solver.draws_noise:
                fresh = noise(k)  # every step, in the eager loop's order
                if z is not None:
                    z.copy_(fresh)
            if graph is not None:
                graph.replay()
            else:
                self._step_body(*args, x, step, z, x0, history)
            if callback is not None:
                callback(k, x.clone(), x0.clone())
        return x.clone()
