"""Noise schedules, respacing and time schedules: pure functions from settings to float64 arrays.

Ho et al. 2020 (linear betas), Nichol & Dhariwal 2021 (cosine betas, eq. 17; learned variance
interpolation, eq. 15; strided sampling, sec. 4). Every array is computed once in float64, as the
reference does; samplers gather per-step values and cast them to float32.

Time schedules other than the reference's respacing ("time", "logsnr", "karras") sample at
fractional timesteps of the discrete process, whose alpha_bar is interpolated linearly in
log(alpha_bar) between the integer timesteps (Lu et al. 2022, DPM-Solver's discrete-time
NoiseScheduleVP); ADM's timestep embedding is continuous, so the networks take such t as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InputError

NoiseSchedule = Literal["linear", "cosine"]
TimeSchedule = Literal["respace", "time", "logsnr", "karras"]
TIME_SCHEDULES = ("respace", "time", "logsnr", "karras")
KARRAS_RHO = 7.0


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


# -- time schedules: fractional timesteps of the discrete process -----------------------------


def alpha_bar_at(alphas_cumprod: np.ndarray, t: np.ndarray) -> np.ndarray:
    """alpha_bar at times t in [0, T - 1] of a discrete process with T alphas_cumprod: linear in
    log(alpha_bar) between neighbouring integer timesteps (Lu et al. 2022, DPM-Solver's
    discrete-time NoiseScheduleVP), and exactly the discrete value at an integer t."""
    return _at(alphas_cumprod, t, log=False)


def log_alpha_bar_at(alphas_cumprod: np.ndarray, t: np.ndarray) -> np.ndarray:
    """log(alpha_bar_at(alphas_cumprod, t)), without the round trip through exp (so that
    1 - alpha_bar = -expm1(log alpha_bar) keeps its digits where alpha_bar is near 1)."""
    return _at(alphas_cumprod, t, log=True)


def _at(alphas_cumprod: np.ndarray, t: np.ndarray, log: bool) -> np.ndarray:
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    last = len(ac) - 1
    if not ((t >= 0) & (t <= last)).all():
        raise InputError(f"times {t[(t < 0) | (t > last)][:3].tolist()}: expected 0..{last}")
    lo = np.minimum(np.floor(t).astype(np.int64), last)
    hi = np.minimum(lo + 1, last)
    frac = t - lo
    log_ac = np.log(ac)
    between = log_ac[lo] + frac * (log_ac[hi] - log_ac[lo])
    if log:
        return np.where(frac == 0, log_ac[lo], between)
    return np.where(frac == 0, ac[lo], np.exp(between))


def time_at_log_alpha_bar(alphas_cumprod: np.ndarray, log_alpha_bar: np.ndarray) -> np.ndarray:
    """The inverse of log_alpha_bar_at: the t in [0, T - 1] where the piecewise-linear
    log(alpha_bar) takes each value (it decreases strictly in t; values beyond clamp)."""
    log_ac = np.log(np.asarray(alphas_cumprod, dtype=np.float64))
    steps = np.arange(len(log_ac), dtype=np.float64)
    return np.interp(log_alpha_bar, log_ac[::-1], steps[::-1])


def schedule_steps(time_schedule: str, spec: str | int) -> int:
    """The step count n of a time schedule other than "respace" (which takes respacing specs),
    with one line saying what is expected where the name or the spec is not valid."""
    if time_schedule not in TIME_SCHEDULES:
        raise InputError(
            f"time schedule {time_schedule!r}: expected one of "
            + ", ".join(repr(name) for name in TIME_SCHEDULES)
        )
    text = str(spec).strip()
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise InputError(
            f"schedule {time_schedule!r} takes a step count such as '10', not {str(spec)!r}"
        )
    return int(text)


def sampling_times(
    alphas_cumprod: np.ndarray, n: int, time_schedule: Literal["time", "logsnr", "karras"]
) -> np.ndarray:
    """The n sampling times, ascending: t_0 = 0 < t_1 < ... < t_{n-1} = T - 1 (n = 1: T - 1).

    "time": uniform in t. "logsnr": uniform in lambda = log(alpha / sigma) =
    0.5 log(alpha_bar / (1 - alpha_bar)) (Lu et al. 2022, DPM-Solver's "logSNR" skip type).
    "karras": sigma = sqrt((1 - alpha_bar) / alpha_bar) at sigma_i = (s_max^(1/rho) +
    i / (n - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7 (Karras et al. 2022, eq. 5),
    s_max = sigma(T - 1) (sigma(T - 2) where beta(T - 1) is clipped, see below), s_min =
    sigma(0). Times between the integer timesteps invert the log-linear alpha_bar of
    `alpha_bar_at`; the endpoints are exact."""
    if time_schedule not in ("time", "logsnr", "karras"):
        raise InputError(f"time schedule {time_schedule!r}: expected 'time', 'logsnr', 'karras'")
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    last = float(len(ac) - 1)
    if n == 1:
        return np.array([last])
    if time_schedule == "time":
        t = np.linspace(0.0, last, n)
    else:
        # sigma descending from sigma(T - 1) to sigma(0): t descending, reversed below. Where
        # the last timestep's log-SNR drop is over 3x the one before (the cosine schedule clips
        # beta(T - 1) to 0.999: lambda falls from -6.5 to -9.9 in that one step), spacing to
        # sigma(T - 1) would crowd half the steps into t > 998: the spacing then ends at T - 2,
        # and its first time moves to T - 1.
        top = len(ac) - 1
        lam = 0.5 * np.log(ac[-3:] / (1 - ac[-3:])) if len(ac) >= 3 else None
        if lam is not None and lam[1] - lam[2] > 3 * (lam[0] - lam[1]):
            top -= 1
        s_max, s_min = np.sqrt((1 - ac[top]) / ac[top]), np.sqrt((1 - ac[0]) / ac[0])
        ramp = np.arange(n) / (n - 1)
        if time_schedule == "logsnr":  # log sigma = -lambda, uniform
            sigma = np.exp(np.log(s_max) + ramp * (np.log(s_min) - np.log(s_max)))
        else:
            inv_rho = 1 / KARRAS_RHO
            sigma = (s_max**inv_rho + ramp * (s_min**inv_rho - s_max**inv_rho)) ** KARRAS_RHO
        # log alpha_bar = -log(1 + sigma^2)
        t = time_at_log_alpha_bar(ac, -np.log1p(sigma**2))[::-1].copy()
        t[0], t[-1] = 0.0, last
    if not (np.diff(t) > 0).all():
        raise InputError(
            f"schedule {time_schedule!r} with {n} steps: consecutive sampling times coincide "
            "in float64; use fewer steps"
        )
    return t


def betas_at_times(alphas_cumprod: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Betas of the process sampled at ascending times t: 1 - alpha_bar(t_i) / alpha_bar(t_{i-1})
    (alpha_bar(t_{-1}) = 1), as respace_betas for kept integer timesteps."""
    alpha_bar = alpha_bar_at(alphas_cumprod, t)
    betas = 1 - alpha_bar / np.append(1.0, alpha_bar[:-1])
    if not (betas > 0).all():
        raise InputError(
            f"{len(t)} sampling times: alpha_bar does not decrease between some of them in "
            "float64; use fewer steps"
        )
    return betas


@dataclass(frozen=True)
class Coefficients:
    """Per-step float64 arrays of a (respaced) process, indexed by the respaced step."""

    # respaced index -> original timestep: int64 (respacing), float64 (a time schedule's)
    timestep_map: np.ndarray
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


def coefficients(betas: np.ndarray, timestep_map: Sequence[float]) -> Coefficients:
    """GaussianDiffusion's derived arrays (Ho et al. eqs. 6-7), in float64; timestep_map is kept
    int64 where its times are integers given as integers, else float64."""
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
    tmap = np.asarray(timestep_map)
    return Coefficients(
        timestep_map=tmap.astype(np.int64 if tmap.dtype.kind in "iu" else np.float64),
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
    ones (use_kl, rescale_learned_sigmas) do not matter at inference. time_schedule (not the
    reference's): "respace" keeps the timesteps the respacing spec names (the reference's
    behaviour); "time", "logsnr" and "karras" take a step count n as timestep_respacing and
    sample at n fractional times (see `sampling_times`).
    """

    steps: int = 1000
    noise_schedule: NoiseSchedule = "linear"
    learn_sigma: bool = True
    timestep_respacing: str = ""
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    time_schedule: TimeSchedule = "respace"

    def __post_init__(self) -> None:
        # Validate eagerly so that a bad spec fails where it is given.
        object.__setattr__(self, "timestep_respacing", str(self.timestep_respacing))
        betas_for(self.noise_schedule, self.steps)
        if self.time_schedule == "respace":
            space_timesteps(self.steps, self.timestep_respacing)
        else:
            schedule_steps(self.time_schedule, self.timestep_respacing)
            self.coefficients()  # (cached) refuses step counts float64 cannot resolve

    def respaced(
        self, timestep_respacing: str | int | None, time_schedule: TimeSchedule | None = None
    ) -> Diffusion:
        """The same process sampled with another respacing (e.g. "250", "ddim25"; for a time
        schedule other than "respace", a step count such as "10") and time schedule (None keeps
        this one's). timestep_respacing None keeps this one's, or, going from "respace" to
        another time schedule, takes its number of steps."""
        schedule = self.time_schedule if time_schedule is None else time_schedule
        if timestep_respacing is None:
            keep = schedule == "respace" or self.time_schedule != "respace"
            timestep_respacing = self.timestep_respacing if keep else self.num_steps
        return dataclasses.replace(
            self, timestep_respacing=str(timestep_respacing), time_schedule=schedule
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
        """What the networks receive at each respaced step: the original integer timestep (a
        float one under a time schedule other than "respace"), with rescale_timesteps times
        1000 / steps."""
        tmap = self.timestep_map
        return tmap * (1000.0 / self.steps) if self.rescale_timesteps else tmap


@functools.lru_cache(maxsize=64)
def _coefficients(diffusion: Diffusion) -> Coefficients:
    base = betas_for(diffusion.noise_schedule, diffusion.steps)
    if diffusion.time_schedule != "respace":
        n = schedule_steps(diffusion.time_schedule, diffusion.timestep_respacing)
        alphas_cumprod = np.cumprod(1.0 - base)
        t = sampling_times(alphas_cumprod, n, diffusion.time_schedule)
        return coefficients(betas_at_times(alphas_cumprod, t), t)
    kept = space_timesteps(diffusion.steps, diffusion.timestep_respacing)
    # The reference always respaces (even with every step kept), so betas come from alpha_bar
    # ratios: beta'_0 = 9.999999999998899e-05 rather than 1e-4 for the linear schedule.
    return coefficients(respace_betas(base, kept), kept)
