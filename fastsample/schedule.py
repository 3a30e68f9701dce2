"""Noise schedules and respacing: pure functions from settings to float64 arrays.

Ho et al. 2020 (linear betas), Nichol & Dhariwal 2021 (cosine betas, eq. 17; learned variance
interpolation, eq. 15; strided sampling, sec. 4). Every array is computed once in float64, as the
reference does; samplers gather per-step values and cast them to float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InputError

NoiseSchedule = Literal["linear", "cosine"]


def linear_betas(steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so that any T matches T=1000's endpoints."""
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
            for i in range(steps)
        ],
        dtype=np.float64,
    )


def betas_for(name: str, steps: int) -> np.ndarray:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"diffusion steps={steps!r}: expected a positive integer")
    if name == "linear":
        return linear_betas(steps)
    if name == "cosine":
        return cosine_betas(steps)
    raise InputError(f"noise schedule {name!r}: expected 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, spec: str | int | Sequence[int]) -> list[int]:
    """The original timesteps that a respacing spec keeps, sorted.

    "" keeps all; "ddimN" keeps range(0, T, k) for the smallest stride k giving N steps;
    "a,b,c" cuts T into len sections (the first T % len one step longer) and keeps an evenly
    strided count from each, rounding a running float sum half-to-even as the reference does.
    """
    T = num_timesteps
    if isinstance(spec, str):
        text = spec.strip()
        if text == "":
            return list(range(T))
        if text.startswith("ddim"):
            try:
                wanted = int(text[len("ddim") :])
            except ValueError:
                raise InputError(
                    f"respacing {spec!r}: expected 'ddimN' with an integer N"
                ) from None
            for stride in range(1, T):
                if len(range(0, T, stride)) == wanted:
                    return list(range(0, T, stride))
            raise InputError(
                f"respacing {spec!r}: no integer stride gives exactly {wanted} steps out of {T}"
            )
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise InputError(
                f"respacing {spec!r}: expected '', 'ddimN', or comma-separated step counts "
                "such as '250' or '10,10,5'"
            ) from None
    elif isinstance(spec, int):
        counts = [spec]
    else:
        counts = [int(c) for c in spec]
    if not counts or any(c < 1 for c in counts):
        raise InputError(f"respacing {spec!r}: step counts must be positive")
    size_per, extra = divmod(T, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise InputError(
                f"respacing {spec!r}: cannot take {count} steps from a section of {size} (T={T})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))  # Python round: half to even
            cur += stride
        start += size
    return sorted(kept)


def respace_betas(betas: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the shortened process: 1 - alpha_bar[i] / alpha_bar[previous kept]."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept_set = set(kept)
    new, last = [], 1.0
    for i, alpha_bar in enumerate(alphas_cumprod):
        if i in kept_set:
            new.append(1 - alpha_bar / last)
            last = alpha_bar
    return np.array(new, dtype=np.float64)


@dataclass(frozen=True)
class Coefficients:
    """Per-step float64 arrays of a (respaced) process, indexed by the respaced step."""

    timestep_map: np.ndarray  # respaced index -> original integer timestep
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    fixed_large_log_variance: np.ndarray  # variance [post_var[1], betas[1:]] without learned sigma

    @property
    def num_steps(self) -> int:
        return len(self.betas)


def coefficients(betas: np.ndarray, timestep_map: Sequence[int]) -> Coefficients:
    """GaussianDiffusion's derived arrays (Ho et al. eqs. 6-7), in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
        raise InputError("betas must be a 1-D array in (0, 1]")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at the first step: its log is clipped by repeating step 1
    # (a one-step schedule has only that step: log 0 = -inf, its true value).
    with np.errstate(divide="ignore"):
        post_log_var = (
            np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(post_var)
        )
    large = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas
    return Coefficients(
        timestep_map=np.asarray(timestep_map, dtype=np.int64),
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
        fixed_large_log_variance=np.log(large),
    )


@dataclass(frozen=True)
class Diffusion:
    """The diffusion process a checkpoint was trained with, and how sampling respaces it.

    Arguments carry the names of the reference's `create_gaussian_diffusion`; the training-only
    ones (use_kl, rescale_learned_sigmas) do not matter at inference.
    """

    steps: int = 1000
    noise_schedule: NoiseSchedule = "linear"
    learn_sigma: bool = True
    timestep_respacing: str = ""
    predict_xstart: bool = False
    rescale_timesteps: bool = False

    def __post_init__(self) -> None:
        # Validate eagerly so that a bad spec fails where it is given.
        object.__setattr__(self, "timestep_respacing", str(self.timestep_respacing))
        betas_for(self.noise_schedule, self.steps)
        space_timesteps(self.steps, self.timestep_respacing)

    def respaced(self, timestep_respacing: str | int) -> Diffusion:
        """The same process sampled with another respacing (e.g. "250", "ddim25")."""
        return Diffusion(
            self.steps,
            self.noise_schedule,
            self.learn_sigma,
            str(timestep_respacing),
            self.predict_xstart,
            self.rescale_timesteps,
        )

    @property
    def timestep_map(self) -> np.ndarray:
        return self.coefficients().timestep_map

    @property
    def num_steps(self) -> int:
        return self.coefficients().num_steps

    def coefficients(self) -> Coefficients:
        return _coefficients(self)

    def model_timesteps(self) -> np.ndarray:
        """What the networks receive at each respaced step: the original integer timestep, or
        with rescale_timesteps the float t * 1000 / steps."""
        tmap = self.timestep_map
        return tmap * (1000.0 / self.steps) if self.rescale_timesteps else tmap


@functools.lru_cache(maxsize=64)
def _coefficients(diffusion: Diffusion) -> Coefficients:
    base = betas_for(diffusion.noise_schedule, diffusion.steps)
    kept = space_timesteps(diffusion.steps, diffusion.timestep_respacing)
    # The reference always respaces (even with every step kept), so betas come from alpha_bar
    # ratios: beta'_0 = 9.999999999998899e-05 rather than 1e-4 for the linear schedule.
    return coefficients(respace_betas(base, kept), kept)
