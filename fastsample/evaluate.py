"""Sample quality as the reference evaluator (guided-diffusion's evaluations/evaluator.py)
measures it: Inception Score, FID, sFID, precision and recall (formulas in `metrics`), over a
pluggable feature extractor, streaming: images are read and featurized batch by batch, moments
summed in float64; only the pool features precision/recall needs (float32) are kept.

Extractors map uint8 NHWC images to {"pool", "spatial", "logits"}:
- "inception": the reference's own network (`fastsample.inception`), the default for RGB
  images of 64 px and up;
- "judge": the demo's digit classifier, the default for 32x32 images;
- "pixels" (tests, sanity checks) and "package.module:factory" (a function returning one).
Numbers from different extractors are not comparable with each other, so a reference .npz's
stored statistics are used only with the extractor they came from: the reference batches'
(which name none) are Inception's; the files `write_reference` makes name theirs.

Argument order: the reference evaluator takes the reference first (`evaluator.py REF SAMPLES`);
`fastsample eval SAMPLES --ref REF` takes the samples first.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, OutputExistsError
from .imagesource import STAT_KEYS, ImageSource, open_images
from .metrics import (  # noqa: F401  (the metric functions' public home stays here)
    RunningMoments,
    ScoreAccumulator,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    statistics,
)

ExtractFn = Callable[[np.ndarray], dict[str, np.ndarray]]
EXTRACTORS = ("auto", "inception", "judge", "pixels")


@dataclass
class Extractor:
    key: str  # what stored statistics are matched against: "inception", "judge", ...
    label: str  # the first line of a report
    extract: ExtractFn
    batch_size: int = 500
    weights_sha256: str | None = None  # Inception's weight file


def inception_extractor(weights=None, device=None, batch_size: int | None = None):
    """The FID Inception-v3 (fastsample.inception) as an extractor: uint8 NHWC RGB images of any
    size -> {"pool" [N, 2048], "spatial" [N, 2023], "logits" [N, 1008]} (float32). weights: the
    published weight file (default: torch.hub's cache, downloaded there if absent)."""
    from .inception import InceptionExtractor

    return InceptionExtractor(weights, device=device, batch_size=batch_size)


def judge_extractor(batch: int = 500) -> ExtractFn:
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


def resolve_extractor(name: str, shape) -> str:
    """ "auto" -> "judge" for 32x32 images, "inception" for RGB of 64 px and up."""
    if name != "auto":
        return name
    h, w, c = shape[1:]
    if (h, w) == (32, 32):
        return "judge"
    if c == 3 and min(h, w) >= 64:
        return "inception"
    raise InputError(
        f"images of {w}x{h} with {c} channel(s): no default extractor (judge: 32x32; inception: "
        "RGB of 64 px and up); name one with --extractor"
    )


def get_extractor(name: str, inception_weights=None, device=None) -> Extractor:
    """ "inception", "judge", "pixels", or "package.module:factory" (a function returning an
    extractor)."""
    if name == "inception":
        ex = inception_extractor(inception_weights, device=device)
        sha = ex.weights_sha256
        label = f"inception (FID Inception-v3, weights sha256 {sha[:12]}, {ex.device.type})"
        return Extractor("inception", label, ex, ex.batch_size, sha)
    if name == "judge":
        return Extractor(name, "judge (fastsample demo MNIST judge)", judge_extractor())
    if name == "pixels":
        return Extractor(name, "pixels", pixel_extractor)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise InputError(f"extractor {name!r} cannot be imported: {e}") from None
        return Extractor(name, name, factory())
    raise InputError(
        f"extractor {name!r}: expected 'auto', 'inception', 'judge', 'pixels' or 'module:factory'"
    )


class FeatureSet:
    """What evaluation keeps of one image set: pool and spatial moments, the Inception Score
    sums, pool features (float32) and, given labels, the count the judge reads correctly."""

    def __init__(self, labels: np.ndarray | None = None, score: bool = True):
        self.pool_moments, self.spatial_moments = RunningMoments(), RunningMoments()
        self.score = ScoreAccumulator() if score else None
        self.pool: list[np.ndarray] = []
        self.labels, self.correct, self.n = labels, 0, 0

    def add(self, feats: dict[str, np.ndarray]) -> None:
        count = len(feats["pool"])
        self.pool_moments.add(feats["pool"])
        self.spatial_moments.add(feats["spatial"])
        if self.score is not None:
            self.score.add(feats["logits"])
        self.pool.append(np.asarray(feats["pool"], np.float32).reshape(count, -1))
        if self.labels is not None:
            read = np.asarray(feats["logits"]).argmax(axis=1)
            self.correct += int((read == self.labels[self.n : self.n + count]).sum())
        self.n += count

    def pool_features(self) -> np.ndarray:
        return np.concatenate(self.pool) if self.pool else np.zeros((0, 0), np.float32)


def featurize(source: ImageSource, extractor: Extractor, labels=None, score: bool = True,
              progress: bool = False, what: str = "") -> FeatureSet:  # fmt: skip
    from tqdm.auto import tqdm

    out = FeatureSet(labels, score)
    bar = tqdm(total=len(source), disable=not progress, file=sys.stderr, unit="img", desc=what)
    with bar:
        for batch in source.batches(extractor.batch_size):
            out.add(extractor.extract(batch))
            bar.update(len(batch))
    return out


def _stored_match(source: ImageSource, extractor: Extractor) -> bool:
    if source.extractor != extractor.key:
        return False
    return None in (source.weights_sha256, extractor.weights_sha256) or (
        source.weights_sha256 == extractor.weights_sha256
    )


@dataclass
class Reference:
    """A reference set's pool features and its (pool, spatial) statistics."""

    pool: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    stored: bool  # statistics read from the file rather than computed here
    notes: list[str] = field(default_factory=list)


def check_reference(source: ImageSource, extractor: Extractor) -> list[str]:
    """The one line saying that a reference's stored statistics are another extractor's (and
    are not used); an error where the file holds nothing else."""
    if not (source.stats or source.pool is not None) or _stored_match(source, extractor):
        return []
    theirs = source.extractor or "an unnamed extractor"
    if source.extractor == extractor.key:
        theirs = f"Inception weights {source.weights_sha256[:12]}"
    if not getattr(source, "has_images", True):
        raise InputError(
            f"{source.path}: holds {theirs} statistics and no images; "
            f"evaluate it with --extractor {source.extractor}"
        )
    return [
        f"{source.path}: its stored statistics are {theirs}'s, not {extractor.key}'s: "
        "computing the reference's statistics from its images instead"
    ]


def reference_features(source: ImageSource, extractor: Extractor,
                       progress: bool = False) -> Reference:  # fmt: skip
    """The reference's features: its stored statistics (and stored pool features) when they
    are this extractor's, else computed from its images, with one line saying why."""
    match = _stored_match(source, extractor)
    stats = source.stats if match and all(k in source.stats for k in STAT_KEYS) else {}
    notes = check_reference(source, extractor)
    if match and source.pool is not None and stats:
        pool = source.pool
    else:
        feats = featurize(source, extractor, score=False, progress=progress, what="reference")
        pool = feats.pool_features()
        if not stats:
            stats = dict(zip(("mu", "sigma"), feats.pool_moments.result(), strict=True))
            stats.update(zip(("mu_s", "sigma_s"), feats.spatial_moments.result(), strict=True))
    return Reference(pool, stats["mu"], stats["sigma"], stats["mu_s"], stats["sigma_s"],
                     stored=match and bool(source.stats), notes=notes)  # fmt: skip


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
    ref_statistics: str = "computed"  # or "stored": read from the reference file
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The extractor, then the reference evaluator's five lines (full float precision)."""
        out = [
            f"extractor: {self.extractor} ({self.num_samples} samples vs {self.num_ref} reference"
            f", reference statistics {self.ref_statistics})",
            f"Inception Score: {self.inception_score}",
            f"FID: {self.fid}",
            f"sFID: {self.sfid}",
            f"Precision: {self.precision}",
            f"Recall: {self.recall}",
        ]
        if self.accuracy is not None:
            out.append(f"Judge accuracy on requested classes: {self.accuracy}")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(samples_path, ref_path, extractor: str = "auto", *, inception_weights=None,
             device=None, progress: bool = False,
             save_reference: str | Path | None = None) -> Report:  # fmt: skip
    """Compare SAMPLES (an .npz in the evaluator's batch format, or an image folder) with a
    reference batch. save_reference: also write the reference's statistics and features there
    (`write_reference`), for later runs."""
    with ExitStack() as opened:
        sources = []
        for path in (samples_path, ref_path):  # the files opened here are closed here
            src = open_images(path)
            sources.append(src if src is path else opened.enter_context(src))
        return _evaluate(*sources, extractor, inception_weights, device, progress,
                         save_reference)  # fmt: skip


def _evaluate(samples, ref, extractor, inception_weights, device, progress,
              save_reference) -> Report:  # fmt: skip
    if save_reference is not None and Path(save_reference).exists():
        raise OutputExistsError(f"{save_reference}: exists; choose another file")
    if not getattr(samples, "has_images", True):
        raise InputError(f"{samples.path}: holds features only, no images (arr_0) to evaluate")
    name = resolve_extractor(extractor, samples.shape)
    ex = get_extractor(name, inception_weights, device)
    notes = []
    if samples.stats and not ref.stats:
        notes.append(
            f"{samples.path} holds reference statistics: the reference evaluator takes the "
            "reference first, fastsample takes it as --ref (fastsample eval SAMPLES --ref REF)"
        )
    check_reference(ref, ex)  # before the samples' features: a refusal costs nothing
    labels = samples.labels if name == "judge" else None
    fs = featurize(samples, ex, labels=labels, progress=progress, what="samples")
    r = reference_features(ref, ex, progress)
    if save_reference is not None:
        write_reference(save_reference, r, ex)
    mu, sigma = fs.pool_moments.result()
    mu_s, sigma_s = fs.spatial_moments.result()
    precision, recall = precision_recall(r.pool, fs.pool_features(), device=_pr_device(device))
    return Report(
        extractor=ex.label,
        inception_score=fs.score.result(),
        fid=frechet_distance(mu, sigma, r.mu, r.sigma),
        sfid=frechet_distance(mu_s, sigma_s, r.mu_s, r.sigma_s),
        precision=precision,
        recall=recall,
        accuracy=None if labels is None else fs.correct / fs.n,
        num_samples=fs.n,
        num_ref=len(r.pool),
        ref_statistics="stored" if r.stored else "computed",
        notes=notes + r.notes,
    )


def _pr_device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else None
    return device


def write_reference(path, ref: Reference, extractor: Extractor) -> None:
    """A reference .npz holding statistics and pool features but no images, naming the
    extractor they came from: `--ref` of later runs with the same extractor reads it without
    featurizing again. Written whole or not at all."""
    from .image_io import atomic_write

    arrays = dict(mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s, sigma_s=ref.sigma_s)
    arrays.update(pool=np.asarray(ref.pool, np.float32), extractor=np.array(extractor.key))
    if extractor.weights_sha256:
        arrays["inception_weights_sha256"] = np.array(extractor.weights_sha256)
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


class Scorer:
    """FID, precision/recall and (with the judge and labels) accuracy of image arrays against
    one reference, featurized once: for measuring many settings in a row (`fastsample tune`).
    The same figures as `evaluate` on the same images."""

    def __init__(self, ref, extractor: str = "auto", *, inception_weights=None, device=None):
        source = ref if isinstance(ref, ImageSource) else open_images(ref)
        with nullcontext() if source is ref else source:
            self.extractor = resolve_extractor(extractor, source.shape)
            self.ex = get_extractor(self.extractor, inception_weights, device)
            self.name = self.ex.label
            r = reference_features(source, self.ex)
        self.ref_pool, self.mu, self.sigma, self.notes = r.pool, r.mu, r.sigma, r.notes
        self.num_ref = len(r.pool)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        fs = FeatureSet(labels if self.extractor == "judge" else None, score=False)
        for i in range(0, len(images), self.ex.batch_size):
            fs.add(self.ex.extract(images[i : i + self.ex.batch_size]))
        out = {"fid": frechet_distance(*fs.pool_moments.result(), self.mu, self.sigma)}
        out["precision"], out["recall"] = precision_recall(self.ref_pool, fs.pool_features())
        if fs.labels is not None:
            out["accuracy"] = fs.correct / fs.n
        return out
