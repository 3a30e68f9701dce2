"""Sampling loops over any network function: ancestral (DDPM), DDIM, DPM-Solver++(2M).

The loops know a network only as `net(x_t, t) -> output` (t: what the network is given at a
step, [B]) and guidance only as an optional `guide(x_t, t) -> s * grad_x log p(y | x_t)`. Per-step
coefficients are gathered from float64 tables into float32 once, before the loop; the loop reads
them by Python step index and never synchronises with the device.

- DDPM: Ho et al. 2020, with the learned variance interpolation of Nichol & Dhariwal 2021 (eq. 15);
  guidance shifts the mean by Sigma * guide (Dhariwal & Nichol 2021, Algorithm 1).
- DDIM: Song et al. 2021 (eq. 12, eta); guidance corrects eps by -sqrt(1 - alpha_bar) * guide
  (Dhariwal & Nichol 2021, Algorithm 2).
- DPM-Solver++(2M): Lu et al. 2022 (Algorithm 2), multistep second order in the data prediction,
  on the respaced schedule's discrete alpha_bar, first order on the first step and on the last
  two ("lower order final"); guidance as for DDIM.

Each loop reproduces the reference's arithmetic (operation order, float32 intermediates), so that
with the same noise the samples agree to float32 rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import InputError
from .schedule import Diffusion

SamplerName = Literal["ddpm", "ddim", "dpm++2m"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm++2m")

NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GuideFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]  # k -> x_T for k = 0, else the fresh noise of step k
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step k, x, pred_xstart)


@dataclass(frozen=True)
class StepTables:
    """Per-step float32 coefficients on one device, indexed by respaced step i."""

    t_model: torch.Tensor  # what the network receives: original timestep (or rescaled float)
    sqrt_recip_ac: torch.Tensor
    sqrt_recipm1_ac: torch.Tensor
    coef1: torch.Tensor
    coef2: torch.Tensor
    min_log: torch.Tensor  # clipped posterior log variance
    max_log: torch.Tensor  # log beta
    fixed_log_var: torch.Tensor  # without learned sigma: log [post_var[1], betas[1:]]
    sqrt_one_minus_ac: torch.Tensor  # float32 sqrt of float32 (1 - alpha_bar), as cond_score
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor


@functools.lru_cache(maxsize=32)
def step_tables(diffusion: Diffusion, device: torch.device) -> StepTables:
    c = diffusion.coefficients()

    def f32(a: np.ndarray) -> torch.Tensor:  # float64 -> float32, as the reference's gather
        return torch.from_numpy(np.ascontiguousarray(a)).float()

    ac = f32(c.alphas_cumprod)
    t_model = torch.from_numpy(diffusion.model_timesteps())
    t_model = t_model.float() if diffusion.rescale_timesteps else t_model.long()
    tables = StepTables(
        t_model=t_model,
        sqrt_recip_ac=f32(c.sqrt_recip_alphas_cumprod),
        sqrt_recipm1_ac=f32(c.sqrt_recipm1_alphas_cumprod),
        coef1=f32(c.posterior_mean_coef1),
        coef2=f32(c.posterior_mean_coef2),
        min_log=f32(c.posterior_log_variance_clipped),
        max_log=f32(c.log_betas),
        fixed_log_var=f32(c.fixed_large_log_variance),
        sqrt_one_minus_ac=(1 - ac).sqrt(),
        alphas_cumprod=ac,
        alphas_cumprod_prev=f32(c.alphas_cumprod_prev),
    )
    return StepTables(**{k: v.to(device) for k, v in vars(tables).items()})


def _predict(net, x, i, tab: StepTables, diffusion: Diffusion, clip: bool):
    """Network call and x0 prediction of one step -> (t, pred_xstart, variance values or None)."""
    t = tab.t_model[i].expand(x.shape[0])
    out = net(x, t)
    var_values = None
    if diffusion.learn_sigma:
        out, var_values = torch.split(out, x.shape[1], dim=1)
    if diffusion.predict_xstart:
        x0 = out
    else:
        x0 = tab.sqrt_recip_ac[i] * x - tab.sqrt_recipm1_ac[i] * out
    if clip:
        x0 = x0.clamp(-1, 1)
    return t, x0, var_values


def _eps_from_x0(x, x0, i, tab: StepTables):
    return (tab.sqrt_recip_ac[i] * x - x0) / tab.sqrt_recipm1_ac[i]


def _guided_x0(x, x0, t, i, tab: StepTables, guide: GuideFn):
    """The reference's condition_score: eps' = eps - sqrt(1 - alpha_bar) * guide; x0 from eps'
    (not clipped again)."""
    eps = _eps_from_x0(x, x0, i, tab) - tab.sqrt_one_minus_ac[i] * guide(x, t)
    return tab.sqrt_recip_ac[i] * x - tab.sqrt_recipm1_ac[i] * eps


def _progress(steps: range, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="sampling", unit="step")


def ddpm_loop(
    net: NetFn,
    diffusion: Diffusion,
    noise: NoiseFn,
    *,
    guide: GuideFn | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling with the learned (or fixed large) variance."""
    x = noise(0)
    tab = step_tables(diffusion, x.device)
    n = diffusion.num_steps
    for k in _progress(range(1, n + 1), progress):
        i = n - k
        t, x0, v = _predict(net, x, i, tab, diffusion, clip_denoised)
        if v is not None:
            frac = (v + 1) / 2
            log_var = frac * tab.max_log[i] + (1 - frac) * tab.min_log[i]
        else:
            log_var = tab.fixed_log_var[i].expand_as(x)
        mean = tab.coef1[i] * x0 + tab.coef2[i] * x
        z = noise(k)
        if guide is not None:
            mean = mean.float() + torch.exp(log_var) * guide(x, t).float()
        x = mean + torch.exp(0.5 * log_var) * z if i > 0 else mean
        if callback is not None:
            callback(k, x, x0)
    return x


def ddim_loop(
    net: NetFn,
    diffusion: Diffusion,
    noise: NoiseFn,
    *,
    eta: float = 0.0,
    guide: GuideFn | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM with stochasticity eta (0: deterministic)."""
    if eta < 0:
        raise InputError(f"eta={eta}: expected >= 0")
    x = noise(0)
    tab = step_tables(diffusion, x.device)
    sigma, sqrt_ac_prev, dir_coef = ddim_coefficients(diffusion, x.device, eta)
    n = diffusion.num_steps
    for k in _progress(range(1, n + 1), progress):
        i = n - k
        t, x0, _ = _predict(net, x, i, tab, diffusion, clip_denoised)
        if guide is not None:
            x0 = _guided_x0(x, x0, t, i, tab, guide)
        eps = _eps_from_x0(x, x0, i, tab)
        z = noise(k)
        x = x0 * sqrt_ac_prev[i] + dir_coef[i] * eps
        if i > 0 and eta != 0:
            x = x + sigma[i] * z
        if callback is not None:
            callback(k, x, x0)
    return x


def ddim_coefficients(
    diffusion: Diffusion, device: torch.device, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDIM's per-step float32 (sigma, sqrt(alpha_bar_prev), direction coefficient)."""
    tab = step_tables(diffusion, device)
    ac, ac_prev = tab.alphas_cumprod, tab.alphas_cumprod_prev
    sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
    sqrt_ac_prev = torch.sqrt(ac_prev)
    # In float32, 1 - alpha_bar_prev - sigma^2 can round below 0 (eta = 1 on a respaced cosine
    # schedule): the reference then returns NaN. It is a variance; 0 is its true floor.
    dir_coef = torch.sqrt((1 - ac_prev - sigma**2).clamp_min(0))
    return sigma, sqrt_ac_prev, dir_coef


@functools.lru_cache(maxsize=32)
def _dpm_tables(diffusion: Diffusion, device: torch.device) -> tuple[torch.Tensor, ...]:
    """float64 -> float32 coefficients of the 2M update from step i to i - 1:
    x_{i-1} = ratio[i] * x_i + lin[i] * D_i,  D_i = cur[i] * x0_i - prev[i] * x0_{i+1}."""
    c = diffusion.coefficients()
    ac, ac_prev = c.alphas_cumprod, c.alphas_cumprod_prev
    alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
    alpha_prev, sigma_prev = np.sqrt(ac_prev), np.sqrt(1 - ac_prev)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        lam_prev = np.log(alpha_prev) - np.log(sigma_prev)  # +inf at the last step
    h = lam_prev - lam  # step size in log-SNR/2; inf at i = 0
    ratio = sigma_prev / sigma
    lin = -alpha_prev * np.expm1(-h)  # alpha_{i-1} (1 - e^{-h})
    # r_i = h_{i+1} / h_i: the previous step's size over this one's.
    h_before = np.append(h[1:], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        half_inv_r = h / (2 * h_before)
    cur, prev = 1 + half_inv_r, half_inv_r
    # First order where 2M cannot or should not extrapolate: the first step (no history), and
    # the steps into t = 0 and onto the data (Lu et al.'s "lower order final"). Strided
    # schedules make the log-SNR jump into t = 0 several times the one before it (r ~ 0.1), and
    # extrapolating x0 across it costs more than second order gains.
    for j in {len(h) - 1, min(1, len(h) - 1), 0}:
        cur[j], prev[j] = 1.0, 0.0
    return tuple(torch.from_numpy(a).float().to(device) for a in (ratio, lin, cur, prev))


def dpmpp_2m_loop(
    net: NetFn,
    diffusion: Diffusion,
    noise: NoiseFn,
    *,
    guide: GuideFn | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) on the discrete respaced schedule (deterministic: uses x_T only)."""
    x = noise(0)
    tab = step_tables(diffusion, x.device)
    ratio, lin, cur, prev = _dpm_tables(diffusion, x.device)
    n = diffusion.num_steps
    x0_before = None
    for k in _progress(range(1, n + 1), progress):
        i = n - k
        t, x0, _ = _predict(net, x, i, tab, diffusion, clip_denoised)
        if guide is not None:
            x0 = _guided_x0(x, x0, t, i, tab, guide)
        if i == 0:
            x = x0  # alpha_bar_prev = 1: the update lands on the data prediction
        else:
            d = x0 if x0_before is None else cur[i] * x0 - prev[i] * x0_before
            x = ratio[i] * x + lin[i] * d
        x0_before = x0
        if callback is not None:
            callback(k, x, x0)
    return x


def run(
    sampler: SamplerName,
    net: NetFn,
    diffusion: Diffusion,
    noise: NoiseFn,
    *,
    eta: float = 0.0,
    guide: GuideFn | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Dispatch to one loop by name."""
    common = dict(guide=guide, clip_denoised=clip_denoised, progress=progress, callback=callback)
    if sampler == "ddpm":
        return ddpm_loop(net, diffusion, noise, **common)
    if sampler == "ddim":
        return ddim_loop(net, diffusion, noise, eta=eta, **common)
    if sampler == "dpm++2m":
        return dpmpp_2m_loop(net, diffusion, noise, **common)
    raise InputError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
