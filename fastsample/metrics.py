"""The reference evaluator's sample-quality formulas (guided-diffusion's
evaluations/evaluator.py), over features accumulated batch by batch.

- FID / sFID (Heusel et al. 2017): |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), covariances
  with N - 1 normalisation; `RunningMoments` sums in float64 so that memory does not grow with N.
- Inception Score (Salimans et al. 2016): exp(mean KL(p(y|x) || p(y))) per split of 5,000
  images (in order), averaged over splits; `ScoreAccumulator` keeps two sums per split.
- Precision / recall (Kynkaanniemi et al. 2019), k = 3: a point's radius is the 4th-smallest
  squared distance within its own set (itself first); precision is the share of samples inside
  some reference ball, recall the share of reference points inside some sample ball. Distances
  are computed in float64 blocks, so features may be stored as float32.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

MAX_MOMENT_DIMS = 4096  # a float64 covariance of 4096 features is 128 MiB, its FID seconds


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr sqrt(S1 S2) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix sqrt(S1) S2 sqrt(S1), which has the same spectrum as S1 S2. Eigenvalues below the
    numerical-rank tolerance (largest * dimension * float64 eps) are zeros: with fewer images
    than features, the square roots of their rounding noise would otherwise add up."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(
            f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    vals, vecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vecs * np.sqrt(_above_rank_tolerance(vals))) @ vecs.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_above_rank_tolerance(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _above_rank_tolerance(vals: np.ndarray) -> np.ndarray:
    if not len(vals):
        return vals
    tol = max(float(vals.max()), 0.0) * len(vals) * np.finfo(np.float64).eps
    return np.where(vals > tol, vals, 0.0)


class RunningMoments:
    """Mean and covariance (N - 1) of feature rows added batch by batch, in float64. Rows are
    shifted by the first row before summing, which keeps the sums' cancellation small."""

    def __init__(self):
        self.n = 0
        self.shift = self.s1 = self.s2 = None

    def add(self, rows) -> None:
        x = torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(len(rows), -1))
        if len(x) == 0:
            return
        if self.shift is None:
            if x.shape[1] > MAX_MOMENT_DIMS:
                raise InputError(
                    f"features of {x.shape[1]} values: a covariance takes at most "
                    f"{MAX_MOMENT_DIMS} (use a feature extractor, not raw pixels of large images)"
                )
            self.shift = x[0].clone()
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        elif x.shape[1] != self.shift.shape[0]:
            raise InputError(f"features of {x.shape[1]} values after {self.shift.shape[0]}")
        d = x - self.shift
        self.s1 += d.sum(0)
        self.s2 += d.T @ d
        self.n += len(x)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise InputError(f"{self.n} images: mean and covariance need at least 2")
        mean = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return (self.shift + mean).numpy(), ((cov + cov.T) / 2).numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise InputError(f"features of shape {features.shape}: expected [N >= 2, D]")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class ScoreAccumulator:
    """The Inception Score of logits added in order, split every `split_size` images. Per split
    it keeps sum_i sum_y p log p and sum_i p (float64): mean KL(p_i || p_bar) = (sum p log p -
    sum_y P_y log(P_y / n)) / n with P_y = sum_i p_iy."""

    def __init__(self, split_size: int = 5000):
        if split_size < 1:
            raise InputError(f"split size {split_size}: expected a positive integer")
        self.split_size = split_size
        self.scores: list[float] = []
        self.n, self.plogp, self.p = 0, 0.0, None

    def add(self, logits) -> None:
        logits = np.asarray(logits, dtype=np.float64)
        while len(logits):
            take = logits[: self.split_size - self.n]
            logits = logits[len(take) :]
            logp = take - take.max(axis=1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
            p = np.exp(logp)
            self.plogp += float(np.where(p > 0, p * logp, 0.0).sum())
            self.p = p.sum(axis=0) if self.p is None else self.p + p.sum(axis=0)
            self.n += len(take)
            if self.n == self.split_size:
                self._close()

    def _close(self) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = np.where(self.p > 0, self.p * np.log(self.p / self.n), 0.0).sum()
        self.scores.append(float(np.exp((self.plogp - cross) / self.n)))
        self.n, self.plogp, self.p = 0, 0.0, None

    def result(self) -> float:
        if self.n:
            self._close()
        if not self.scores:
            raise InputError("no images: the Inception Score needs at least one")
        return float(np.mean(self.scores))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    acc = ScoreAccumulator(split_size)
    acc.add(logits)
    return acc.result()


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def _rows(features) -> torch.Tensor:
    features = np.asarray(features)
    if not (features.flags.c_contiguous and features.flags.writeable):
        features = features.copy(order="C")
    f = torch.from_numpy(features)
    if f.ndim != 2:
        raise InputError(f"features of shape {tuple(f.shape)}: expected [N, D]")
    return f


def manifold_radii(features, k: int = 3, batch: int = 2000, device=None) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in its own set (the point
    itself counted first), in float64 blocks of batch x batch distances."""
    f = _rows(features)
    if len(f) <= k:
        raise InputError(f"{len(f)} points: precision/recall with k={k} needs more than {k}")
    radii = torch.empty(len(f), dtype=torch.float64)
    for i in range(0, len(f), batch):
        rows = f[i : i + batch].to(device, torch.float64)
        best = None
        for j in range(0, len(f), batch):
            d = _squared_distances(rows, f[j : j + batch].to(device, torch.float64))
            cand = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = cand if best is None else torch.cat([best, cand], 1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii[i : i + batch] = best[:, k].cpu()
    return radii.numpy()


def precision_recall(ref, samples, k: int = 3, batch: int = 2000, device=None):
    """(precision, recall) of samples against reference features."""
    r, s = _rows(ref), _rows(samples)
    radii_r = torch.from_numpy(manifold_radii(ref, k, batch, device)).to(device)
    radii_s = torch.from_numpy(manifold_radii(samples, k, batch, device)).to(device)
    in_ref = torch.zeros(len(s), dtype=torch.bool, device=device)  # inside some reference ball
    in_sample = torch.zeros(len(r), dtype=torch.bool, device=device)  # inside some sample ball
    for i in range(0, len(s), batch):
        rows = s[i : i + batch].to(device, torch.float64)
        for j in range(0, len(r), batch):
            d = _squared_distances(rows, r[j : j + batch].to(device, torch.float64))
            in_ref[i : i + batch] |= (d <= radii_r[None, j : j + batch]).any(dim=1)
            in_sample[j : j + batch] |= (d <= radii_s[i : i + batch, None]).any(dim=0)
    return float(in_ref.double().mean()), float(in_sample.double().mean())
