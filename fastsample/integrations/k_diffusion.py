"""fastsample networks as k-diffusion denoisers, so that k-diffusion's samplers
(`k_diffusion.sampling.sample_*`) run on the released ADM checkpoints.

k-diffusion works in the variance-exploding form of Karras et al. (2022): x = x0 + sigma * eps,
and a denoiser maps (x, sigma) to an estimate of x0. An ADM network is a discrete-time
variance-preserving model: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The two meet at
sigma = sqrt((1 - abar_t) / abar_t), x_t = x / sqrt(sigma^2 + 1). `KDiffusionDenoiser`:

- finds the (fractional) timestep t of sigma by interpolating log sigma over the training
  schedule's 1,000 (or `steps`) values, or, with quantize=True, the nearest one;
- calls the network on x_t (the labels `y` and an upsampler's `low_res` come in as k-diffusion's
  extra_args), drops the learned-variance channels and forms x0 = x - sigma * eps (or takes x0
  directly from predict_xstart networks);
- clips x0 to [-1, 1] (clip_denoised=True, the reference samplers' default: with the cosine
  schedule sigma reaches 2e4 at t = 999, where an unclipped x0 = x - sigma * eps is noise);
- with a classifier and a scale s, then guides as the reference's DDIM does (Dhariwal & Nichol's
  Algorithm 2, in its order): the eps of the clipped x0, minus sqrt(1 - abar) * s * grad log
  p(y | x_t, t), back to x0 (not clipped again); the classifier sees the network's x_t and t.

k-diffusion's Euler sampler on the schedule's own sigmas (`t_to_sigma` of a respacing's
timesteps, then 0) is then the reference's DDIM (eta 0) with the same clipping and guidance.

It does not need k-diffusion itself: the sigma helpers (`sigma_min`, `sigma_max`, `get_sigmas`,
`sigma_to_t`, `t_to_sigma`) are here, and k-diffusion's samplers take the object as `model`:

    from fastsample.integrations.k_diffusion import KDiffusionDenoiser
    denoiser = KDiffusionDenoiser(unet, classifier=clf, guidance_scale=2.0)
    sigmas = K.sampling.get_sigmas_karras(20, denoiser.sigma_min, denoiser.sigma_max)
    x = torch.randn(n, 3, 64, 64) * sigmas[0]
    x0 = K.sampling.sample_dpmpp_2m(denoiser, x, sigmas, extra_args={"y": labels})
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError, InputTypeError
from ..netfns import call_model, log_prob_grad
from ..schedule import Diffusion, betas_for


class KDiffusionDenoiser(nn.Module):
    """(x, sigma, y=None, low_res=None) -> x0, for k-diffusion's samplers. diffusion: the
    process the network was trained with (default: its preset's)."""

    def __init__(
        self, model: nn.Module, diffusion: Diffusion | None = None, *,
        classifier: nn.Module | None = None, guidance_scale: float = 0.0,
        clip_denoised: bool = True, quantize: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        from ..unet import Classifier

        if isinstance(model, Classifier):
            raise InputTypeError("model is a Classifier: expected a diffusion UNet")
        if classifier is not None and not isinstance(classifier, Classifier):
            raise InputTypeError(
                f"classifier is a {type(classifier).__name__}: expected a fastsample Classifier"
            )
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise InputError(f"guidance_scale {guidance_scale}: expected a finite number >= 0")
        self.model, self.classifier = model, classifier
        self.guidance_scale, self.quantize = float(guidance_scale), quantize
        self.clip_denoised = clip_denoised
        self.diffusion = diffusion or _preset_diffusion(model)
        d = self.diffusion
        abar = np.cumprod(1.0 - betas_for(d.noise_schedule, d.steps))
        sigmas = torch.from_numpy(np.sqrt((1 - abar) / abar))
        # The table in float64 (sigma -> t precisely); sigmas handed out in float32, as
        # k-diffusion's own schedules are (float64 ones would turn its samplers' x to float64).
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.channels = model.config.in_channels

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """n sigmas at evenly spaced timesteps from the last to the first, then 0 (every
        timestep where n is None): the discrete schedule's own noise levels."""
        if n is None:
            return torch.cat([self.sigmas.flip(0), self.sigmas.new_zeros(1)])
        if n < 1:
            raise InputError(f"n={n}: expected at least 1 sigma")
        t = torch.linspace(len(self.sigmas) - 1, 0, n, dtype=torch.float64,
                           device=self.sigmas.device)  # fmt: skip
        return torch.cat([self.t_to_sigma(t), self.sigmas.new_zeros(1)])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of each sigma: log sigma interpolated over the schedule (float64),
        clamped to [0, steps - 1]; the nearest timestep with quantize."""
        log_sigma = sigma.to(torch.float64).clamp_min(1e-300).log()
        table = self.log_sigmas.to(log_sigma.device)
        if self.quantize:
            return (log_sigma[..., None] - table).abs().argmin(-1).to(torch.float64)
        hi = torch.searchsorted(table, log_sigma.contiguous()).clamp(1, len(table) - 1)
        lo = hi - 1
        w = ((log_sigma - table[lo]) / (table[hi] - table[lo])).clamp(0, 1)
        return lo.to(torch.float64) + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long().clamp_max(len(self.sigmas) - 2)
        w = t - lo
        table = self.log_sigmas.to(t.device)
        return ((1 - w) * table[lo] + w * table[lo + 1]).exp().float()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None,
                low_res: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        guided = self.classifier is not None and self.guidance_scale > 0
        if guided and y is None:
            raise InputError("classifier guidance needs the labels: pass extra_args={'y': y}")
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).expand(x.shape[0])
        t = self.sigma_to_t(sigma)
        t_model = t * (1000.0 / self.diffusion.steps) if self.diffusion.rescale_timesteps else t
        t_model = t_model.to(torch.float32)
        c_in = (sigma**2 + 1).rsqrt().to(x.dtype).view(-1, 1, 1, 1)
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        x_t = (x * c_in).float()  # what the networks take, whatever the sampler's dtype
        out = call_model(self.model, x_t, t_model, y, low_res).to(x.dtype)
        head = out[:, : self.channels]
        x0 = head if self.diffusion.predict_xstart else x - s * head
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        if guided:
            grad = log_prob_grad(lambda z: self.classifier(z, t_model), x_t, y.reshape(-1))
            # eps of the (clipped) x0, minus sqrt(1 - abar) * scale * grad, back to x0
            x0 = x0 + s * (s * c_in) * self.guidance_scale * grad.to(x.dtype)
        return x0


def _preset_diffusion(model) -> Diffusion:
    from ..catalog import PRESETS

    preset = PRESETS.get(getattr(model, "preset", None) or "")
    if preset is None or preset.diffusion is None:
        raise InputError(
            "the network has no preset to take its diffusion from: pass diffusion="
            "fastsample.Diffusion(noise_schedule=..., steps=...) as it was trained"
        )
    return preset.diffusion
