"""Where a guided run applies the classifier's gradient: the guidance plan.

Classifier guidance costs one classifier forward and backward per step. Kynkaenniemi et al.
(2024) show that applying guidance only inside a limited interval of noise levels keeps (or
improves) sample quality while skipping most of those computations; reusing the last gradient
for a few steps saves more. A plan says, per respaced step, whether the update guides and
whether the gradient is computed there or reused; every sampling path (the eager loop, the fast
engine) follows it, and runs report its classifier-call count.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .schedule import Diffusion

# The eps-form guidance (the reference's condition_score, used by every solver but DDPM) moves
# the step's x0 by (1 - alpha_bar) / sqrt(alpha_bar) * scale * grad: on the cosine schedule's
# last timesteps (alpha_bar(999) = 2.4e-9) that is ~2e4 times the gradient, and a guided first
# step there turns every sample into noise. With stable guidance (the pipeline's and CLI's
# default; `sample` keeps the reference's behaviour unless asked) guidance is skipped where the
# factor passes this (alpha_bar below ~1e-6: cosine's last few timesteps only; the linear
# schedule's t = 999 has 158, so the paper's recipes are untouched).
MAX_GUIDANCE_GAIN = 1000.0
# Multistep solvers extrapolate from earlier guided values; over the long steps of a short run
# they overshoot the guidance term. bench.solvers on the demo (scale 2, 1,000 samples, log-SNR
# times): at 5 and 8 calls every multistep solver read 0.20-0.82 judge accuracy where ddim read
# 0.83-0.88 and ddpm 0.86-0.92; from 10 calls on they read 0.84-0.92 (dpm++2m-sde up to 0.99).
MIN_MULTISTEP_GUIDED_STEPS = 10


@dataclass(frozen=True)
class GuidancePlan:
    """Where a run guides, per respaced step i: `use` (the update applies a gradient) and
    `compute` (the classifier's gradient is computed there; a used step that does not compute
    reuses the last one computed). `unstable`: the original timesteps where the gain rule
    holds (skipped where `stable`)."""

    use: tuple[bool, ...]
    compute: tuple[bool, ...]
    unstable: tuple[float, ...] = ()
    stable: bool = False  # whether the unstable steps are skipped

    @property
    def classifier_calls(self) -> int:
        """Classifier gradients per sample."""
        return sum(self.compute)

    @property
    def everywhere(self) -> bool:
        return all(self.compute)


def check_guidance_budget(interval, every) -> tuple[tuple[float, float] | None, int]:
    """guidance_interval (lo, hi) in original timesteps and guidance_every k, checked."""
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise InputError(f"guidance_every={every!r}: expected a positive integer")
    if interval is None:
        return None, int(every)
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise InputError(
            f"guidance_interval={interval!r}: expected two timesteps (lo, hi), e.g. (0, 600)"
        ) from None
    if not (0 <= lo <= hi) or not np.isfinite(hi):
        raise InputError(
            f"guidance_interval={interval!r}: expected 0 <= lo <= hi (original timesteps)"
        )
    return (lo, hi), int(every)


def guidance_plan(
    sampler: str, diffusion: Diffusion, interval=None, every: int = 1, stable: bool = False
) -> GuidancePlan:
    """The steps a guided run of `sampler` guides and computes the classifier gradient at.

    interval (lo, hi): only steps whose original timestep t (0 .. steps - 1; noise level
    sqrt(1 - alpha_bar(t))) lies in [lo, hi]; every k: the gradient is computed at every k-th
    guided step, from the first, and reused in between. stable: also skip the steps where
    eps-form guidance gains over MAX_GUIDANCE_GAIN (`unstable` lists them either way)."""
    interval, every = check_guidance_budget(interval, every)
    c = diffusion.coefficients()
    n = c.num_steps
    tmap = c.timestep_map
    use = np.ones(n, dtype=bool)
    if interval is not None:
        use &= (tmap >= interval[0]) & (tmap <= interval[1])
    unstable = np.zeros(n, dtype=bool)
    if sampler != "ddpm":  # DDPM guides the mean, by the posterior variance: no gain
        ac = c.alphas_cumprod
        unstable = (1 - ac) / np.sqrt(ac) > MAX_GUIDANCE_GAIN
    unstable &= use
    if stable:
        use &= ~unstable
    compute = np.zeros(n, dtype=bool)
    order = [i for i in range(n - 1, -1, -1) if use[i]]  # from noise to data
    for j, i in enumerate(order):
        compute[i] = j % every == 0
    skipped = tuple(float(t) for t in tmap[::-1][unstable[::-1]])
    return GuidancePlan(tuple(use.tolist()), tuple(compute.tolist()), skipped, bool(stable))


def warn_unstable(plan: GuidancePlan, sampler: str) -> None:
    """One line where a guided run meets the gain rule: the steps skipped (stable), or the
    steps guided as the reference does and how to skip them."""
    if not plan.unstable:
        return
    t = plan.unstable
    where = f"t = {t[0]:g}" if len(t) == 1 else f"t = {t[0]:g} .. {t[-1]:g}"
    gain = f"alpha_bar < 1e-6 multiplies eps-form guidance over {MAX_GUIDANCE_GAIN:g}x"
    if plan.stable:
        message = (
            f"{sampler}: classifier guidance skipped at {where} ({len(t)} of {len(plan.use)} "
            f"steps), where {gain} and would turn samples into noise; to guide there, use "
            "sampler ddpm, or stable_guidance=False (--reference-guidance) as the reference"
        )
    else:
        message = (
            f"{sampler}: guidance at {where} is applied as the reference does, though {gain} "
            "there and can turn samples into noise; pass stable_guidance=True (the pipeline's "
            "and CLI's default) to skip those steps, or start lower ('ddimN' steps)"
        )
    warnings.warn(message, stacklevel=3)


def warn_few_steps(sampler: str, multistep: bool, num_steps: int) -> None:
    """One line where a guided multistep solver runs fewer than MIN_MULTISTEP_GUIDED_STEPS
    steps (see there): why it loses quality and what to use instead."""
    if not multistep or num_steps >= MIN_MULTISTEP_GUIDED_STEPS:
        return
    warnings.warn(
        f"{sampler}: {num_steps} guided steps are too few for a multistep solver, whose "
        "extrapolation overshoots the classifier guidance over steps this long and loses the "
        f"class; use sampler ddim (best with schedule logsnr) or ddpm, or at least "
        f"{MIN_MULTISTEP_GUIDED_STEPS} steps",
        stacklevel=3,
    )
