"""One sampler update as one Triton kernel: x_t, the network output, the guidance gradient and the
step's noise in; x_{t-1} (and the step's x0) out.

An eager update spends a dozen elementwise launches per step (x0 from eps, clipping, the
guidance correction, the DDIM / ancestral / DPM-Solver++(2M) update, the noise add). Here each
element is read once and written once, in float32, with the same formulas in the same order. The
step index is read from device memory, so one launch configuration (and one captured CUDA graph)
serves every step.

This module knows no schedule: the caller passes the per-step float32 coefficient tables by the
names in `TABLES` (fastsample's solvers compute them) and owns the multistep history buffer.
Adding a solver means one branch here, keyed in `SOLVER_IDS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._triton import tl, triton

DDIM, DDPM, DPMPP_2M, LINEAR = 0, 1, 2, 3
# The linear multistep solvers (fastsample.multistep) share one branch: (history values kept,
# UniPC's corrector, the values are eps).
LINEAR_FORMS = {
    "dpm++3m": (2, False, False), "dpm++2m-sde": (1, False, False), "unipc": (2, True, False),
    "unipc3": (3, True, False), "ipndm": (3, False, True),
}  # fmt: skip
SOLVER_IDS = {
    "ddim": DDIM, "ddpm": DDPM, "dpm++2m": DPMPP_2M, **dict.fromkeys(LINEAR_FORMS, LINEAR),
}  # fmt: skip
_LIN = ("lin_x", "lin_z", "lin_v0", "lin_v1", "lin_v2", "lin_v3")
_COR = ("cor_self", "cor_x", "cor_v0", "cor_v1", "cor_v2", "cor_v3")
# The coefficient tables the kernel reads (float32, indexed by the respaced step), in its
# argument order; a solver provides the ones its branch reads.
TABLES = (
    "sqrt_recip_ac", "sqrt_recipm1_ac", "sqrt_one_minus_ac", "sqrt_ac_prev", "dir_coef", "sigma",
    "coef1", "coef2", "max_log", "min_log", "fixed_log_var", "ratio", "lin", "cur", "prev",
    *_LIN, *_COR,
)  # fmt: skip
# What each branch reads (besides the eps <-> x0 conversions every branch reads).
READS = {
    "ddim": ("sqrt_one_minus_ac", "sqrt_ac_prev", "dir_coef", "sigma"),
    "ddpm": ("coef1", "coef2", "max_log", "min_log", "fixed_log_var"),
    "dpm++2m": ("sqrt_one_minus_ac", "ratio", "lin", "cur", "prev"),
    **{name: ("sqrt_one_minus_ac", *_LIN, *(_COR if form[1] else ()))
       for name, form in LINEAR_FORMS.items()},
}  # fmt: skip
COMMON = ("sqrt_recip_ac", "sqrt_recipm1_ac")


@triton.jit
def _step_kernel(
    X, OUT, GRAD, GUIDE, Z, X0_PREV, XN, X0, STEP,
    SRA, SRM1, S1M, SQRT_AC_PREV, DIR, SIGMA, COEF1, COEF2, MAX_LOG, MIN_LOG, FIXED,
    RATIO, LIN, CUR, PREV,
    LX, LZ, LV0, LV1, LV2, LV3, CSELF, CX, CV0, CV1, CV2, CV3,
    numel, C, HW, OUT_C, scale,
    SAMPLER: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, LEARN_SIGMA: tl.constexpr,
    PREDICT_XSTART: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
    SLOTS: tl.constexpr = 0, CORRECT: tl.constexpr = False, HIST_EPS: tl.constexpr = False,
    WEIGHTED: tl.constexpr = False,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    i = tl.load(STEP)
    n = offs // (C * HW)
    rest = offs % (C * HW)
    out_offs = n * OUT_C * HW + rest  # eps (or x0) channels come first
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(OUT + out_offs, mask=mask, other=0.0).to(tl.float32)
    sra = tl.load(SRA + i)
    srm1 = tl.load(SRM1 + i)
    if PREDICT_XSTART:
        x0 = eps
    else:
        x0 = sra * x - srm1 * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    if GUIDED:
        g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32) * scale
        weight = 1.0
        if WEIGHTED:  # the step's guidance weight (0 or 1: the run's guidance plan)
            weight = tl.load(GUIDE + i)
            g = g * weight
    if SAMPLER == 1:  # ancestral, learned or fixed variance
        if LEARN_SIGMA:
            v = tl.load(OUT + out_offs + C * HW, mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) / 2.0
            log_var = frac * tl.load(MAX_LOG + i) + (1.0 - frac) * tl.load(MIN_LOG + i)
        else:
            log_var = tl.load(FIXED + i) + 0.0 * x
        mean = tl.load(COEF1 + i) * x0 + tl.load(COEF2 + i) * x
        if GUIDED:
            mean = mean + tl.exp(log_var) * g
        xn = mean
        if NOISE:
            if i > 0:
                z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
                xn = mean + tl.exp(0.5 * log_var) * z
    else:
        if GUIDED:  # the reference's condition_score: eps - sqrt(1 - alpha_bar) * guide
            if weight != 0.0:  # (an unguided step skips the x0 -> eps -> x0 round trip)
                e = (sra * x - x0) / srm1 - tl.load(S1M + i) * g
                x0 = sra * x - srm1 * e
        if SAMPLER == 0:
            e2 = (sra * x - x0) / srm1
            xn = x0 * tl.load(SQRT_AC_PREV + i) + tl.load(DIR + i) * e2
            if NOISE:
                if i > 0:
                    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
                    xn = xn + tl.load(SIGMA + i) * z
        elif SAMPLER == 3:  # linear multistep (fastsample.multistep): history slots of numel
            if HIST_EPS:
                v = (sra * x - x0) / srm1
            else:
                v = x0
            v1 = tl.load(X0_PREV + offs, mask=mask, other=0.0)
            if SLOTS >= 2:
                v2 = tl.load(X0_PREV + numel + offs, mask=mask, other=0.0)
            if SLOTS >= 3:
                v3 = tl.load(X0_PREV + 2 * numel + offs, mask=mask, other=0.0)
            if CORRECT:  # UniPC's corrector of x from x_last, with this step's value
                last = tl.load(X0_PREV + SLOTS * numel + offs, mask=mask, other=0.0)
                x = tl.load(CSELF + i) * x + tl.load(CX + i) * last
                x = x + tl.load(CV0 + i) * v + tl.load(CV1 + i) * v1
                if SLOTS >= 2:
                    x = x + tl.load(CV2 + i) * v2
                if SLOTS >= 3:
                    x = x + tl.load(CV3 + i) * v3
                tl.store(X0_PREV + SLOTS * numel + offs, x, mask=mask)
            xn = tl.load(LX + i) * x + tl.load(LV0 + i) * v + tl.load(LV1 + i) * v1
            if SLOTS >= 2:
                xn = xn + tl.load(LV2 + i) * v2
            if SLOTS >= 3:
                xn = xn + tl.load(LV3 + i) * v3
            if NOISE:
                xn = xn + tl.load(LZ + i) * tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
            if SLOTS >= 3:
                tl.store(X0_PREV + 2 * numel + offs, v2, mask=mask)
            if SLOTS >= 2:
                tl.store(X0_PREV + numel + offs, v1, mask=mask)
            tl.store(X0_PREV + offs, v, mask=mask)
        else:  # DPM-Solver++(2M); the tables make the first and last steps first order
            if i == 0:
                xn = x0
            else:
                before = tl.load(X0_PREV + offs, mask=mask, other=0.0)
                d = tl.load(CUR + i) * x0 - tl.load(PREV + i) * before
                xn = tl.load(RATIO + i) * x + tl.load(LIN + i) * d
            tl.store(X0_PREV + offs, x0, mask=mask)
    tl.store(XN + offs, xn.to(XN.dtype.element_ty), mask=mask)
    tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=mask)


def sampler_step(
    solver: str,
    x: torch.Tensor,
    out: torch.Tensor,
    step: torch.Tensor,
    tables: Mapping[str, torch.Tensor],
    *,
    grad: torch.Tensor | None = None,
    scale: float = 0.0,
    guide: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    clip: bool = True,
    learn_sigma: bool = False,
    predict_xstart: bool = False,
    x_next: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update -> (x_next, x0), written into x_next / x0 when given (x_next may be x).

    step: 0-d int32 device tensor (the respaced index i), so that a captured CUDA graph replays
    one launch for every step after `step.fill_(i)`. grad: the unscaled guidance gradient,
    multiplied by scale in the kernel, and by guide[i] where a float32 per-step guide table is
    given (so one captured graph serves guided and unguided steps). z: the step's noise, or
    None where the update adds none.
    history: for multistep solvers, a float32 buffer shaped like x holding the previous step's
    x0 (zeros before the first step), or for the linear ones (`LINEAR_FORMS`) the stacked
    [slots (+ 1 for UniPC's x_last), *x.shape] values; the kernel reads it and updates it."""
    if solver not in SOLVER_IDS:
        raise ValueError(f"solver {solver!r}: expected one of {', '.join(SOLVER_IDS)}")
    missing = [name for name in (*COMMON, *READS[solver]) if name not in tables]
    if missing:
        raise ValueError(f"{solver}: the tables lack {', '.join(missing)}")
    if solver == "dpm++2m" and (history is None or history.shape != x.shape):
        raise ValueError("dpm++2m needs its history buffer (float32, shaped like x)")
    slots, correct, hist_eps = LINEAR_FORMS.get(solver, (0, False, False))
    if solver in LINEAR_FORMS:
        want = (slots + int(correct), *x.shape)
        if history is None or tuple(history.shape) != want or not history.is_contiguous():
            raise ValueError(f"{solver} needs its history buffer: float32 {want}, contiguous")
    if solver == "ddpm" and z is None:
        raise ValueError("ddpm needs the step's noise z")
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    x = x.contiguous()
    out = out.contiguous()
    guided = grad is not None and scale != 0
    x_next = torch.empty_like(x) if x_next is None else x_next
    x0 = torch.empty_like(x) if x0 is None else x0
    dummy = x
    block = 1024
    _step_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, grad.contiguous() if guided else dummy, guide if guide is not None else dummy,
        z.contiguous() if z is not None else dummy,
        history if history is not None else dummy, x_next, x0, step,
        *(tables.get(name, dummy) for name in TABLES),
        x.numel(), c, hw, out.shape[1], float(scale),
        SAMPLER=SOLVER_IDS[solver], GUIDED=guided, CLIP=bool(clip),
        LEARN_SIGMA=bool(learn_sigma), PREDICT_XSTART=bool(predict_xstart),
        NOISE=z is not None, BLOCK=block, SLOTS=slots, CORRECT=correct, HIST_EPS=hist_eps,
        WEIGHTED=guided and guide is not None,
    )  # fmt: skip
    return x_next, x0
