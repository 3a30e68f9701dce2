"""The fast engine: minimal latency per guided sampling step.

Per step: the UNet forward and the classifier's input gradient (parameters frozen, no
recomputation, the attention pool computing only its first query) run concurrently on two CUDA
streams, and one fused Triton kernel (`fastsample.kernels.sampler_step`) does the whole update.
On CUDA the step is captured once per batch size in a CUDA graph and replayed for every step: the
step index, the noise and x_t live in static device buffers, so a replay costs one launch.

`fused_loop` is the same loop without graphs or streams (and the reference for them); off CUDA,
`FastEngine` falls back to the eager loops (the fused kernel runs there only under
TRITON_INTERPRET=1, for tests). All paths draw noise in the eager loops' order and give the
eager path's samples within the dtype's tolerance for the same seeds.
"""

from __future__ import annotations

import os

import torch

from . import sampler as samplers
from .schedule import Diffusion

GradFn = samplers.GuideFn  # (x_t, t) -> unscaled grad_x log p(y | x_t)


def kernel_available(device: torch.device | str) -> bool:
    from fastsample.kernels import _triton

    device = torch.device(device)
    if not _triton.AVAILABLE:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fused_loop(
    sampler: str,
    net: samplers.NetFn,
    diffusion: Diffusion,
    noise: samplers.NoiseFn,
    *,
    eta: float = 0.0,
    grad: GradFn | None = None,
    guidance_scale: float = 0.0,
    clip_denoised: bool = True,
    callback: samplers.StepCallback | None = None,
) -> torch.Tensor:
    """sampler.run's loops with the update fused; grad is the unscaled classifier gradient."""
    from fastsample.kernels.sampler_step import StepKernel

    x = noise(0).float()
    kernel = StepKernel(sampler, diffusion, x.device, eta, clip_denoised, guidance_scale)
    tab = samplers.step_tables(diffusion, x.device)
    step = torch.zeros((), dtype=torch.int32, device=x.device)
    guided = grad is not None and guidance_scale != 0
    n = diffusion.num_steps
    for k in range(1, n + 1):
        i = n - k
        step.fill_(i)
        t = tab.t_model[i].expand(x.shape[0])
        out = net(x, t)
        g = grad(x, t) if guided else None
        z = noise(k)  # every step, as the eager loops draw it
        x, x0 = kernel(x, out.float(), step, g, z)
        if callback is not None:
            callback(k, x, x0)
    return x


def run(
    sampler: str,
    net: samplers.NetFn,
    diffusion: Diffusion,
    noise: samplers.NoiseFn,
    *,
    eta: float = 0.0,
    grad: GradFn | None = None,
    guidance_scale: float = 0.0,
    clip_denoised: bool = True,
    callback: samplers.StepCallback | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fused loop where its kernel runs, else the eager loops (same results, same RNG)."""
    if kernel_available(device):
        return fused_loop(
            sampler, net, diffusion, noise, eta=eta, grad=grad, guidance_scale=guidance_scale,
            clip_denoised=clip_denoised, callback=callback,
        )  # fmt: skip
    guide = None
    if grad is not None and guidance_scale != 0:

        def guide(x, t):
            return grad(x, t) * guidance_scale

    return samplers.run(
        sampler, net, diffusion, noise, eta=eta, guide=guide, clip_denoised=clip_denoised,
        callback=callback,
    )  # fmt: skip


class FastEngine:
    """Guided sampling on prepared networks (see the module doc).

    model, classifier: the eager networks; the engine sets them to eval, freezes their
    parameters, makes the attention pool compute only its first query, and on CUDA runs them
    channels_last. compile: torch.compile the networks. cuda_graphs / streams: on CUDA only.
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
        from .unet import AttentionPool2d

        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.model = model.eval().requires_grad_(False)
        self.classifier = (
            classifier.eval().requires_grad_(False) if classifier is not None else None
        )
        if self.classifier is not None:
            for m in self.classifier.modules():
                if isinstance(m, AttentionPool2d):
                    m.first_query_only = True
        self.channels_last = cuda if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            if self.classifier is not None:
                self.classifier.to(memory_format=torch.channels_last)
        self._model_fn = torch.compile(self.model) if compile else self.model
        self._clf_fn = (
            torch.compile(self.classifier) if compile and self.classifier is not None
            else self.classifier
        )  # fmt: skip
        self.cuda_graphs = cuda and cuda_graphs
        self.streams = cuda and streams
        # Created once: no stream is created while a graph is being captured.
        self._side = torch.cuda.Stream(self.device) if self.streams else None

    # -- the two network functions -----------------------------------------------------------

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def net_fn(self, y=None, low_res=None):
        from .unet import SuperResUNet

        model = self._model_fn
        if isinstance(self.model, SuperResUNet):
            return lambda x, t: model(self._layout(x), t, low_res=low_res, y=y)
        return lambda x, t: model(self._layout(x), t, y)

    def grad_fn(self, y):
        """Unscaled grad_x sum_i log softmax(classifier(x, t))[i, y_i] (input gradient only)."""
        clf = self._clf_fn

        def grad(x, t):
            with torch.enable_grad():
                x_in = self._layout(x.detach()).requires_grad_(True)
                logits = clf(x_in, t).float()
                selected = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).sum()
                (g,) = torch.autograd.grad(selected, x_in)
            return g.contiguous()

        return grad

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, sampler, diffusion, noise, *, y=None, model_y=None, low_res=None,
               eta=0.0, guidance_scale=0.0, clip_denoised=True, callback=None):  # fmt: skip
        """x_0 from noise(0) = x_T (noise(k): the fresh noise of step k), as sampler.run."""
        net = self.net_fn(model_y, low_res)
        guided = self.classifier is not None and guidance_scale != 0
        grad = self.grad_fn(y) if guided else None
        with torch.no_grad():
            if self.device.type == "cuda" and (self.cuda_graphs or self.streams):
                return self._on_cuda(sampler, diffusion, noise, net, grad, eta, guidance_scale,
                                     clip_denoised, callback)  # fmt: skip
            return run(
                sampler, net, diffusion, noise, eta=eta, grad=grad,
                guidance_scale=guidance_scale, clip_denoised=clip_denoised, callback=callback,
                device=self.device,
            )  # fmt: skip

    def _step_body(self, kernel, net, grad, x, step, z, x0, t_model):
        """One step on static buffers: t from the device step index, the UNet and the gradient
        (on a side stream when enabled), the fused update written into x in place."""
        t = t_model.index_select(0, step.long().reshape(1)).expand(x.shape[0])
        g = None
        if grad is not None and self.streams:
            side = self._side
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                g = grad(x, t)
            out = net(x, t)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            out = net(x, t)
            if grad is not None:
                g = grad(x, t)
        kernel(x, out.float(), step, g, z, x_next=x, x0=x0)  # in place: read, then write

    def _on_cuda(self, sampler, diffusion, noise, net, grad, eta, scale, clip, callback):
        """The CUDA loop on static buffers: one captured graph replayed per step, or (without
        graphs) the same step body launched op by op, streams as configured."""
        from fastsample.kernels.sampler_step import StepKernel

        x_t = noise(0).float()
        kernel = StepKernel(sampler, diffusion, self.device, eta, clip, scale)
        tab = samplers.step_tables(diffusion, self.device)
        x = x_t.clone()
        z = torch.zeros_like(x)
        x0 = torch.empty_like(x)
        step = torch.full((), diffusion.num_steps - 1, dtype=torch.int32, device=self.device)
        if sampler == "dpm++2m":
            kernel.x0_prev = torch.zeros_like(x)
        graph = None
        if self.cuda_graphs:
            # Warm up on a side stream (allocator, cuDNN plans, autotuning), then capture.
            warm = torch.cuda.Stream(self.device)
            warm.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(warm):
                for _ in range(2):
                    scratch = x.clone()
                    self._step_body(kernel, net, grad, scratch, step, z, x0, tab.t_model)
            torch.cuda.current_stream(self.device).wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step_body(kernel, net, grad, x, step, z, x0, tab.t_model)
            x.copy_(x_t)
            if kernel.x0_prev is not None:
                kernel.x0_prev.zero_()
        n = diffusion.num_steps
        for k in range(1, n + 1):
            step.fill_(n - k)
            z.copy_(noise(k))
            if graph is not None:
                graph.replay()
            else:
                self._step_body(kernel, net, grad, x, step, z, x0, tab.t_model)
            if callback is not None:
                callback(k, x.clone(), x0.clone())
        return x.clone()
