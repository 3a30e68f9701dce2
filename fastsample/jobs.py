"""What `fastsample sample` and `fastsample export` do, as plain functions over a request.

The CLI parses its options into a `SampleRequest` or an `ExportRequest`, calls `sample()` or
`export()`, and prints the result. Everything between (defaults, device and precision, the
export-directory case, low-resolution inputs, torchrun's ranks, progress, the run directory) is
here, so the same job can be run from Python with the same checks and the same files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import __version__, runs
from .catalog import DEMO_UNET, PRESETS
from .errors import InputError
from .image_io import file_sha256

if TYPE_CHECKING:
    import torch

    from .ops import Kernels
    from .request import Request
    from .sampler import SamplerName
    from .sampling import Runtime
    from .schedule import TimeSchedule

DType = Literal["auto", "fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class SampleRequest:
    """One `fastsample sample` run; the fields are its options (see `fastsample sample -h`).

    model None: the embedded demo model, guided by its classifier. runtime None: eager, or an
    export directory's own runtime. dtype "auto": the README's precision on CUDA, fp32 on CPU.
    """

    model: str | None = None
    classifier: str | None = None
    scale: float | None = None
    steps: str | None = None
    sampler: SamplerName | None = None
    eta: float = 0.0
    num_samples: int = 64
    batch_size: int = 16
    classes: Sequence[int] | None = None
    seed: int = 0
    device: str | None = None
    dtype: DType = "auto"
    low_res: str | None = None  # .npz: arr_0 NHWC uint8 images, optional arr_1 labels
    runtime: Runtime | None = None
    kernels: Kernels = "auto"
    out: str | os.PathLike = "samples"
    overwrite: bool = False
    schedule: TimeSchedule | None = None  # None: "respace", or an export directory's own
    # The guidance budget and feature caching: see Pipeline.generate.
    guidance_interval: tuple[float, float] | None = None  # original timesteps (lo, hi)
    guidance_every: int | None = None  # None: the recipe's, else 1
    stable_guidance: bool | None = None  # None: the recipe's, else True
    cache_interval: int | None = None  # None: the recipe's, else 1
    cache_depth: int | None = None
    # fast | balanced | reference | a JSON file (`fastsample.recipes`); the options above that
    # are given win over its fields. None: the options alone (and the preset's default recipe
    # where no sampling option is given).
    recipe: str | None = None


def sample(
    request: SampleRequest,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> runs.RunResult:
    """Generate request.num_samples images into request.out (see runs.py for the layout),
    resuming a run with the same settings there. Bad input is refused before out is touched.

    Under torchrun every rank calls this; the result's `complete` is True on rank 0 only."""
    import torch

    from .pipeline import Pipeline

    r = request
    for name, value in (("--num-samples", r.num_samples), ("--batch-size", r.batch_size)):
        if value < 1:
            raise InputError(f"{name} {value}: expected a positive integer")
    if r.seed < 0:
        raise InputError(f"--seed {r.seed}: expected a non-negative integer")
    if r.dtype != "auto" and r.dtype not in TORCH_DTYPES:
        raise InputError(f"--dtype {r.dtype!r}: expected auto, {', '.join(TORCH_DTYPES)}")
    model, classifier = r.model, r.classifier
    if model is None:
        model, classifier = DEMO_UNET, classifier or PRESETS[DEMO_UNET].classifier
    device = _device(r.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", runs.local_rank())  # one GPU per torchrun process
        torch.cuda.set_device(device)
    if r.dtype == "auto":
        dtype = None if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, TORCH_DTYPES[r.dtype])
    out = Path(r.out)
    check_writable(out)
    labels = list(r.classes) if r.classes is not None else None
    low, labels = _load_low_res(r.low_res, labels)
    if is_export_dir(model):
        if classifier is not None:
            raise InputError("--classifier: an export directory carries its own gradient graph")
        if r.dtype != "auto":
            raise InputError("--dtype: an export's precision is fixed when it is exported")
        if r.kernels != "auto":
            raise InputError("--kernels: an export directory runs its own graphs")
        # --runtime eager (the default elsewhere) means the export's own runtime here.
        runtime = None if r.runtime in (None, "eager") else r.runtime
        pipe = Pipeline.from_export(model, runtime=runtime, device=str(device))  # (this rank's)
        if r.scale is not None:
            pipe.guidance_scale = r.scale
    else:
        pipe = Pipeline.from_pretrained(
            model,
            classifier,
            device=device,
            dtype=dtype,
            guidance_scale=r.scale,
            runtime=r.runtime or "eager",
            kernels=r.kernels,
        )
    given = (r.scale, r.sampler, r.steps, r.schedule, r.guidance_interval, r.guidance_every,
             r.stable_guidance, r.cache_interval, r.cache_depth)  # fmt: skip
    if pipe.model is not None and pipe.runtime == "eager":
        from . import recipes

        name = r.recipe
        if name is None and all(v is None for v in given):
            name = recipes.default_for(pipe.preset)  # (the demo's: fast)
        rec = recipes.load(name, pipe.preset) if name is not None else None
        if rec is not None and rec.dtype is not None and r.dtype == "auto" and (
            r.recipe is not None or recipes.supported(rec.dtype, device)
        ):  # the recipe's precision (a default one only where the device runs it natively)
            want = getattr(torch, TORCH_DTYPES[rec.dtype])
            for net in (pipe.model, pipe.classifier):
                if net is not None:
                    net.set_precision(want)
    # Whatever generate() would refuse, refused now, before out is touched.
    budget = {"guidance_interval": r.guidance_interval, "guidance_every": r.guidance_every,
              "stable_guidance": r.stable_guidance, "cache_interval": r.cache_interval,
              "cache_depth": r.cache_depth}  # fmt: skip
    resolved = pipe.check(r.num_samples, r.batch_size, labels, r.scale, r.sampler, r.steps,
                          r.seed, low, r.schedule, recipe=r.recipe, **budget)  # fmt: skip
    settings = {
        "model": identity(model),
        "classifier": identity(classifier) if classifier is not None else None,
        "scale": resolved.scale,
        "steps": r.steps,
        "sampler": r.sampler,
        "eta": r.eta,
        "classes": labels,
        "seed": r.seed,
        "dtype": str(pipe.model.dtype if pipe.model is not None else "export"),
        "device": device.type,
        # (the record's key for the runtime since runs began: kept, so older runs resume)
        "backend": pipe.runtime,
        "low_res": identity(r.low_res) if r.low_res is not None else None,
        "fastsample": __version__,
    }
    if r.kernels != "auto":
        settings["kernels"] = r.kernels  # (absent for auto, as in runs made before the option)
    if r.schedule not in (None, "respace"):
        settings["schedule"] = r.schedule  # (absent for respace, as in runs made before it)
    settings.update(budget_settings(resolved))
    if resolved.recipe is not None:  # (absent without one, as in runs made before recipes)
        settings["recipe"] = {"name": resolved.recipe.name, **resolved.recipe.knobs()}

    bar = None
    diffusion = resolved.diffusion  # as generate()'s

    def start(samples: int) -> None:
        nonlocal bar
        if samples and progress and os.environ.get("RANK", "0") == "0":  # one bar per job
            from tqdm.auto import tqdm

            bar = tqdm(total=samples * diffusion.num_steps, desc="sampling", unit="step")

    def generate(first: int, count: int):
        result = pipe.generate(
            count,
            batch_size=count,
            classes=labels,
            guidance_scale=r.scale,
            sampler=r.sampler,
            steps=r.steps,
            schedule=r.schedule,
            eta=r.eta,
            recipe=r.recipe,
            seed=r.seed,
            progress=bar or False,
            low_res=None if low is None else low[first : first + count],
            first_index=first,
            **budget,
        )
        return result.images, result.labels

    try:
        done = runs.run(
            out,
            settings,
            r.num_samples,
            r.batch_size,
            generate,
            overwrite=r.overwrite,
            device_type=device.type,
            log=log,
            on_start=start,
            record={"calls_per_image": resolved.calls},
        )
        done.calls = resolved.calls
        return done
    finally:
        if bar is not None:
            bar.close()


@dataclass(frozen=True)
class ExportRequest:
    """One `fastsample export`; the fields are its options (see `fastsample export -h`).

    model None: the demo model with its classifier; classifier "none": no gradient graph.
    recipe: fast | balanced | reference | a file: the run the export is made for (its steps,
    time schedule, scale and precision, unless given here; its sampler and guidance budget are
    recorded in schedule.json, and the export runs them by default).
    """

    out: str | os.PathLike
    target: Literal["onnx", "tensorrt", "aoti"] = "onnx"
    model: str | None = None
    classifier: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] | None = None  # None: the recipe's, else fp32
    max_batch: int = 64
    steps: str | None = None  # None: the recipe's, else "ddim25" ("25" under a time schedule)
    scale: float | None = None
    device: str | None = None  # aoti: where the packages will run
    overwrite: bool = False
    schedule: TimeSchedule | None = None  # None: the recipe's, else "respace"
    recipe: str | None = None


def export(request: ExportRequest, *, log: Callable[[str], None] = print) -> Path:
    """Export the UNet and the guidance gradient as graphs into request.out (returned)."""
    import torch

    from .export import export as export_graphs
    from .pipeline import Pipeline

    r = request
    model, classifier = r.model, r.classifier
    if model is None:
        model = DEMO_UNET
        classifier = classifier or PRESETS[DEMO_UNET].classifier
    if classifier is not None and classifier.lower() == "none":
        classifier = None
    device = _device(r.device)
    if r.target == "tensorrt":
        from .export.tensorrt import require_tensorrt

        require_tensorrt()  # refuse before loading anything
    # Traced from the fp32 reference networks on the CPU; the graphs' dtype is the export's.
    pipe = Pipeline.from_pretrained(model, classifier, device="cpu", dtype=torch.float32)
    diffusion, settings = _export_settings(r, pipe)
    return export_graphs(
        pipe.model,
        diffusion,
        r.out,
        classifier=pipe.classifier,
        target=r.target,
        dtype=settings["dtype"],
        max_batch=r.max_batch,
        guidance_scale=settings["scale"],
        sampling=settings["sampling"],
        model_source=source_name(model),
        classifier_source=source_name(classifier) if pipe.classifier is not None else None,
        device=str(device) if r.target == "aoti" else "cpu",
        overwrite=r.overwrite,
        log=log,
    )


def _export_settings(r: ExportRequest, pipe) -> tuple:
    """The export's respaced diffusion, and its dtype, scale and sampling (see ExportRequest):
    the options given, then the recipe's fields, then the defaults."""
    from . import recipes
    from .featcache import split_depth
    from .request import default_sampler

    if r.recipe is None:
        schedule = r.schedule or "respace"
        steps = r.steps if r.steps is not None else "ddim25" if schedule == "respace" else "25"
        diffusion = pipe.diffusion.respaced(steps, time_schedule=schedule)
        return diffusion, {"dtype": r.dtype or "fp32", "scale": r.scale, "sampling": None}
    rec = recipes.load(r.recipe, pipe.preset)
    # (the reference recipe's None fields: the pipeline's own respacing and sampler)
    steps = r.steps if r.steps is not None else rec.steps
    schedule = r.schedule or rec.schedule
    diffusion = pipe.diffusion.respaced(steps, time_schedule=schedule)
    sampling = {
        "recipe": rec.name,
        "sampler": rec.sampler or default_sampler(pipe.preset, steps, diffusion),
        "guidance_every": rec.guidance_every,
        "guidance_interval": rec.guidance_interval,
        "stable_guidance": rec.stable_guidance,
        "cache_interval": rec.cache_interval,
        # (the split graphs at the recipe's depth, where it caches)
        "cache_depth": split_depth(pipe.model, rec.cache_interval, rec.cache_depth),
    }  # fmt: skip
    scale = r.scale if r.scale is not None else rec.guidance_scale
    return diffusion, {"dtype": r.dtype or rec.dtype or "fp32", "scale": scale,
                       "sampling": sampling}  # fmt: skip


# -- helpers -----------------------------------------------------------------------------------


def budget_settings(request: Request) -> dict:
    """The guidance-budget and feature-cache settings for the run record, only where they
    change the images, so that runs made before these options keep their ids: an interval, a
    reuse step k > 1, a cache interval n > 1 (with its depth); stable guidance (the default)
    only where it leaves out steps the reference guides (older runs guided them)."""
    settings = {}
    if request.guided and request.guidance_interval is not None:
        settings["guidance_interval"] = list(request.guidance_interval)
    if request.guided and request.guidance_every != 1:
        settings["guidance_every"] = request.guidance_every
    if request.skipped:
        settings["stable_guidance"] = True
    if request.cache_interval != 1:
        from .featcache import DEFAULT_DEPTH

        settings["cache_interval"] = request.cache_interval
        settings["cache_depth"] = request.cache_depth or DEFAULT_DEPTH
    return settings


def _device(name: str | None) -> torch.device:
    """--device, default cuda where present; a CUDA device asked for where there is none is an
    error, not a fallback."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here")
    return device


def is_export_dir(spec: str | os.PathLike) -> bool:
    path = Path(spec)
    return path.is_dir() and (path / "manifest.json").is_file()


def _load_low_res(path: str | None, labels: list[int] | None):
    """The upsampler's inputs (arr_0), and its labels (arr_1) where no classes were given."""
    import numpy as np

    if path is None:
        return None, labels
    try:
        with np.load(path, allow_pickle=False) as data:
            low = data["arr_0"]
            if labels is None and "arr_1" in data:
                labels = data["arr_1"].tolist()
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"--low-res {path}: not an .npz with arr_0 images ({e})") from None
    return low, labels


def identity(spec: str | os.PathLike) -> dict:
    """What a model argument is, for the run record: a file's sha256 (an export directory's
    manifest), else the preset name."""
    path = Path(str(spec))
    if is_export_dir(path):
        return {"export": file_sha256(path / "manifest.json")}
    if path.is_file():
        return {"sha256": file_sha256(path)}
    preset = PRESETS.get(str(spec))
    if preset is not None and preset.weights:
        from .demo import WEIGHTS_DIR

        return {"preset": str(spec), "sha256": file_sha256(WEIGHTS_DIR / preset.weights)}
    return {"preset": str(spec), "weights": "random"}


def check_writable(out: Path) -> None:
    """Fail before any model is loaded where out cannot take files (creating nothing)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def source_name(spec: str) -> str:
    """How an export's manifest names a network: a preset by name, a file by absolute path."""
    if spec in PRESETS and not os.path.exists(spec):
        return spec
    return os.path.abspath(spec)
