"""One sampler update as one Triton kernel: x_t, the network output, the guidance gradient and the
step's noise in; x_{t-1} (and the step's x0) out.

The eager loops in `fastsample.sampler` spend a dozen elementwise launches per step on this
(x0 from eps, clipping, the guidance correction, the DDIM / ancestral / DPM-Solver++(2M)
update, the noise add). Here each element is read once and written once, in float32, with the
same formulas in the same order. The step index is read from device memory, so one launch
configuration (and one captured CUDA graph) serves every step; the per-step coefficients are
the float32 tables the eager loops gather (`fastsample.sampler.step_tables`).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton

DDIM, DDPM, DPMPP_2M = 0, 1, 2
SAMPLER_IDS = {"ddim": DDIM, "ddpm": DDPM, "dpm++2m": DPMPP_2M}


@triton.jit
def _step_kernel(
    X, OUT, GRAD, Z, X0_PREV, XN, X0, STEP,
    SRA, SRM1, S1M, SQRT_AC_PREV, DIR, SIGMA, COEF1, COEF2, MAX_LOG, MIN_LOG, FIXED,
    RATIO, LIN, CUR, PREV,
    numel, C, HW, OUT_C, scale,
    SAMPLER: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, LEARN_SIGMA: tl.constexpr,
    PREDICT_XSTART: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
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
            e = (sra * x - x0) / srm1 - tl.load(S1M + i) * g
            x0 = sra * x - srm1 * e
        if SAMPLER == 0:
            e2 = (sra * x - x0) / srm1
            xn = x0 * tl.load(SQRT_AC_PREV + i) + tl.load(DIR + i) * e2
            if NOISE:
                if i > 0:
                    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
                    xn = xn + tl.load(SIGMA + i) * z
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


class StepKernel:
    """The fused update for one sampler and diffusion on one device.

    `__call__(x, out, step, grad=None, z=None)` returns (x_next, x0); `step` is a 0-d int32
    device tensor (the respaced index i), so a captured CUDA graph can replay it for every step
    after `step.fill_(i)`. For DPM-Solver++(2M) the previous x0 lives in `self.x0_prev`."""

    def __init__(self, sampler: str, diffusion, device, eta: float = 0.0, clip: bool = True,
                 guidance_scale: float = 0.0):  # fmt: skip
        from fastsample.sampler import _dpm_tables, ddim_coefficients, step_tables

        if sampler not in SAMPLER_IDS:
            raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLER_IDS)}")
        self.sampler, self.diffusion, self.eta = sampler, diffusion, float(eta)
        self.clip, self.scale = bool(clip), float(guidance_scale)
        device = torch.device(device)
        tab = step_tables(diffusion, device)
        sigma, sqrt_ac_prev, dir_coef = ddim_coefficients(diffusion, device, self.eta)
        ratio, lin, cur, prev = _dpm_tables(diffusion, device)
        self.tables = dict(
            SRA=tab.sqrt_recip_ac, SRM1=tab.sqrt_recipm1_ac, S1M=tab.sqrt_one_minus_ac,
            SQRT_AC_PREV=sqrt_ac_prev, DIR=dir_coef, SIGMA=sigma, COEF1=tab.coef1,
            COEF2=tab.coef2, MAX_LOG=tab.max_log, MIN_LOG=tab.min_log, FIXED=tab.fixed_log_var,
            RATIO=ratio, LIN=lin, CUR=cur, PREV=prev,
        )  # fmt: skip
        self.x0_prev: torch.Tensor | None = None

    def noise_used(self) -> bool:
        return self.sampler == "ddpm" or (self.sampler == "ddim" and self.eta != 0)

    def __call__(self, x, out, step, grad=None, z=None, x_next=None, x0=None):
        n, c = x.shape[:2]
        hw = x.numel() // (n * c)
        x = x.contiguous()
        out = out.contiguous()
        guided = grad is not None and self.scale != 0
        noise = self.noise_used()
        if noise and z is None:
            raise ValueError(f"{self.sampler} (eta={self.eta}) needs the step's noise z")
        if self.sampler == "dpm++2m" and (self.x0_prev is None or self.x0_prev.shape != x.shape):
            self.x0_prev = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        x_next = torch.empty_like(x) if x_next is None else x_next
        x0 = torch.empty_like(x) if x0 is None else x0
        dummy = x
        block = 1024
        _step_kernel[(triton.cdiv(x.numel(), block),)](
            x, out, grad.contiguous() if guided else dummy, z.contiguous() if noise else dummy,
            self.x0_prev if self.x0_prev is not None else dummy, x_next, x0, step,
            *self.tables.values(),
            x.numel(), c, hw, out.shape[1], self.scale,
            SAMPLER=SAMPLER_IDS[self.sampler], GUIDED=guided, CLIP=self.clip,
            LEARN_SIGMA=self.diffusion.learn_sigma, PREDICT_XSTART=self.diffusion.predict_xstart,
            NOISE=noise, BLOCK=block,
        )  # fmt: skip
        return x_next, x0
