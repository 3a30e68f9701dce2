"""Peak memory and throughput of `fastsample eval` on ImageNet-sized sample files (CPU).

Writes an uncompressed samples .npz (random 256x256 RGB, streamed to disk, never whole in
memory here) and a compressed reference .npz, and a random-weight FID Inception (same keys and
shapes as the published file: the memory and speed figures do not depend on the weights), then
runs `python -m fastsample eval` on it as a child process at two sample counts. Peak RSS is the
child's own (its VmHWM at exit); images/s counts samples plus reference images over the child's
whole wall time (start-up, featurizing and the metrics). The baseline is the samples file
itself: holding the images whole would need its size in memory (the float64 copy the eval made
before streaming: 8x that). Usage:

    python -m bench.eval_stream [--samples 1000,10000] [--ref-count 1000] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from .common import check_positive, commit, parse_counts, report

CHUNK = 250


def write_stored_npz(path: Path, count: int, size: int, seed: int) -> None:
    """An uncompressed npz with arr_0 uint8 (count, size, size, 3), written chunk by chunk."""
    rng = np.random.default_rng(seed)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (count, size, size, 3),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for start in range(0, count, CHUNK):
                n = min(CHUNK, count - start)
                f.write(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8).tobytes())


def random_inception(path: Path, seed: int) -> None:
    """The FID Inception's state_dict with variance-preserving random weights."""
    from fastsample.inception import FIDInception

    torch.manual_seed(seed)
    net = FIDInception()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    torch.save(net.state_dict(), path)


# The child's own peak: VmHWM of its address space, written at exit. (getrusage's ru_maxrss
# would also count the parent's pages copied before exec: a large parent, such as a test runner,
# would read as the child's peak.)
_CHILD = """import atexit, re, sys
def _hwm(path=sys.argv.pop(1)):
    kib = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
    open(path, "w").write(kib)
atexit.register(_hwm)
from fastsample.cli import main
main(prog_name="fastsample")
"""


def run_eval(samples: Path, ref: Path, weights: Path, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    hwm = out.with_suffix(".hwm")
    cmd = [sys.executable, "-c", _CHILD, str(hwm), "eval", str(samples), "--ref", str(ref),
           "--extractor", "inception", "--inception-weights", str(weights), "--device", "cpu",
           "--json", str(out), "--no-progress"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    output = proc.stdout.decode()
    if proc.returncode != 0:
        raise SystemExit(f"eval failed ({proc.returncode}):\n{output}")
    return {"wall_s": wall, "peak_rss_mib": int(hwm.read_text()) / 1024, "figures": json.loads(
        out.read_text()), "output": output}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="1000,10000", help="sample counts, comma-separated")
    p.add_argument("--ref-count", type=int, default=1000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="where the files go (default: a temporary folder)")
    p.add_argument("--json", help="write {header, rows} here")
    p.add_argument("--markdown", help="append the table to this markdown file")
    args = p.parse_args(argv)
    counts = parse_counts(p, "--samples", args.samples)
    check_positive(p, args, ["ref_count", "size", "threads"])

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        weights = tmp / "inception_random.pth"
        random_inception(weights, seed=0)
        ref = tmp / "ref.npz"
        rng = np.random.default_rng(1)
        np.savez_compressed(ref, arr_0=rng.integers(
            0, 256, (args.ref_count, args.size, args.size, 3), dtype=np.uint8))  # fmt: skip
        rows = []
        for count in counts:
            samples = tmp / f"samples_{count}.npz"
            write_stored_npz(samples, count, args.size, seed=2 + count)
            result = run_eval(samples, ref, weights, tmp / f"out_{count}.json", args.threads)
            file_mib = samples.stat().st_size / 2**20
            figures = result["figures"]
            rows.append({
                "samples": count, "ref": args.ref_count, "size": args.size,
                "samples_file_mib": round(file_mib, 1),
                "peak_rss_mib": round(result["peak_rss_mib"], 1),
                "rss_over_file": round(result["peak_rss_mib"] / file_mib, 3),
                "wall_s": round(result["wall_s"], 1),
                "images_per_s": round((count + args.ref_count) / result["wall_s"], 2),
                "fid": figures.get("fid"),
            })  # fmt: skip
            samples.unlink()
    header = {"commit": commit(), "torch": torch.__version__, "cpu": platform.processor()
              or platform.machine(), "threads": args.threads, "device": "cpu"}  # fmt: skip
    lines = [
        f"commit {header['commit']}, torch {header['torch']}, {args.threads} threads, CPU",
        "| samples | ref | size | samples file (MiB) | peak RSS (MiB) | RSS / file | wall (s) | "
        "images/s | FID (random weights) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['samples']} | {r['ref']} | {r['size']} | {r['samples_file_mib']} | "
            f"{r['peak_rss_mib']} | {r['rss_over_file']} | {r['wall_s']} | {r['images_per_s']} | "
            f"{r['fid']} |"
        )
    report("eval_stream", lines, header, rows, args.json, args.markdown)


if __name__ == "__main__":
    main()
