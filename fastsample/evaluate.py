"""Sample quality: FID, sFID, Inception Score, precision and recall, as the reference evaluator
(guided-diffusion's evaluations/evaluator.py) defines them, over a pluggable feature extractor.

- FID / sFID (Heusel et al. 2017): |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) on "pool" /
  "spatial" features; covariances with N - 1 normalisation; reference statistics (mu, sigma,
  mu_s, sigma_s) stored in the reference .npz are used when present.
- Inception Score (Salimans et al. 2016): exp(mean KL(p(y|x) || p(y))) per split of 5,000,
  averaged over splits.
- Precision / recall (Kynkaanniemi et al. 2019), k = 3: a point's radius is its 4th-smallest
  squared distance within its own set (itself first); precision is the share of samples inside some
  reference ball, recall the share of reference points inside some sample ball.

The extractor maps uint8 NHWC images to {"pool", "spatial", "logits"}. The reference uses
Inception-v3; fastsample's default for demo-sized images is the demo judge. Numbers from
different extractors are not comparable with each other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError

Extractor = Callable[[np.ndarray], dict[str, np.ndarray]]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr sqrt(S1 S2) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix sqrt(S1) S2 sqrt(S1), which has the same spectrum as S1 S2."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(
            f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    vals, vecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise InputError(f"features of shape {features.shape}: expected [N >= 2, D]")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        kl = np.nan_to_num(kl)  # 0 * log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def manifold_radii(features: np.ndarray, k: int = 3, batch: int = 10000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in its own set."""
    f = torch.from_numpy(np.asarray(features, dtype=np.float64))
    if len(f) <= k:
        raise InputError(f"{len(f)} points: precision/recall with k={k} needs more than {k}")
    radii = []
    for i in range(0, len(f), batch):
        d = _squared_distances(f[i : i + batch], f)
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)  # itself is the 1st
    return torch.cat(radii).numpy()


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = 3, batch: int = 10000):
    """(precision, recall) of samples against reference features."""
    r = torch.from_numpy(np.asarray(ref, dtype=np.float64))
    s = torch.from_numpy(np.asarray(samples, dtype=np.float64))
    radii_r = torch.from_numpy(manifold_radii(ref, k, batch))
    radii_s = torch.from_numpy(manifold_radii(samples, k, batch))
    in_ref = torch.zeros(len(s), dtype=torch.bool)  # sample inside some reference ball
    in_sample = torch.zeros(len(r), dtype=torch.bool)  # reference inside some sample ball
    for i in range(0, len(s), batch):
        d = _squared_distances(s[i : i + batch], r)  # [samples, ref]
        in_ref[i : i + batch] = (d <= radii_r[None]).any(dim=1)
        in_sample |= (d <= radii_s[i : i + batch, None]).any(dim=0)
    return float(in_ref.double().mean()), float(in_sample.double().mean())


@dataclass
class Report:
    extractor: str
    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float
    accuracy: float | None = None  # the judge's accuracy on the requested classes
    num_samples: int = 0
    num_ref: int = 0

    def lines(self) -> list[str]:
        out = [
            f"extractor: {self.extractor} ({self.num_samples} samples vs {self.num_ref} reference)",
            f"Inception Score: {self.inception_score:.4f}",
            f"FID: {self.fid:.4f}",
            f"sFID: {self.sfid:.4f}",
            f"Precision: {self.precision:.4f}",
            f"Recall: {self.recall:.4f}",
        ]
        if self.accuracy is not None:
            out.append(f"Judge accuracy on requested classes: {self.accuracy:.4f}")
        return out


def judge_extractor(batch: int = 500) -> Extractor:
    """The demo judge's features of uint8 NHWC 32x32 images (grey, or RGB averaged)."""
    from .judge import images_to_input, load_judge

    judge = load_judge()

    def extract(images: np.ndarray) -> dict[str, np.ndarray]:
        if images.shape[1:3] != (32, 32):
            raise InputError(
                f"the judge extractor takes 32x32 images, got {images.shape[1]}x{images.shape[2]}"
            )
        parts = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                feats = judge.features(images_to_input(images[i : i + batch]))
                parts.append({k: v.numpy() for k, v in feats.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return extract


def pixel_extractor(images: np.ndarray) -> dict[str, np.ndarray]:
    """Raw pixels as features (no logits: Inception Score is then undefined). For tests and
    for sanity checks; not a perceptual metric."""
    flat = images.reshape(len(images), -1).astype(np.float64) / 255
    return {"pool": flat, "spatial": flat, "logits": np.zeros((len(images), 1))}


def get_extractor(name: str) -> tuple[str, Extractor]:
    """ "judge", "pixels", or "package.module:factory" (a function returning an extractor)."""
    if name == "judge":
        return "judge (fastsample demo MNIST judge)", judge_extractor()
    if name == "pixels":
        return "pixels", pixel_extractor
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"extractor {name!r} cannot be imported: {e}") from None
        return name, factory()
    raise InputError(f"extractor {name!r}: expected 'judge', 'pixels' or 'module:factory'")


def _load_images(path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    try:
        with np.load(path) as data:
            if "arr_0" not in data:
                raise KeyError("arr_0")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
            stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data}
    except KeyError:
        raise InputError(f"{path}: expected arr_0 (uint8 NHWC images)") from None
    except (OSError, EOFError, ValueError) as e:  # ValueError: not a zip (pickles refused)
        raise InputError(f"{path}: not a readable .npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"{path}: arr_0 is {images.dtype} {images.shape}, expected uint8 NHWC")
    return images, labels, stats


class Scorer:
    """FID, precision/recall and (with the judge and labels) accuracy of image arrays against
    one reference batch, its features extracted once: for measuring many settings in a row
    (`fastsample tune`). The same figures as `evaluate` on the same images."""

    def __init__(self, ref_images: np.ndarray, extractor: str = "judge",
                 ref_stats: dict | None = None):  # fmt: skip
        self.extractor = extractor
        self.name, self.extract = get_extractor(extractor)
        self.ref_pool = self.extract(ref_images)["pool"]
        stats = ref_stats or {}
        self.mu, self.sigma = (
            (stats["mu"], stats["sigma"]) if "mu" in stats else statistics(self.ref_pool)
        )
        self.num_ref = len(ref_images)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        f = self.extract(images)
        out = {"fid": frechet_distance(*statistics(f["pool"]), self.mu, self.sigma)}
        out["precision"], out["recall"] = precision_recall(self.ref_pool, f["pool"])
        if labels is not None and self.extractor == "judge":
            out["accuracy"] = float((f["logits"].argmax(axis=1) == labels).mean())
        return out


def load_reference(path) -> tuple[np.ndarray, dict]:
    """A reference batch .npz: (uint8 NHWC images, stored statistics mu/sigma/... if any)."""
    images, _, stats = _load_images(path)
    return images, stats


def evaluate(samples_path, ref_path, extractor: str = "judge") -> Report:
    """Compare a samples .npz against a reference .npz (the evaluator's batch format)."""
    name, extract = get_extractor(extractor)
    samples, labels, _ = _load_images(samples_path)
    ref, _, ref_stats = _load_images(ref_path)
    fs, fr = extract(samples), extract(ref)
    mu_r, sigma_r = (
        (ref_stats["mu"], ref_stats["sigma"]) if "mu" in ref_stats else statistics(fr["pool"])
    )
    if "mu_s" in ref_stats:
        mu_rs, sigma_rs = ref_stats["mu_s"], ref_stats["sigma_s"]
    else:
        mu_rs, sigma_rs = statistics(fr["spatial"])
    fid = frechet_distance(*statistics(fs["pool"]), mu_r, sigma_r)
    sfid = frechet_distance(*statistics(fs["spatial"]), mu_rs, sigma_rs)
    precision, recall = precision_recall(fr["pool"], fs["pool"])
    accuracy = None
    if labels is not None and extractor == "judge":
        accuracy = float((fs["logits"].argmax(axis=1) == labels).mean())
    return Report(
        extractor=name,
        inception_score=inception_score(fs["logits"]),
        fid=fid,
        sfid=sfid,
        precision=precision,
        recall=recall,
        accuracy=accuracy,
        num_samples=len(samples),
        num_ref=len(ref),
    )
