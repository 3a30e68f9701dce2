"""Classifier guidance (Dhariwal & Nichol 2021, sec. 4): the gradient of log p(y | x_t).

`classifier_guide` turns a noisy-image classifier into the `guide(x_t, t)` function that the
samplers take. Only the input gradient is needed: the classifier's parameters can stay frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampler import GuideFn


def classifier_guide(classifier: torch.nn.Module, y: torch.Tensor, scale: float) -> GuideFn:
    """guide(x_t, t) = scale * d/dx_t sum_i log softmax(classifier(x_t, t))[i, y_i].

    t is what the diffusion model receives at that step (the original integer timestep).
    """
    y = y.reshape(-1)

    def guide(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad * scale

    return guide
