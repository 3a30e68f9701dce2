"""The fast engine's sampling loop: each step is the network call, the guidance gradient and one
fused update kernel (`fastsample.kernels.sampler_step`) instead of a dozen elementwise ops.

`fused_loop` draws noise in the eager loops' order and reports (k, x, x0) to the same callback,
so it is a drop-in for `fastsample.sampler.run` on devices where the kernel runs (CUDA, or the
CPU under TRITON_INTERPRET=1); `run` falls back to the eager loops elsewhere.

Work in progress (issue 7): CUDA-graph capture of whole guided steps and the UNet / gradient
overlap on two streams build on this loop; see NOTES.md.
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
