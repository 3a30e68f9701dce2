"""Long runs: sharded, resumable generation into one directory, on one process or many.

    DIR/run.json              the settings that decide the images, the plan (samples, batch
                              size, shards), what the caller records beside them (the
                              network calls per image; not part of the run's id), and once
                              complete every shard's sha256 and the merged files' sha256
    DIR/shards/000012.npz     batch 12 (arr_0 uint8 NHWC images, arr_1 labels)
    DIR/shards/000012.json    its record: first sample, count, the npz's sha256, the run id
    DIR/samples.npz           every shard in order (the reference evaluator's format)
    DIR/grid.png              the first images

Every file is written to a temporary name, fsynced and renamed into place, so a run killed at any
moment loses at most the batches in flight. Rerunning the same command resumes: only the
missing shards (or damaged ones, whose bytes no longer match their recorded sha256) are
generated; a shard is one batch with the same per-sample seeds, so the merged file is
bit-identical to an uninterrupted run with the same batch size. A rerun with other settings is
refused unless overwrite is asked for.

Under torchrun (WORLD_SIZE > 1) the missing shards are dealt out to the ranks in turn (shard
order, so the k-th missing shard goes to rank k % world_size); rank 0 plans, waits for every
rank, and merges. A rank that dies leaves a resumable run.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, RunError
from .image_io import atomic_write, file_sha256, image_grid, write_npz

RUN_FILE = "run.json"
SHARD_DIR = "shards"
MERGED = ("samples.npz", "grid.png")
GRID_IMAGES = 64
FORMAT = 1

# One batch: (images uint8 NHWC, labels int64 or None) for samples first .. first + count - 1.
BatchFn = Callable[[int, int], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass(frozen=True)
class Shard:
    index: int
    first: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


def plan(num_samples: int, batch_size: int) -> list[Shard]:
    if num_samples < 1 or batch_size < 1:
        raise InputError(
            f"num_samples={num_samples}, batch_size={batch_size}: expected positive integers"
        )
    return [
        Shard(i, first, min(batch_size, num_samples - first))
        for i, first in enumerate(range(0, num_samples, batch_size))
    ]


def run_id(settings: dict) -> str:
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# -- files -------------------------------------------------------------------------------------


def _write_merged_npz(f, paths: Sequence[Path]) -> None:
    """write_npz of the shards' arrays concatenated, streamed one shard at a time."""
    with np.load(paths[0], allow_pickle=False) as data:
        names = sorted(data.files)
        heads = {name: data[name] for name in names}
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name in names:
            rows = 0
            for path in paths:
                with np.load(path, allow_pickle=False) as data:
                    rows += data[name].shape[0]
            head = heads[name]
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(head.dtype),
                          "fortran_order": False, "shape": (rows, *head.shape[1:])}  # fmt: skip
                np.lib.format.write_array_header_1_0(member, header)
                for path in paths:
                    with np.load(path, allow_pickle=False) as data:
                        member.write(np.ascontiguousarray(data[name]).tobytes())


def _read_npz(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def _durable_write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


# -- the run -----------------------------------------------------------------------------------


class _Group:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else one process."""

    def __init__(self, device_type: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self._dist = None
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            self._owned = not dist.is_initialized()
            if self._owned:
                backend = "nccl" if device_type == "cuda" else "gloo"
                # The last barrier waits for the slowest rank's last batch: allow hours.
                dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
            self._dist = dist

    def share(self, value):
        """Rank 0's value on every rank."""
        if self._dist is None:
            return value
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def close(self) -> None:
        if self._dist is not None and self._owned:
            self._dist.destroy_process_group()
        self._dist = None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class RunResult:
    paths: dict[str, Path]
    generated: int  # samples generated by this process now
    resumed: int  # samples found already done
    complete: bool  # this process wrote (or found) the merged files
    labels: np.ndarray | None = None
    rank: int = 0
    calls: dict[str, int] | None = None  # network calls per image, where the caller knows them


def run(
    out_dir: str | os.PathLike,
    settings: dict,
    num_samples: int,
    batch_size: int,
    generate: BatchFn,
    *,
    overwrite: bool = False,
    device_type: str = "cpu",
    log: Callable[[str], None] = print,
    on_start: Callable[[int], None] | None = None,
    on_shard: Callable[[Shard], None] | None = None,
    record: dict | None = None,
) -> RunResult:
    """Generate num_samples images into out_dir (see the module doc), resuming what is there.

    settings: everything that decides the images (JSON-able); generate(first, count) makes one
    batch; on_start(n) is told how many samples this process will generate; on_shard(shard)
    is called after each shard is durably written. record: more keys for run.json that do not
    decide the images (what the run costs, say): written with it, not part of the run's id."""
    out = Path(out_dir)
    shards = plan(num_samples, batch_size)
    meta = {
        "format": FORMAT,
        "settings": settings,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "shards": len(shards),
    }
    rid = run_id(meta)
    extra = dict(record or {})
    assert not set(extra) & {*meta, "run_id", "complete", "shard_list", "sha256"}, extra
    group = _Group(device_type)
    try:
        return _run(out, meta, rid, shards, group, generate, overwrite, log, on_start, on_shard,
                    extra)  # fmt: skip
    finally:
        group.close()


def _run(out, meta, rid, shards, group, generate, overwrite, log, on_start, on_shard, extra):
    """run() inside its process group: rank 0 plans, every rank generates its share, rank 0
    merges."""
    problem = None
    todo: list[int] = []
    if group.rank == 0:
        try:
            _prepare(out, meta, rid, overwrite, extra)
            todo, damaged = _missing(out, shards, rid)
            for shard in damaged:
                log(f"shard {shard.name}: its bytes do not match its sha256; generating it again")
        except (RunError, OSError) as e:
            problem = _describe(e, out)
    problem, todo = group.share((problem, todo))
    if problem is not None:
        raise RunError(problem)
    resumed = sum(s.count for s in shards) - sum(shards[i].count for i in todo)
    mine = [shards[i] for i in todo[group.rank :: group.world]]  # dealt out in turn
    if on_start is not None:
        on_start(sum(s.count for s in mine))
    generated = 0
    for shard in mine:
        images, labels = generate(shard.first, shard.count)
        if len(images) != shard.count:
            raise RunError(f"shard {shard.name}: got {len(images)} images, expected {shard.count}")
        _write_shard(out, shard, rid, images, labels)
        generated += shard.count
        if on_shard is not None:
            on_shard(shard)
    group.barrier()
    paths = {"npz": out / MERGED[0], "grid": out / MERGED[1], "run": out / RUN_FILE}
    result = RunResult(paths, generated, resumed, complete=False, rank=group.rank)
    if group.rank != 0:
        return result
    try:
        if not todo and _merged_intact(out, rid):
            result.labels = _merged_labels(out)  # a finished run, found as it was left
            result.complete = True
            return result
        result.labels = _merge(out, shards, rid, meta, extra)
    except OSError as e:
        raise RunError(_describe(e, out)) from None
    result.complete = True
    return result


def _describe(error: Exception, out: Path) -> str:
    if isinstance(error, RunError):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f"{out}: no space left on the device ({error.filename or out}); nothing partial "
            "was kept: free some space and rerun the same command to resume"
        )
    where = error.filename or out
    return f"{where}: cannot write there ({error.strerror or error})"


def _prepare(out: Path, meta: dict, rid: str, overwrite: bool, extra: dict) -> None:
    """Check out against this run's settings (or start it), clear stale temporaries."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a directory")
    record = out / RUN_FILE
    old = None
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            if not overwrite:
                raise RunError(
                    f"{record} cannot be read (damaged?); pass --overwrite to start the run "
                    "over, or choose another --out"
                ) from None
            old = {}
    elif any((out / name).exists() for name in MERGED):
        if not overwrite:
            raise RunError(
                f"{out} holds samples from another run (no {RUN_FILE}); pass --overwrite to "
                "replace them, or choose another --out"
            )
    if old is not None and run_id({k: old.get(k) for k in meta}) != rid:
        if not overwrite:
            raise RunError(
                f"{out} holds a run with other settings ({_differences(old, meta)}); rerun with "
                "its settings to resume it, pass --overwrite to replace it, or choose another "
                "--out"
            )
        old = None
    if old is None:
        # A new run: remove what this module writes (and only that), then record the plan.
        shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
        for name in (*MERGED, RUN_FILE):
            if (out / name).exists():
                (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**meta, "run_id": rid, **extra}, indent=2) + "\n"
        _durable_write(record, text.encode())
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    # Temporaries left by a process that was killed (only this module's own names).
    stale = [*(out / SHARD_DIR).glob(".*.tmp")]
    for name in (*MERGED, RUN_FILE):
        stale += out.glob(f".{name}.*.tmp")
    for path in stale:
        path.unlink(missing_ok=True)


def _differences(old: dict, new: dict) -> str:
    changes = []
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    for key in sorted(set(old_settings) | set(new["settings"])):
        a, b = old_settings.get(key), new["settings"].get(key)
        if a != b:
            changes.append(f"{key}: {_short(a)} -> {_short(b)}")
    for key in ("num_samples", "batch_size"):
        if old.get(key) != new[key]:
            changes.append(f"{key}: {old.get(key)} -> {new[key]}")
    return "; ".join(changes) or "unreadable run record"


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _shard_paths(out: Path, shard: Shard) -> tuple[Path, Path]:
    base = out / SHARD_DIR / shard.name
    return base.with_suffix(".npz"), base.with_suffix(".json")


def _valid(out: Path, shard: Shard, rid: str) -> bool | None:
    """True: complete and intact; False: there but damaged; None: not there (yet)."""
    data, record = _shard_paths(out, shard)
    if not record.is_file():
        return None
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("run_id") != rid or (meta.get("first"), meta.get("count")) != (
        shard.first,
        shard.count,
    ):
        return False
    try:
        return data.is_file() and file_sha256(data) == meta.get("sha256")
    except OSError:
        return False


def _missing(out: Path, shards: list[Shard], rid: str) -> tuple[list[int], list[Shard]]:
    todo, damaged = [], []
    for shard in shards:
        state = _valid(out, shard, rid)
        if state is not True:
            todo.append(shard.index)
            if state is False:
                damaged.append(shard)
    return todo, damaged


def _write_shard(out: Path, shard: Shard, rid: str, images, labels) -> None:
    buf = io.BytesIO()
    write_npz(buf, [images] + ([labels] if labels is not None else []))
    data = buf.getvalue()
    npz, record = _shard_paths(out, shard)
    try:
        _durable_write(npz, data)
        meta = {"run_id": rid, "index": shard.index, "first": shard.first, "count": shard.count,
                "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
        _durable_write(record, (json.dumps(meta) + "\n").encode())
    except OSError as e:
        raise RunError(_describe(e, out)) from None


def _merged_intact(out: Path, rid: str) -> bool:
    """The run record says complete and the merged files still have its hashes."""
    try:
        record = json.loads((out / RUN_FILE).read_text())
        hashes = record.get("sha256") or {}
        return (
            record.get("run_id") == rid
            and record.get("complete") is True
            and all(
                (out / name).is_file() and file_sha256(out / name) == hashes.get(name)
                for name in MERGED
            )
        )
    except (OSError, ValueError):
        return False


def _merged_labels(out: Path) -> np.ndarray | None:
    with np.load(out / MERGED[0], allow_pickle=False) as data:
        return data["arr_1"] if "arr_1" in data.files else None


def _merge(out: Path, shards: list[Shard], rid: str, meta: dict, extra: dict) -> np.ndarray | None:
    """Every shard, verified, into samples.npz and grid.png; the record lists them."""
    missing = [s.name for s in shards if _valid(out, s, rid) is not True]
    if missing:
        raise RunError(
            f"{out}: shards {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are "
            "missing or damaged (a process stopped early?); rerun the same command to resume"
        )
    paths = [_shard_paths(out, s)[0] for s in shards]
    atomic_write(out / MERGED[0], lambda f: _write_merged_npz(f, paths))
    first, labels = [], []
    for path in paths:
        arrays = _read_npz(path)
        if sum(len(a) for a in first) < GRID_IMAGES:
            first.append(arrays[0][: GRID_IMAGES - sum(len(a) for a in first)])
        if len(arrays) > 1:
            labels.append(arrays[1])
    grid = image_grid(np.concatenate(first))
    atomic_write(out / MERGED[1], lambda f: grid.save(f, format="PNG"))
    records = [json.loads(_shard_paths(out, s)[1].read_text()) for s in shards]
    complete = {
        **meta,
        "run_id": rid,
        "complete": True,
        "shard_list": [{k: r[k] for k in ("index", "first", "count", "sha256")} for r in records],
        "sha256": {name: file_sha256(out / name) for name in MERGED},
        **extra,
    }
    _durable_write(out / RUN_FILE, (json.dumps(complete, indent=2) + "\n").encode())
    return np.concatenate(labels) if labels else None
