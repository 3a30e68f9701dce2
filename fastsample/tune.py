"""`fastsample tune`: measure the speed-quality frontier of a model on this device and pick the
fastest recipe that meets a quality target.

Quality is measured on a fixed seed set (sample i uses seed (seed, i) and the label drawn from
it, so every setting sees the same noise and classes), with `fastsample eval`'s features against
a reference batch: FID, precision and recall, and the judge's accuracy where the judge is the
extractor. Cost is the measured wall time per image at the chosen batch size (the median over
the setting's batches).

The search spends its budget in rounds:

1. the reference recipe (the preset's own setting) at the full sample count: the baseline the
   target is relative to;
2. a coarse grid, every sampler family at a few step counts, at a quarter of the samples;
3. refinement: settings one knob away (steps, feature caching, classifier reuse, guidance
   interval, scale, precision on a GPU) from the fastest ones that meet the target so far;
4. successive halving: the cheapest quarter of the settings that meet the target (with a
   margin for the noise of fewer samples) is measured again with all samples; only a setting
   measured with all samples can be chosen.

Rounds 3 and 4 repeat while the budget lasts and refinement finds settings not yet measured.
Everything is kept in a state directory (every batch of images as it is made, every figure),
so a run that is killed continues where it stopped when rerun; its budget counts the time
already spent. A different target reuses the measured points.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import recipes
from .errors import InputError
from .image_io import atomic_write
from .recipes import Recipe
from .tunetarget import Target, parse_budget, parse_target  # noqa: F401 (the API)

STATE_FORMAT = "fastsample-tune-state/1"
# (sampler, time schedule) pairs of the coarse grid, and its step counts.
TIME_TIE = 0.05  # wall times within 5% are a tie (run-to-run noise on a shared machine)
FAMILIES = (("ddpm", "respace"), ("ddpm", "logsnr"), ("ddim", "respace"), ("ddim", "logsnr"),
            ("dpm++2m", "logsnr"), ("dpm++2m-sde", "logsnr"), ("unipc", "logsnr"),
            ("dpm++3m", "logsnr"), ("unipc3", "logsnr"), ("ipndm", "logsnr"))  # fmt: skip
COARSE_STEPS = (10,)
ETA = 4  # a setting is first measured with 1 / ETA of the samples


def key_of(recipe: Recipe) -> str:
    return json.dumps(recipe.knobs(), sort_keys=True)


def _steps(sampler: str, schedule: str, n: int) -> str:
    return f"ddim{n}" if sampler == "ddim" and schedule == "respace" else str(n)


def coarse_grid(scale: float | None) -> list[Recipe]:
    return [Recipe(s, _steps(s, sch, n), sch, guidance_scale=scale)
            for n in COARSE_STEPS for s, sch in FAMILIES]  # fmt: skip


def moves(rec: Recipe, num_timesteps: int, low_precision: tuple[str, ...]) -> tuple[list, list]:
    """The settings one knob away from rec: (cheaper ones, better ones). Cheaper: fewer steps,
    more feature caching, the classifier's gradient reused longer or left out at low noise, a
    lower precision. Better: more steps, less caching or reuse, another scale."""
    n = int(rec.steps[4:] if rec.steps.startswith("ddim") else rec.steps)
    cheaper = [replace(rec, steps=_steps(rec.sampler, rec.schedule, n - 2))] if n > 5 else []
    better = [replace(rec, steps=_steps(rec.sampler, rec.schedule, m)) for m in (n + 2, n + 4)]
    cheaper.append(replace(rec, cache_interval=rec.cache_interval + 1))
    if rec.cache_interval > 1:
        better.append(replace(rec, cache_interval=rec.cache_interval - 1))
    if rec.guidance_scale:
        cheaper.append(replace(rec, guidance_every=rec.guidance_every + 1))
        if rec.guidance_every > 1:
            better.append(replace(rec, guidance_every=rec.guidance_every - 1))
        top = float(num_timesteps - 1)
        lo = rec.guidance_interval[0] if rec.guidance_interval else 0.0
        if lo < top / 2:
            cheaper.append(replace(rec, guidance_interval=(lo + round(0.1 * num_timesteps), top)))
        if lo > 0:
            step = round(0.1 * num_timesteps)
            better.append(replace(rec, guidance_interval=(lo - step, top) if lo > step else None))
        better += [replace(rec, guidance_scale=round(rec.guidance_scale * f, 3))
                   for f in (0.8, 1.25)]  # fmt: skip
    cheaper += [replace(rec, dtype=d) for d in low_precision if rec.dtype is None]
    return cheaper, better


class State:
    """The state directory: state.json (settings, seconds spent, every point's figures and
    batch times) and one .npz per measured batch under samples/."""

    def __init__(self, directory: Path, settings: dict, overwrite: bool):
        self.dir = directory
        self.path = directory / "state.json"
        self.data = {"format": STATE_FORMAT, "settings": settings, "spent_s": 0.0,
                     "points": {}}  # fmt: skip
        if self.path.is_file() and not overwrite:
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{self.path}: unreadable tune state ({e}); pass --overwrite "
                                 "to start afresh") from None  # fmt: skip
            if saved.get("format") != STATE_FORMAT or saved.get("settings") != settings:
                raise InputError(
                    f"{directory} holds a tune of other settings (model, reference, batch, "
                    "seed, device or samples); pass --overwrite to replace it, or another --out"
                )
            self.data = saved
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "samples").mkdir(exist_ok=True)

    @property
    def points(self) -> dict[str, dict]:
        return self.data["points"]

    def save(self) -> None:
        text = (json.dumps(self.data, indent=1) + "\n").encode()
        atomic_write(self.path, lambda f: f.write(text))

    def chunk_dir(self, key: str) -> Path:
        return self.dir / "samples" / hashlib.sha256(key.encode()).hexdigest()[:16]


class Tuner:
    """One tune: `run()` measures until the budget is spent or nothing new is left to measure;
    `result()` is the front and the chosen recipe. make_pipe(dtype) -> the Pipeline for a
    precision (None: the default)."""

    def __init__(self, make_pipe: Callable[[str | None], Any], scorer, target: Target,
                 budget_s: float, state: State, samples: int, batch: int, seed: int = 0,
                 log: Callable[[str], None] = print):  # fmt: skip
        self.make_pipe, self.scorer, self.target = make_pipe, scorer, target
        self.budget_s, self.state, self.batch, self.seed, self.log = (budget_s, state, batch,
                                                                      seed, log)  # fmt: skip
        self.full = samples
        self.rungs = sorted({max(min(samples, batch), samples // ETA), samples})
        self._pipes: dict[str | None, Any] = {}
        self._t0 = time.monotonic()
        self._spent0 = state.data["spent_s"]
        pipe = self.pipe(None)
        self._units: dict[str | None, tuple[float, float, float]] = {}
        self._skipped: set[str] = set()  # predicted no cheaper than the best: left out
        self._checked: set[str] = set()  # found valid
        self._calls: dict[str, dict] = {}
        self.low_precision = _low_precisions(pipe)
        self.num_timesteps = pipe.diffusion.steps
        self.scale = pipe.guidance_scale if pipe.classifier_config is not None else None
        ref = pipe.check(batch, batch, recipe="reference")  # the preset's own setting, spelled out
        self.reference = Recipe(ref.sampler, ref.diffusion.timestep_respacing,
                                ref.diffusion.time_schedule, guidance_scale=self.scale,
                                name="reference")  # fmt: skip

    def pipe(self, dtype: str | None):
        if dtype not in self._pipes:
            self._pipes[dtype] = self.make_pipe(dtype)
        return self._pipes[dtype]

    # -- time --
    def spent(self) -> float:
        return self._spent0 + time.monotonic() - self._t0

    def left(self) -> float:
        return self.budget_s - self.spent()

    # -- measuring --
    def _valid(self, rec: Recipe) -> str | None:
        """Why rec cannot run here (None: it can)."""
        try:
            self.pipe(rec.dtype).check(self.batch, self.batch, recipe=rec)
        except (InputError, ValueError) as e:
            return str(e)
        return None

    def measure(self, rec: Recipe, n: int) -> dict | None:
        """rec's figures with n samples (reusing the batches already made); None where the
        budget ran out first (what was made is kept)."""
        key = key_of(rec)
        point = self.state.points.setdefault(
            key, {"recipe": rec.to_json(), "rungs": {}, "batch_ms": []}
        )
        if str(n) in point["rungs"]:
            return point["rungs"][str(n)]
        chunks = self.state.chunk_dir(key)
        chunks.mkdir(parents=True, exist_ok=True)
        pipe = self.pipe(rec.dtype)
        while (have := self._count(chunks)) < n:
            if self.left() <= 0:
                return None
            count = min(self.batch, n - have)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                g = pipe.generate(count, batch_size=count, seed=self.seed, first_index=have,
                                  progress=False, recipe=rec)  # fmt: skip
            ms = (time.perf_counter() - start) / count * 1e3
            if said and "warnings" not in point:  # the advisories, kept with the point
                point["warnings"] = sorted({str(w.message) for w in said})
            arrays = {"images": g.images}
            if g.labels is not None:
                arrays["labels"] = g.labels
            atomic_write(chunks / f"{have:07d}.npz", lambda f, a=arrays: np.savez(f, **a))
            point["batch_ms"].append(ms)
            self.state.data["spent_s"] = self.spent()
            self.state.save()
        images, labels = self._load(chunks, n)
        ms = statistics.median(point["batch_ms"])
        for m in [r for r in self.rungs if r < n and str(r) not in point["rungs"]] + [n]:
            fig = self.scorer(images[:m], None if labels is None else labels[:m])
            point["rungs"][str(m)] = {**fig, "ms_per_image": ms}
        self.state.data["spent_s"] = self.spent()
        self.state.save()
        return point["rungs"][str(n)]

    @staticmethod
    def _count(chunks: Path) -> int:
        total = 0
        for f in sorted(chunks.glob("*.npz")):
            if int(f.stem) != total:
                break  # (a gap cannot happen: batches are written in order)
            with np.load(f) as d:
                total += len(d["images"])
        return total

    @staticmethod
    def _load(chunks: Path, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        images, labels = [], []
        for f in sorted(chunks.glob("*.npz")):
            with np.load(f) as d:
                images.append(d["images"])
                if "labels" in d:
                    labels.append(d["labels"])
        imgs = np.concatenate(images)[:n]
        return imgs, (np.concatenate(labels)[:n] if labels else None)

    # -- the figures --
    def figures(self, rec: Recipe, n: int) -> dict | None:
        point = self.state.points.get(key_of(rec))
        return None if point is None else point["rungs"].get(str(n))

    def ref_figures(self, n: int) -> dict | None:
        return self.figures(self.reference, n)

    def meets(self, rec: Recipe, n: int) -> bool:
        fig, ref, top = self.figures(rec, n), self.ref_figures(n), self.ref_figures(self.full)
        if fig is None or ref is None or top is None:
            return False
        return self.target.meets(fig, ref, top, full=n == self.full)

    def cost(self, rec: Recipe) -> float:
        return statistics.median(self.state.points[key_of(rec)]["batch_ms"])

    def measured(self, n: int) -> list[Recipe]:
        return [recipes.from_json(p["recipe"], "tune state") for p in self.state.points.values()
                if str(n) in p["rungs"]]  # fmt: skip

    def _report(self, rec: Recipe, n: int, fig: dict) -> None:
        acc = f" acc {fig['accuracy']:.3f}" if "accuracy" in fig else ""
        best = self.best()
        best_text = (f"{best.describe()} ({self.cost(best):.1f} ms/image)" if best is not None
                     else "none yet")  # fmt: skip
        self.log(f"[{self.spent() / 60:5.1f}/{self.budget_s / 60:.0f} min] n={n:<5d} "
                 f"FID {fig['fid']:7.2f}{acc} {fig['ms_per_image']:7.1f} ms/image  "
                 f"{rec.describe()}  | best: {best_text}")  # fmt: skip

    def best(self) -> Recipe | None:
        """The cheapest setting measured with all samples that meets the target; among those
        within the timing noise (TIME_TIE) of the cheapest, the one with the lowest FID: wall
        times that close do not rank settings, quality does."""
        ok = [r for r in self.measured(self.full) if self.meets(r, self.full)]
        if not ok:
            return None
        cheapest = min(self.cost(r) for r in ok)
        tied = [r for r in ok if self.cost(r) <= cheapest * (1 + TIME_TIE)]
        return min(tied, key=lambda r: (self.figures(r, self.full)["fid"], self.cost(r)))

    # -- the search --
    def _try(self, rec: Recipe, n: int) -> bool:
        """Measure rec at n; False where the budget ran out."""
        if self.figures(rec, n) is not None:
            return True
        why = self._valid(rec)
        if why is not None:
            self.state.points.setdefault(
                key_of(rec), {"recipe": rec.to_json(), "rungs": {}, "batch_ms": [], "invalid": why}
            )
            return True
        fig = self.measure(rec, n)
        if fig is None:
            return False
        self._report(rec, n, fig)
        return True

    # -- the cost model: orders and prunes what is measured; choices use measured times --
    def unit_ms(self, dtype: str | None) -> tuple[float, float, float]:
        """(full UNet forward, shallow forward, classifier gradient) ms per image at the batch
        size, timed once per precision (median of 3, after a warm-up call)."""
        if dtype not in self._units:
            self._units[dtype] = _time_units(self.pipe(dtype), self.batch)
        return self._units[dtype]

    def predicted(self, rec: Recipe) -> float:
        key = key_of(rec)
        if key not in self._calls:
            self._calls[key] = self.pipe(rec.dtype).check(self.batch, self.batch, recipe=rec).calls
        calls = self._calls[key]
        full = calls.get("unet_full", calls["unet"])
        u, sh, c = self.unit_ms(rec.dtype)
        return full * u + calls.get("unet_shallow", 0) * sh + calls["classifier"] * c

    def _to_beat(self) -> float:
        best = self.best()
        return self.cost(best if best is not None else self.reference)

    def run(self) -> None:
        self.log(
            f"tune: target {self.target.describe()}; budget {self.budget_s / 60:.0f} min "
            f"({self.spent() / 60:.1f} spent); samples {self.rungs}; batch {self.batch}"
        )
        why = self._valid(self.reference)
        if why is not None:
            raise InputError(f"tune: the model's reference setting cannot run here: {why}")
        if not self._try(self.reference, self.full):
            return self.log("tune: the budget ran out measuring the reference recipe")
        queue = coarse_grid(self.scale)
        while queue:
            for rec in self._order(queue):
                if self.predicted(rec) >= self._to_beat():
                    self._skipped.add(key_of(rec))  # cannot beat the best so far: not worth
                    continue  # its samples (the best only gets cheaper)
                if not self._try(rec, self.rungs[0]):
                    return self.log("tune: budget spent")
                # halving: only a setting that meets the target with a quarter of the samples
                # (with a margin) and may beat the best so far gets all of them
                if (self.figures(rec, self.rungs[0]) is not None and self.meets(rec, self.rungs[0])
                        and self.cost(rec) < self._to_beat()):  # fmt: skip
                    if not self._try(rec, self.full):
                        return self.log("tune: budget spent")
            queue = self._refinements()
        self.log("tune: nothing left to measure near the front")

    def _order(self, queue: list[Recipe]) -> list[Recipe]:
        """Valid, unmeasured settings, the cheapest predicted first."""
        fresh = [r for r in queue if self.figures(r, self.rungs[0]) is None and self._valid_kept(r)]
        return sorted(fresh, key=self.predicted)

    def _valid_kept(self, rec: Recipe) -> bool:
        key = key_of(rec)
        if "invalid" in self.state.points.get(key, {}):
            return False
        if key in self._checked:
            return True
        why = self._valid(rec)
        self._checked.add(key)
        if why is not None:
            self.state.points[key] = {"recipe": rec.to_json(), "rungs": {}, "batch_ms": [],
                                      "invalid": why}  # fmt: skip
            return False
        return True

    def _refinements(self) -> list[Recipe]:
        """The next round: cheaper moves from the cheapest settings that meet the target, and
        better moves from the best-quality settings cheaper than those (at the highest sample
        count each was measured with), not measured yet."""
        low, full = self.rungs[0], self.full
        ok = sorted({key_of(r): r for n in (full, low) for r in self.measured(n)
                     if self.meets(r, n)}.values(), key=self.cost)  # fmt: skip
        limit = self._to_beat()
        cheap = [r for r in self.measured(low) if self.cost(r) < limit and not self.meets(r, low)]
        cheap.sort(key=lambda r: self.figures(r, low)["fid"])
        out: dict[str, Recipe] = {}
        for rec, which in [(r, 0) for r in ok[:2]] + [(r, 1) for r in cheap[:2]]:
            for nb in moves(rec, self.num_timesteps, self.low_precision)[which]:
                if key_of(nb) not in self.state.points and key_of(nb) not in self._skipped:
                    out.setdefault(key_of(nb), nb)
        return list(out.values())

    def result(self) -> dict[str, Any]:
        """tune's output: the chosen recipe (or None), the target and every measured point."""
        best = self.best()
        points = []
        front = _front([(key_of(r), self.cost(r), self.figures(r, self.full)["fid"])
                        for r in self.measured(self.full)])  # fmt: skip
        for key, p in self.state.points.items():
            if "invalid" in p:
                continue
            points.append({"recipe": p["recipe"], "ms_per_image": (statistics.median(
                p["batch_ms"]) if p["batch_ms"] else None), "figures": p["rungs"],
                "pareto": key in front})  # fmt: skip
        chosen = None
        if best is not None:
            fig = self.figures(best, self.full)
            chosen = replace(best, name="tuned", source=(
                f"fastsample tune: the fastest measured setting with {self.target.describe()}"),
                figures={**fig, "samples": self.full, "batch": self.batch,
                         "reference": self.ref_figures(self.full)}).to_json()  # fmt: skip
        return {"format": recipes.FORMAT, "recipe": chosen, "target": self.target.describe(),
                "samples": self.full, "batch": self.batch, "spent_s": round(self.spent(), 1),
                "points": points}  # fmt: skip


def _low_precisions(pipe) -> tuple[str, ...]:
    """The precisions below float32 worth trying on the pipeline's device: fp16 and bf16 on
    CUDA, bf16 on a CPU with bf16 instructions (oneDNN), none elsewhere or for an explicit
    precision."""
    import torch

    if pipe.model is None or pipe.model.dtype != torch.float32:
        return ()
    if pipe.device.type == "cuda":
        return ("fp16", "bf16")
    if pipe.device.type == "cpu" and torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported():  # fmt: skip
        return ("bf16",)
    return ()


def _time_units(pipe, batch: int) -> tuple[float, float, float]:
    import torch

    from . import featcache, netfns

    cfg = pipe.config
    size = cfg.image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen).to(pipe.device)
    t = torch.full((batch,), pipe.diffusion.steps // 2, device=pipe.device)
    y = torch.zeros(batch, dtype=torch.long, device=pipe.device) if pipe.needs_labels else None
    low = x if pipe.model.takes_low_res else None  # (upsamplers: the resized input's shape)
    y_model = y if cfg.num_classes else None
    model = netfns.model_fn(pipe.model, y_model, low)
    full, part = featcache.split_fns(pipe.model, y_model, low, featcache.DEFAULT_DEPTH)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            start = time.perf_counter()
            fn()
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3 / batch

    with torch.inference_mode():
        u = timed(lambda: model(x, t))
        feature = full(x, t)[1]
        sh = timed(lambda: part(x, t, feature))
    c = 0.0
    if pipe.classifier is not None:
        grad = netfns.guidance_fn(pipe.classifier, torch.zeros(batch, dtype=torch.long,
                                                               device=pipe.device))  # fmt: skip
        c = timed(lambda: grad(x, t))
    return u, sh, c


def _front(points: list[tuple[str, float, float]]) -> set[str]:
    """Keys of the Pareto front of (key, cost, fid): no other point is both cheaper and
    better."""
    front, best = set(), math.inf
    for key, _, fid in sorted(points, key=lambda p: (p[1], p[2])):
        if fid < best:
            front.add(key)
            best = fid
    return front
