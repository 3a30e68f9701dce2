"""The seam between networks and samplers: the two functions every sampling path consumes.

- `model(x_t, t) -> out`: the diffusion network's output (eps or x0, then the variance values
  where sigma is learned); labels and an upsampler's low-resolution input are bound in.
- `guidance(x_t, t) -> grad`: the UNSCALED gradient d/dx_t sum_i log softmax(logits)[i, y_i] of
  a noisy-image classifier (Dhariwal & Nichol 2021, sec. 4); the solvers' updates apply the
  guidance scale, in one place.

Eager networks, the fast engine's prepared copies and exported graphs (`ExportedGraphs.
model_fn` / `guidance_fn`) all produce this pair; `call_model` (how a UNet or an upsampler is
called) and `log_prob_grad` (the classifier gradient) are written here once and used by all,
including the export graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GuidanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Layout = Callable[[torch.Tensor], torch.Tensor]


def call_model(model, x, t, y=None, low_res=None):
    """model(x_t, t) with the inputs it takes: upsamplers also read low_res."""
    if getattr(model, "takes_low_res", False):
        return model(x, t, low_res=low_res, y=y)
    return model(x, t, y)


def model_fn(
    model, y: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
    layout: Layout | None = None,
) -> ModelFn:  # fmt: skip
    """The model function of a diffusion network, labels (conditional models) and low_res
    (upsamplers) bound; layout(x) prepares x first (e.g. channels_last)."""
    if layout is None:
        return lambda x, t: call_model(model, x, t, y, low_res)
    return lambda x, t: call_model(model, layout(x), t, y, low_res)


def log_prob_grad(logits_fn: Callable[[torch.Tensor], torch.Tensor], x, y) -> torch.Tensor:
    """d/dx sum_i log softmax(logits_fn(x))[i, y_i] (softmax in float32); only the input
    gradient is taken, so the classifier's parameters may stay frozen."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(logits_fn(x_in).float(), dim=-1)
        selected = log_probs.gather(1, y.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad


def guidance_fn(classifier, y: torch.Tensor, layout: Layout | None = None) -> GuidanceFn:
    """The guidance function of a noisy-image classifier for labels y: the unscaled gradient of
    log p(y | x_t); t is what the diffusion model receives at that step."""
    y = y.reshape(-1)
    if layout is None:
        return lambda x, t: log_prob_grad(lambda x_in: classifier(x_in, t), x, y)

    def guidance(x, t):
        return log_prob_grad(lambda x_in: classifier(x_in, t), layout(x.detach()), y).contiguous()

    return guidance


def scaled(guidance: GuidanceFn, scale: float) -> GuidanceFn:
    """scale * guidance: the "guide" of Dhariwal & Nichol's algorithms, for callers outside the
    solvers (which take the gradient and the scale separately)."""
    return lambda x, t: guidance(x, t) * scale
