"""Before a GPU run, here: `--prepare` records the commit in the carried `.gpu_data/`, and
`--rehearse` runs the device run's set-up without a GPU (bench/gpu_check.py says what and why).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.gpu_check import DATA, GOLDEN, MAX_OUT_FILES, OUT_FILES, ROOT, _git_commit

# The packages of the GPU image that fastsample's stages use (the rehearsal's venv holds these).
GPU_IMAGE_PACKAGES = (
    "torch", "triton", "numpy", "onnx", "onnxscript", "onnxruntime", "safetensors", "click",
    "tqdm", "pillow", "scipy", "pytest", "pytest-benchmark", "pytest-xdist", "hypothesis",
    "setuptools", "wheel",
)  # fmt: skip


def prepare(tree: Path = ROOT, source: Path = ROOT) -> int:
    """Record source's commit in tree/.gpu_data/commit.txt, for `carry` (the device copy has no
    git history; the golden data travels with the tree, in tests/data)."""
    if not (tree / GOLDEN.relative_to(ROOT) / "config.json").is_file():
        print(f"gpu_check --prepare: {GOLDEN.relative_to(ROOT)} is missing from {tree}",
              file=sys.stderr)  # fmt: skip
        return 2
    data = tree / DATA
    data.mkdir(exist_ok=True)
    commit = _git_commit(source) or "unknown"
    (data / "commit.txt").write_text(commit + "\n")
    print(
        f"prepared {data} (commit {commit}); now:\n"
        f'  run(command="bash bench/gpu_check.sh", carry=["{DATA}"], timeout_s=590)'
    )
    return 0


def _tree_files(root: Path) -> list[str]:
    """What the device tool sends: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout  # fmt: skip
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def _venv_requirements() -> list[str]:
    """The GPU image's packages, at this interpreter's versions where it has them (so pip finds
    them in its cache), torch pinned by constraints.txt."""
    from importlib import metadata

    reqs = []
    for name in GPU_IMAGE_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def rehearse(keep: bool) -> int:
    """The device run's set-up on this machine, in a bare copy and a fresh venv."""
    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_rehearsal-"))
    tree = scratch / "device" / "repo"  # no ../shared beside it
    problems = []
    try:
        for rel in _tree_files(ROOT):
            dest = tree / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest)
        if prepare(tree, ROOT) != 0:
            return 2
        venv = scratch / "venv"
        count = len(GPU_IMAGE_PACKAGES)
        print(f"rehearsal: fresh venv at {venv} with {count} packages", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               "-c", str(ROOT / "constraints.txt"), *_venv_requirements()]  # fmt: skip
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-3000:] + done.stderr[-3000:])
            return 2
        print(f"rehearsal: venv ready in {time.monotonic() - t0:.0f} s", flush=True)
        leaks = ("FASTSAMPLE_", "PYTHON", "VIRTUAL_ENV", "TRITON_")  # nothing of ours travels
        env = {k: v for k, v in os.environ.items() if not k.startswith(leaks)}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        out = scratch / "out"
        env["OUT"] = str(out)
        # First the fallback install (a symlinked tree, no pip) on a few stages, then the real
        # sequence; each in a venv where fastsample is not installed yet.
        fallback = subprocess.run(
            ["bash", "bench/gpu_check.sh", "--dry-run", "--stages", "kernel_checks,engine_gpu"],
            cwd=tree, env=dict(env, GPU_CHECK_INSTALL="tree", OUT=str(scratch / "out_tree")),
            capture_output=True, text=True,
        )  # fmt: skip
        if fallback.returncode != 0 or "symlinked tree" not in fallback.stdout:
            print(fallback.stdout[-3000:] + fallback.stderr[-2000:])
            problems.append("the fallback install (symlinked tree) failed its dry run")
        else:
            print("rehearsal: the fallback install (symlinked tree, no pip) passed its dry run")
        run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=tree, env=env)
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        print(f"rehearsal: $OUT holds {len(files)} files: {', '.join(files)}")
        if run.returncode != 0:
            problems.append(f"the dry run exited {run.returncode}")
        if len(files) > MAX_OUT_FILES:
            problems.append(f"{len(files)} files in $OUT; the device tool returns {MAX_OUT_FILES}")
        if sorted(files) != sorted(OUT_FILES):
            problems.append(f"$OUT holds {files}; expected {sorted(OUT_FILES)}")
        if not problems:
            with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
                names = tar.getnames()
            print(f"rehearsal: the archive holds {len(names)} entries")
    finally:
        if keep:
            print(f"rehearsal: kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    for p in problems:
        print(f"rehearsal FAILED: {p}")
    if not problems:
        print(f"rehearsal PASSED in {time.monotonic() - t0:.0f} s")
    return 1 if problems else 0
