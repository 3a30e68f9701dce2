"""Long runs: shards written atomically, resumed after SIGKILL bit for bit, spread over torchrun
processes, damaged shards regenerated, other settings refused (fastsample/runs.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastsample import runs

# Small and quick, with every part of a real run: guided ancestral sampling of the demo model,
# 6 shards of 2 images.
ARGS = ["--num-samples", "12", "--batch-size", "2", "--steps", "4", "--quiet", "--device", "cpu"]
# One thread everywhere: torchrun gives each worker one thread, and oneDNN's sums depend on the
# thread count, so the single-process runs use one too.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fastsample", "sample", *ARGS, "--out", str(out),
    ]  # fmt: skip


def _cli(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastsample", "sample", *ARGS, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    start = time.perf_counter()
    proc = _cli(out)
    seconds = time.perf_counter() - start
    assert "wrote 12 images" in proc.stdout
    return out, seconds


def _files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in runs.MERGED}


def test_run_layout_and_record(uninterrupted):
    out, _ = uninterrupted
    record = json.loads((out / runs.RUN_FILE).read_text())
    assert record["complete"] and record["num_samples"] == 12 and record["batch_size"] == 2
    assert [s["first"] for s in record["shard_list"]] == [0, 2, 4, 6, 8, 10]

    def digest(path: Path) -> str:  # hashlib directly, not the code under test
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for shard in record["shard_list"]:
        assert digest(out / runs.SHARD_DIR / f"{shard['index']:06d}.npz") == shard["sha256"]
    assert record["sha256"]["samples.npz"] == digest(out / "samples.npz")
    assert record["settings"]["seed"] == 0 and record["settings"]["steps"] == "4"
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (12, 32, 32, 1) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].shape == (12,)
    assert not list(out.rglob("*.tmp"))


def test_rerun_of_a_complete_run_keeps_it(uninterrupted, tmp_path):
    out, _ = uninterrupted
    before = _files(out)
    stamps = {name: (out / name).stat().st_mtime_ns for name in runs.MERGED}
    proc = _cli(out)
    assert "holds this run complete: 12 images" in proc.stdout
    assert _files(out) == before
    # found intact, not rewritten
    assert stamps == {name: (out / name).stat().st_mtime_ns for name in runs.MERGED}


def test_sigkill_at_random_moments_then_resume_gives_the_same_bytes(uninterrupted, tmp_path):
    """Five runs killed with SIGKILL at random moments: during start-up, or a random few
    milliseconds after a random number of shards were recorded; each resumed by the same
    command gives the uninterrupted run's bytes."""
    whole, seconds = uninterrupted
    expected = _files(whole)
    rng = random.Random(7)
    killed_midway = 0
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        cmd = [sys.executable, "-m", "fastsample", "sample", *ARGS, "--out", str(out)]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = rng.randint(0, 5)  # shards recorded before the kill (0: during start-up)
        if target == 0:
            time.sleep(rng.uniform(0.1, 0.5) * seconds)
        else:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if len(list((out / runs.SHARD_DIR).glob("*.json"))) >= target:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shards = sorted((out / runs.SHARD_DIR).glob("*.json")) if out.exists() else []
        killed_midway += 0 < len(shards) < 6
        _cli(out)  # the same command resumes
        assert _files(out) == expected, trial
    assert killed_midway >= 1  # (some kills did land while shards were being written)


def test_damaged_shard_is_regenerated(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "run"
    _cli(out)
    shard = out / runs.SHARD_DIR / "000003.npz"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "samples.npz").unlink()
    proc = _cli(out)
    assert "shard 000003: its bytes do not match its sha256; generating it again" in proc.stderr
    assert "(10 were already there)" in proc.stdout
    assert _files(out) == _files(whole)


def test_other_settings_are_refused_unless_overwrite(uninterrupted, tmp_path):
    out = tmp_path / "run"
    _cli(out)
    before = _files(out)
    proc = _cli(out, "--seed", "1", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "seed: 0 -> 1" in lines[0] and "--overwrite" in lines[0]
    assert _files(out) == before
    proc = _cli(out, "--seed", "1", "--overwrite")
    assert _files(out) != before


def test_torchrun_two_gloo_processes_equal_one(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "dist"
    proc = subprocess.run(_torchrun(out), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote 12 images") == 1  # rank 0 reports
    assert _files(out) == _files(whole)
    record = json.loads((out / runs.RUN_FILE).read_text())
    assert record["complete"] and len(record["shard_list"]) == 6


def test_full_disk_during_a_shard_write_loses_nothing(uninterrupted, tmp_path, monkeypatch):
    """ENOSPC on the third shard: one line, exit 2, the two shards before it intact, no
    temporary file left; the same command then resumes to the uninterrupted result."""
    import errno

    from click.testing import CliRunner

    from fastsample.cli import main

    whole, _ = uninterrupted
    out = tmp_path / "run"
    real = runs._durable_write
    calls = {"n": 0}

    def full(path, data):
        calls["n"] += 1
        if path.suffix == ".npz" and path.parent.name == runs.SHARD_DIR and calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(runs, "_durable_write", full)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["sample", *ARGS, "--out", str(out)])
        assert result.exit_code == 2, result.output
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and "no space left" in err[0] and "rerun the same command" in err[0]
        assert sorted(p.name for p in (out / runs.SHARD_DIR).iterdir()) == [
            "000000.json", "000000.npz", "000001.json", "000001.npz",
        ]  # fmt: skip
        assert not (out / "samples.npz").exists()
        monkeypatch.setattr(runs, "_durable_write", real)
        result = CliRunner().invoke(main, ["sample", *ARGS, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "(4 were already there)" in result.stdout
    finally:
        torch.set_num_threads(threads)
    assert _files(out) == _files(whole)


def test_write_npz_is_deterministic_and_readable(tmp_path):
    arrays = [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([3, 1])]
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    with open(first, "wb") as f:
        runs.write_npz(f, arrays)
    time.sleep(1.1)  # zip timestamps have 2 s resolution; equal bytes must not rely on timing
    with open(second, "wb") as f:
        runs.write_npz(f, arrays)
    assert first.read_bytes() == second.read_bytes()
    with np.load(first) as data:
        assert np.array_equal(data["arr_0"], arrays[0]) and np.array_equal(data["arr_1"], arrays[1])
    merged = tmp_path / "m.npz"
    with open(merged, "wb") as f:
        runs._write_merged_npz(f, [first, second])
    with np.load(merged) as data:
        assert np.array_equal(data["arr_0"], np.concatenate([arrays[0], arrays[0]]))
        assert np.array_equal(data["arr_1"], np.array([3, 1, 3, 1]))


def test_torchrun_killed_midway_resumes_in_one_process(uninterrupted, tmp_path):
    """SIGKILL to the whole torchrun job while its ranks write shards; the plain command then
    finishes the run with the uninterrupted bytes."""
    whole, seconds = uninterrupted
    out = tmp_path / "dist"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(_torchrun(out), env=ENV, start_new_session=True, **quiet)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / runs.SHARD_DIR).glob("*.json"))) >= 2 if out.exists() else False:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "samples.npz").exists()
    _cli(out)
    assert _files(out) == _files(whole)


def _fake(first: int, count: int):
    """A batch whose pixels are a function of the sample index (no model needed)."""
    index = np.arange(first, first + count)
    images = np.broadcast_to((index % 251).astype(np.uint8)[:, None, None, None], (count, 4, 4, 3))
    return images.copy(), index.astype(np.int64)


def test_damaged_record_and_stale_temporaries(tmp_path):
    out = tmp_path / "run"
    runs.run(out, {"k": 1}, 5, 2, _fake, log=lambda line: None)
    expected = _files(out)
    (out / runs.SHARD_DIR / ".000001.npz.abc.tmp").write_bytes(b"partial")
    (out / ".samples.npz.xyz.tmp").write_bytes(b"partial")
    (out / runs.RUN_FILE).write_text("{ not json")
    with pytest.raises(runs.RunError, match="cannot be read .*--overwrite"):
        runs.run(out, {"k": 1}, 5, 2, _fake, log=lambda line: None)
    done = runs.run(out, {"k": 1}, 5, 2, _fake, overwrite=True, log=lambda line: None)
    assert done.complete and done.generated == 5 and done.resumed == 0
    assert _files(out) == expected
    assert not list(out.rglob("*.tmp"))
    with np.load(out / "samples.npz") as data:
        assert data["arr_1"].tolist() == [0, 1, 2, 3, 4]


def test_sample_job_from_python_records_the_settings_that_decide_the_images(tmp_path):
    import dataclasses

    from fastsample import jobs

    request = jobs.SampleRequest(num_samples=3, batch_size=2, steps="2", device="cpu",
                                 out=tmp_path / "a", kernels="torch")  # fmt: skip
    done = jobs.sample(request, progress=False, log=lambda line: None)
    assert done.complete and done.generated == 3 and done.resumed == 0
    settings = json.loads((tmp_path / "a" / runs.RUN_FILE).read_text())["settings"]
    assert settings["kernels"] == "torch" and settings["backend"] == "eager"
    assert settings["model"] == jobs.identity("demo-mnist") and settings["seed"] == 0
    # "auto" leaves the record as runs made before the option wrote it, so they resume
    auto = dataclasses.replace(request, out=tmp_path / "b", kernels="auto")
    jobs.sample(auto, progress=False, log=lambda line: None)
    assert "kernels" not in json.loads((tmp_path / "b" / runs.RUN_FILE).read_text())["settings"]
