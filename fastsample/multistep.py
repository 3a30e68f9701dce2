"""Coefficient tables of the linear multistep solvers: DPM-Solver++(3M), DPM-Solver++(2M) SDE,
UniPC (bh2, orders 2 and 3) and iPNDM.

Each of these updates is linear in the current x_t, the step's value v_k (the data prediction
x0, or for iPNDM the noise prediction eps) and the values of earlier steps, with coefficients
that depend only on the schedule. So a solver here is just its per-step float64 coefficients,
cast to float32 tables; one eager update (`fastsample.sampler.linear_update`) and one branch of
the fused kernel evaluate every solver from them:

    corrector (UniPC only): x   <- cor_self[i] * x + cor_x[i] * x_last + sum_j cor_v{j}[i] * v_{k-j}
    update:                 x'  =  lin_x[i] * x      + sum_j lin_v{j}[i] * v_{k-j} + lin_z[i] * z

Steps are counted k = 0..n-1 from noise (respaced index i = n - 1 - k); the last step lands on
the data (alpha_bar = 1, log-SNR = +inf). Lower orders at the start (no history yet) and near the
end ("lower order final") are zero coefficients, chosen per solver as its reference
implementation does (diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler, which
the tests compare against).

- DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", eqs. for the multistep 2M/3M in the data
  prediction); its SDE variant (ibid., sec. 5: x' = sigma'/sigma e^{-h} x + alpha'(1 - e^{-2h}) D
  + sigma' sqrt(1 - e^{-2h}) z, second order by the midpoint rule).
- UniPC (Zhao et al. 2023): the UniP predictor and UniC corrector with B(h) = e^h - 1 ("bh2");
  the corrector reuses the model output at the predicted point, so it costs no network call.
- iPNDM (Zhang & Chen 2023, DEIS appendix): Adams-Bashforth on eps in the variance-exploding
  coordinates x / alpha, orders 1-4 from the history available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SLOTS = 3  # history values a table may reference: v_{k-1}, v_{k-2}, v_{k-3}


@dataclass(frozen=True)
class Form:
    """How a linear solver uses the fused update: its history and what it holds."""

    slots: int  # earlier values kept (v_{k-1} .. v_{k-slots})
    corrector: bool = False  # UniPC: x_last is kept after the values
    eps: bool = False  # the values are eps (iPNDM), not x0

    @property
    def buffers(self) -> int:
        return self.slots + int(self.corrector)


def _vp(ac: np.ndarray, ac_next: np.ndarray):
    """Per step k (from noise): alpha, sigma, log-SNR lambda at the step's time and the next."""
    alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
    alpha_n, sigma_n = np.sqrt(ac_next), np.sqrt(1 - ac_next)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        lam_n = np.log(alpha_n) - np.log(sigma_n)  # +inf onto the data
    return alpha, sigma, alpha_n, sigma_n, lam, lam_n


def orders(n: int, order: int, final: tuple[int, ...]) -> np.ndarray:
    """Per step k: min(order, k + 1 (the history available), final[j] for the j-th last step)."""
    out = np.minimum(order, np.arange(1, n + 1))
    for j, cap in enumerate(final[:n]):
        out[n - 1 - j] = min(out[n - 1 - j], cap)
    return out


def _empty(n: int, corrector: bool) -> dict[str, np.ndarray]:
    names = ["lin_x", "lin_z", *(f"lin_v{j}" for j in range(SLOTS + 1))]
    if corrector:
        names += ["cor_self", "cor_x", *(f"cor_v{j}" for j in range(SLOTS + 1))]
    return {name: np.zeros(n) for name in names}


def _put(tab: dict[str, np.ndarray], prefix: str, k: int, coefs) -> None:
    for j, c in enumerate(coefs):
        tab[f"{prefix}_v{j}"][k] += c


def dpmpp(ac: np.ndarray, ac_next: np.ndarray, order: int, sde: bool = False) -> dict:
    """DPM-Solver++ multistep of `order` (2 or 3) in the data prediction; sde: the stochastic
    variant (order 2 at most). Lower order final as diffusers: the last step first order, the
    one before at most second order when there are fewer than 15 steps."""
    n = len(ac)
    alpha, sigma, alpha_n, sigma_n, lam, lam_n = _vp(ac, ac_next)
    h = lam_n - lam
    p = orders(n, order, (1, 2) if n < 15 else (1,))
    tab = _empty(n, corrector=False)
    for k in range(n):
        last = not np.isfinite(h[k])  # onto the data: x' = x0
        e1 = -1.0 if last else math.expm1(-h[k])  # e^{-h} - 1
        if sde:
            e2 = 1.0 if last else -math.expm1(-2 * h[k])  # 1 - e^{-2h}
            tab["lin_x"][k] = 0.0 if last else sigma_n[k] / sigma[k] * math.exp(-h[k])
            tab["lin_z"][k] = sigma_n[k] * math.sqrt(e2)
            lead = alpha_n[k] * e2  # the D0 coefficient; the midpoint D1 gets half of it
        else:
            tab["lin_x"][k] = sigma_n[k] / sigma[k]
            lead = -alpha_n[k] * e1
        d0 = np.array([1.0, 0.0, 0.0])
        if p[k] == 1:
            _put(tab, "lin", k, lead * d0)
            continue
        r0 = (lam[k] - lam[k - 1]) / h[k]
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if p[k] == 2:
            _put(tab, "lin", k, lead * d0 + 0.5 * lead * d1_0)
            continue
        r1 = (lam[k - 1] - lam[k - 2]) / h[k]
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi2 = e1 / h[k] + 1
        phi3 = phi2 / h[k] - 0.5
        _put(tab, "lin", k, lead * d0 + alpha_n[k] * phi2 * d1 - alpha_n[k] * phi3 * d2)
    return tab


def _unipc_rhos(rks: list[float], hh: float, corrector: bool) -> np.ndarray:
    """UniPC's rho coefficients for the ratios rks (the last one 1), B(h) = e^h - 1."""
    q = len(rks)
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    rows, b = [], []
    for i in range(1, q + 1):
        rows.append(np.power(rks, i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    r, b = np.array(rows), np.array(b)
    if corrector:
        return np.array([0.5]) if q == 1 else np.linalg.solve(r, b)
    if q == 1:
        return np.zeros(0)
    return np.array([0.5]) if q == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])


def unipc(ac: np.ndarray, ac_next: np.ndarray, order: int) -> dict:
    """UniPC-bh2 of `order` (2 or 3) in the data prediction, with its corrector after every
    step but the last; order min(order, steps left) as diffusers' lower_order_final."""
    n = len(ac)
    alpha, sigma, alpha_n, sigma_n, lam, lam_n = _vp(ac, ac_next)
    p = np.minimum(orders(n, order, ()), n - np.arange(n))
    tab = _empty(n, corrector=True)
    for k in range(n):
        # Predictor from the (corrected) x at step k to step k + 1, values v_k .. v_{k-p+1}.
        last = not np.isfinite(lam_n[k])
        hh = -math.inf if last else -(lam_n[k] - lam[k])
        tab["lin_x"][k] = sigma_n[k] / sigma[k]
        h_phi_1 = -1.0 if last else math.expm1(hh)
        coefs = np.zeros(SLOTS + 1)
        coefs[0] = -alpha_n[k] * h_phi_1
        if p[k] > 1:
            rks = [(lam[k - j] - lam[k]) / -hh for j in range(1, p[k])] + [1.0]
            rhos = _unipc_rhos(rks, hh, corrector=False)
            for j, (rho, rk) in enumerate(zip(rhos, rks[:-1], strict=True), start=1):
                c = -alpha_n[k] * h_phi_1 * rho / rk  # B(h) = h phi_1 for bh2
                coefs[j] += c
                coefs[0] -= c
        _put(tab, "lin", k, coefs)
        if k == 0:
            tab["cor_self"][k] = 1.0  # nothing to correct yet: x stays
            continue
        # Corrector of step k - 1's result (order p[k-1]) with this step's value v_k.
        q = p[k - 1]
        hh = -(lam[k] - lam[k - 1])
        h_phi_1 = math.expm1(hh)
        rks = [(lam[k - 1 - j] - lam[k - 1]) / -hh for j in range(1, q)] + [1.0]
        rhos = _unipc_rhos(rks, hh, corrector=True)
        tab["cor_x"][k] = sigma[k] / sigma[k - 1]
        coefs = np.zeros(SLOTS + 1)  # over v_k, v_{k-1}, ...
        coefs[1] = -alpha[k] * h_phi_1
        for j, (rho, rk) in enumerate(zip(rhos[:-1], rks[:-1], strict=True), start=1):
            c = -alpha[k] * h_phi_1 * rho / rk
            coefs[j + 1] += c
            coefs[1] -= c
        c = -alpha[k] * h_phi_1 * rhos[-1]
        coefs[0] += c
        coefs[1] -= c
        _put(tab, "cor", k, coefs)
    return tab


IPNDM = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


def ipndm(ac: np.ndarray, ac_next: np.ndarray, order: int = 4) -> dict:
    """iPNDM: x'/alpha' = x/alpha + (s' - s) * sum_j c_j eps_{k-j}, s = sigma/alpha, with the
    Adams-Bashforth weights of order min(order, k + 1)."""
    n = len(ac)
    alpha, sigma, alpha_n, sigma_n, _, _ = _vp(ac, ac_next)
    p = orders(n, order, ())
    tab = _empty(n, corrector=False)
    for k in range(n):
        tab["lin_x"][k] = alpha_n[k] / alpha[k]
        ds = sigma_n[k] / alpha_n[k] - sigma[k] / alpha[k]
        _put(tab, "lin", k, alpha_n[k] * ds * np.array(IPNDM[p[k] - 1]))
    return tab
