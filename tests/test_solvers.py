"""The few-step solvers against independent implementations, and their convergence order.

Oracles: diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M, 3M, 2M SDE) and
UniPCMultistepScheduler (UniPC-bh2, orders 2 and 3), driven on the same model function, the same
timesteps (their sigmas replaced by ours, in float64) and the same noise; iPNDM against a loop
written here in k-diffusion's variance-exploding form. fp32 throughout: 1e-5 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsample import Diffusion
from fastsample import sampler as solvers

diffusers = pytest.importorskip("diffusers")


def _model(shape, seed=0):
    """A smooth, nonlinear eps model of (x, t): what the solvers are compared on."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape[1], shape[1], generator=g) / shape[1] ** 0.5
    b = torch.randn(shape[1:], generator=g)

    def model(x, t):
        t = t.reshape(-1, 1, 1, 1).float() / 1000
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x) * (1 - 0.5 * t) + b * t)

    return model


def _run(sampler, diffusion, model, noise, clip=False, **kw):
    draws = noise
    return solvers.run(sampler, model, diffusion, lambda k: draws[k], clip_denoised=clip, **kw)


def _diffusers_run(scheduler, diffusion, model, noise):
    """The scheduler's loop on our timesteps: its sigmas become ours (float64) plus the final 0,
    its model gets our t; SDE noise is ours, step by step."""
    c = diffusion.coefficients()
    ac = c.alphas_cumprod[::-1]  # from noise to data
    t_model = diffusion.model_timesteps()[::-1].copy()
    scheduler.set_timesteps(num_inference_steps=len(ac))
    scheduler.sigmas = torch.from_numpy(np.append(np.sqrt((1 - ac) / ac), 0.0))
    x = noise[0]
    for k in range(len(ac)):
        t = torch.full((x.shape[0],), float(t_model[k]))
        eps = model(x, t)
        extra = (
            {"variance_noise": noise[k + 1]}
            if "sde" in scheduler.config.get("algorithm_type", "")
            else {}
        )
        x = scheduler.step(eps, scheduler.timesteps[k], x, return_dict=False, **extra)[0]
    return x


def _diffusion(respacing: str, schedule: str = "linear"):
    return Diffusion(noise_schedule=schedule, learn_sigma=False, timestep_respacing=respacing)


ORACLES = {
    "dpm++2m-sde": lambda: diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        algorithm_type="sde-dpmsolver++",
        final_sigmas_type="zero",
    ),  # fmt: skip
    "dpm++3m": lambda: diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=3,
        algorithm_type="dpmsolver++",
        final_sigmas_type="zero",
    ),  # fmt: skip
    "unipc": lambda: diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, solver_type="bh2", final_sigmas_type="zero"
    ),
    "unipc3": lambda: diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=3, solver_type="bh2", final_sigmas_type="zero"
    ),
}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("sampler", sorted(ORACLES))
@pytest.mark.parametrize(
    "respacing,schedule",
    [("10", "linear"), ("ddim25", "linear"), ("8", "cosine"), ("20", "cosine")],
)
def test_solver_matches_diffusers(sampler, respacing, schedule):
    diffusion = _diffusion(respacing, schedule)
    shape = (2, 3, 4, 4)
    noise = torch.randn(
        (diffusion.num_steps + 1, *shape), generator=torch.Generator().manual_seed(1)
    )
    model = _model(shape)
    ours = _run(sampler, diffusion, model, noise)
    theirs = _diffusers_run(ORACLES[sampler](), diffusion, model, noise)
    assert torch.isfinite(ours).all()
    assert _rel(ours, theirs) < 1e-5, _rel(ours, theirs)


def test_dpmpp_2m_matches_diffusers_where_their_final_orders_agree():
    """Ours is first order on the last two steps; diffusers' on the last one below 15 steps and
    on none above but the final: at >= 15 steps they differ only on the step into t = 0, so
    compare the x0 predictions up to there."""
    diffusion = _diffusion("20")
    shape = (2, 3, 4, 4)
    noise = torch.randn((21, *shape), generator=torch.Generator().manual_seed(2))
    model = _model(shape)
    ours = []
    _run("dpm++2m", diffusion, model, noise, callback=lambda k, x, x0: ours.append(x))
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, final_sigmas_type="zero"
    )
    # Run the oracle on the first 18 steps (both second order from step 2 on).
    c = diffusion.coefficients()
    ac = c.alphas_cumprod[::-1]
    scheduler.set_timesteps(num_inference_steps=20)
    scheduler.sigmas = torch.from_numpy(np.append(np.sqrt((1 - ac) / ac), 0.0))
    x = noise[0]
    for k in range(18):
        t = torch.full((2,), float(diffusion.model_timesteps()[::-1][k]))
        x = scheduler.step(model(x, t), scheduler.timesteps[k], x, return_dict=False)[0]
    assert _rel(ours[17], x) < 1e-5


def _ipndm_ve(diffusion, model, noise, max_order=4):
    """iPNDM as k-diffusion writes it, in x / alpha coordinates with sigma_ve = sigma / alpha."""
    c = diffusion.coefficients()
    ac = c.alphas_cumprod[::-1]
    t_model = diffusion.model_timesteps()[::-1]
    s = np.append(np.sqrt((1 - ac) / ac), 0.0)
    x = noise[0].double() / np.sqrt(ac[0])
    buffer = []
    weights = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}
    denom = {1: 1, 2: 2, 3: 12, 4: 24}
    for k in range(len(ac)):
        alpha = 1 / np.sqrt(1 + s[k] ** 2)
        t = torch.full((x.shape[0],), float(t_model[k]))
        d = model((x * alpha).float(), t).double()
        order = min(max_order, k + 1)
        ds = [d, *reversed(buffer[-(order - 1) :])] if order > 1 else [d]
        comb = sum(w * v for w, v in zip(weights[order], ds, strict=True)) / denom[order]
        x = x + (s[k + 1] - s[k]) * comb
        buffer.append(d)
    return x.float()


@pytest.mark.parametrize("respacing,schedule", [("10", "linear"), ("15", "cosine")])
def test_ipndm_matches_the_variance_exploding_form(respacing, schedule):
    diffusion = _diffusion(respacing, schedule)
    shape = (2, 3, 4, 4)
    noise = torch.randn(
        (diffusion.num_steps + 1, *shape), generator=torch.Generator().manual_seed(3)
    )
    model = _model(shape)
    ours = _run("ipndm", diffusion, model, noise)
    assert _rel(ours, _ipndm_ve(diffusion, model, noise)) < 1e-5


# -- convergence order on Gaussian data ----------------------------------------------------------


def _gaussian_problem(mu=0.3, s=0.5):
    """Data N(mu, s^2) per element: the exact eps prediction is known, and so is the probability
    flow ODE's solution: x_t maps to mu + s (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)."""

    def model_for(diffusion):
        times = diffusion.model_timesteps()
        table = diffusion.coefficients().alphas_cumprod

        def model(x, t):  # (t arrives as float32: the step is the nearest time)
            ac = torch.tensor([table[np.abs(times - v).argmin()] for v in t.tolist()],
                              dtype=torch.float64)  # fmt: skip
            ac = ac.reshape(-1, 1, 1, 1)
            a, sg = ac.sqrt(), (1 - ac).sqrt()
            x = x.double()
            # E[eps | x_t] for Gaussian data
            return (sg * (x - a * mu) / (a**2 * s**2 + sg**2)).float()

        return model

    def exact(diffusion, x_T):
        ac = float(diffusion.coefficients().alphas_cumprod[-1])
        a, sg = np.sqrt(ac), np.sqrt(1 - ac)
        return mu + s * (x_T.double() - a * mu) / np.sqrt(a**2 * s**2 + sg**2)

    return model_for, exact


def _ode_error(sampler, n):
    model_for, exact = _gaussian_problem()
    diffusion = Diffusion(noise_schedule="linear", learn_sigma=False, timestep_respacing=str(n),
                          time_schedule="logsnr")  # fmt: skip
    x_T = torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * 1.0
    out = solvers.run(sampler, model_for(diffusion), diffusion, lambda k: x_T, clip_denoised=False)
    return float((out.double() - exact(diffusion, x_T)).abs().max())


@pytest.mark.parametrize(
    "sampler,order", [("ddim", 1), ("dpm++3m", 3), ("unipc", 2), ("unipc3", 3), ("ipndm", 2)]
)
def test_convergence_order_on_gaussian_data(sampler, order):
    """Going from 10 to 40 log-SNR-uniform steps divides the error by about 4^order: the
    observed order is at least order - 0.5 (measured: ddim 0.99, dpm++3m 3.3, unipc 2.8,
    unipc3 4.4, ipndm 2.1; iPNDM's fourth order shows only at more steps). Above 40 steps the
    float32 tables' rounding starts to show, so the pair stops there."""
    e1, e2 = _ode_error(sampler, 10), _ode_error(sampler, 40)
    observed = np.log2(e1 / e2) / 2
    assert observed > order - 0.5, (e1, e2, observed)
