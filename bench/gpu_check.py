"""One call on a lent GPU measures everything fastsample has built (`bash bench/gpu_check.sh`).

    bash bench/gpu_check.sh --prepare     # here, before the device run: records the commit
    run(command="bash bench/gpu_check.sh", carry=[".gpu_data"], timeout_s=590)   # the device
    bash bench/gpu_check.sh --stages kernel_checks,engine_gpu --budget 200        # a rerun
    bash bench/gpu_check.sh --rehearse    # here: the device run's set-up in a bare copy

The device machine gets a copy of the work tree and nothing else: no `../shared`, no installed
fastsample, no network, Python output block-buffered unless told otherwise, and at most 8 files
back from $OUT. So this script (standard library only, it runs before fastsample imports):

- installs the project offline (`pip install --no-index --no-build-isolation --no-deps -e .`;
  where that fails, a symlinked package tree on PYTHONPATH); the tests read the golden data from
  tests/data (tracked), and the commit comes from the carried `.gpu_data/commit.txt` that
  `--prepare` writes (the copy has no git history);
- runs the stages in order of importance, each in its own process group under its own limit and
  under one wall-clock budget (540 s): the headline (`bench.sample`, guided ADM-256 at the
  README's fp16, reference-style eager vs the fast engine, batch 1 and 16) first, then the
  kernel table, then the compiled kernel checks and the CUDA-graph engine tests, exports last
  and only if time is left. A stage that fails, is cut at its limit, or skips tests it should
  run is reported as such;
- after every stage rewrites $OUT: `summary.txt` (machine, each stage's result and measured
  seconds, headline figures), `RESULTS_append.md` (the tables, with card, command and commit,
  for bench/RESULTS.md) and `gpu_check_logs.tar.gz` (every log, JUnit XML and JSON). Three
  files, so a run killed from outside still returns what it finished.

`--rehearse` does here what the device run does, without a GPU: it copies the tree as the device
tool does into a folder with no `../shared`, makes a fresh venv holding only packages the GPU
image has, runs the offline install, imports every module, collects every GPU test, parses
every bench stage's arguments, loads the golden data, checks the stage plan against the budget
and the files $OUT would return. tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ".gpu_data"  # git-ignored; --prepare records the commit there, `carry` takes it along
GOLDEN = ROOT / "tests" / "data" / "golden_tiny"  # tracked; FASTSAMPLE_GOLDEN_DIR overrides
BUDGET_S = 540  # 9 minutes of the 10-minute command limit; the device lease is 15 minutes
MAX_OUT_FILES = 8  # what the device tool returns from $OUT
OUT_FILES = ("summary.txt", "RESULTS_append.md", "gpu_check_logs.tar.gz")
RESERVE_S = 8  # kept back from the budget for packing the results


@dataclasses.dataclass
class Stage:
    """One step of the device run. argv runs on the device; rehearse runs in its place in a
    rehearsal (None: the stage has nothing to rehearse). junit: the stage is a pytest run whose
    skips are checked (allowed_skips: substrings of skip reasons that are expected there)."""

    name: str
    limit_s: int
    argv: list[str]
    what: str
    rehearse: list[str] | None = None
    required: bool = True
    junit: bool = False
    allowed_skips: tuple[str, ...] = ()
    present: bool = True  # False: the stage's tool does not exist at this commit


@dataclasses.dataclass
class Result:
    name: str
    status: str  # ok | FAILED | CUT | skipped | absent | not selected | rehearsed
    seconds: float = 0.0
    limit_s: int = 0
    note: str = ""


# -- the plan -----------------------------------------------------------------------------------


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _pytest(*args: str, junit: str) -> list[str]:
    return _py("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *args)  # fmt: skip


def _has_doctor() -> bool:
    cli = ROOT / "fastsample" / "cli.py"
    return cli.is_file() and "def doctor" in cli.read_text()


KERNEL_TESTS = ("tests/kernels",)  # compiled on a GPU (tests/conftest.py: no interpreter there)
SAMPLE_ARGS = ["--presets", "256x256_diffusion", "--batch", "1", "16", "--steps", "ddim25",
               "--repeats", "3"]  # fmt: skip
KERNEL_ARGS = ["--batch", "16", "--dtype", "fp16"]


def _bench_stage(name: str, limit_s: int, what: str, module: str, args: list[str]) -> Stage:
    """A bench script's stage; rehearsed by parsing its arguments."""
    parse = "import sys, importlib; importlib.import_module(sys.argv[1]).parse_args(sys.argv[2:])"
    return Stage(name, limit_s, _py("-m", module, *args), what,
                 rehearse=_py("-c", parse, module, *args))  # fmt: skip


def _pytest_stage(name: str, limit_s: int, what: str, workers: int, args: tuple, logs: Path,
                  **kwargs) -> Stage:  # fmt: skip
    """A pytest stage (JUnit XML read for skips); rehearsed by collecting its tests."""
    junit = str(logs / f"{name}.xml")
    run = _pytest(*(("-n", str(workers)) if workers > 1 else ()), *args, junit=junit)
    collect = _pytest("--collect-only", *args, junit=junit)
    return Stage(name, limit_s, run, what, rehearse=collect, junit=True, **kwargs)


def plan(scratch: Path) -> list[Stage]:
    """The stages, most important first, with the limits the budget is planned on."""
    logs = scratch / "logs"
    md = str(scratch / "RESULTS_append.md")
    doctor = Stage("doctor", 90, _py("-m", "fastsample", "doctor", "--json",
                                     str(logs / "doctor.json")),
                   "fastsample doctor: environment, self-check, one guided step per runtime",
                   rehearse=_py("-m", "fastsample", "doctor", "--help"),
                   present=_has_doctor())  # fmt: skip
    return [
        doctor,
        _bench_stage("bench_sample", 180,
                     "guided ADM-256 ddim25 at fp16: reference-style eager vs fast engine, "
                     "batch 1 and 16", "bench.sample",
                     [*SAMPLE_ARGS, "--json", str(logs / "bench_sample.json"), "--markdown", md]),
        _bench_stage("bench_kernels", 70,
                     "Triton GroupNorm / attention vs eager, torch.compile, SDPA at ADM-256 "
                     "shapes", "bench.kernels",
                     [*KERNEL_ARGS, "--json", str(logs / "bench_kernels.json"), "--markdown", md]),
        _pytest_stage("kernel_checks", 110,
                      "tests/kernels compiled for this GPU (GroupNorm, attention, fused update, "
                      "whole tiny networks and the fast engine vs golden data)", 8, KERNEL_TESTS,
                      logs),
        _pytest_stage("engine_gpu", 50,
                      "CUDA graphs and streams of the fast engine vs the eager loops", 4,
                      ("-m", "gpu", "tests/test_engine.py"), logs),
        _pytest_stage("export_gpu", 150,
                      "AOTInductor on CUDA (TensorRT tests skip: not on the image)", 1,
                      ("-m", "gpu", "tests/test_export.py"), logs, required=False,
                      allowed_skips=("TensorRT",)),
        _pytest_stage("eval_gpu", 60,
                      "the FID Inception extractor and precision/recall on CUDA vs the CPU", 1,
                      ("-m", "gpu", "tests/test_inception.py"), logs, required=False),
    ]  # fmt: skip


def planned_seconds(stages: list[Stage]) -> int:
    """What the install, the machine facts and the required stages may take at most (a stage
    not built yet counted too, so that its arrival cannot break the budget)."""
    return INSTALL_LIMIT_S + MACHINE_S + sum(s.limit_s for s in stages if s.required)


INSTALL_LIMIT_S = 30
MACHINE_S = 10  # nvidia-smi and one Python probe (their own limits are a safety net only)


# -- running ------------------------------------------------------------------------------------


def run_logged(argv: list[str], log: Path, timeout: float, env: dict | None = None,
               cwd: Path = ROOT) -> tuple[int | None, float]:  # fmt: skip
    """Run argv in its own process group, output to log; (return code or None when cut, s)."""
    start = time.monotonic()
    with open(log, "ab") as f:
        f.write(("$ " + shlex.join(argv).replace("\n", "\\n") + "\n").encode())
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return rc, time.monotonic() - start


def skipped_tests(junit: Path) -> tuple[int, list[str]]:
    """(tests run, skip reasons) from a JUnit XML report."""
    if not junit.is_file():
        return 0, []
    root = ET.parse(junit).getroot()
    cases = list(root.iter("testcase"))
    reasons = [sk.get("message", "") for case in cases for sk in case.findall("skipped")]
    return len(cases), reasons


def judge(stage: Stage, rc: int | None, seconds: float, limit: float, rehearsal: bool,
          logs: Path) -> Result:  # fmt: skip
    result = Result(stage.name, "ok", seconds, stage.limit_s)
    if rc is None:
        result.status, result.note = "CUT", f"killed at its {limit:.0f} s limit"
        return result
    if rc != 0:
        result.status, result.note = "FAILED", f"exit code {rc}"
        return result
    if rehearsal:
        result.status = "rehearsed"
        return result
    if stage.junit:
        n, reasons = skipped_tests(logs / f"{stage.name}.xml")
        unexpected = [r for r in reasons if not any(a in r for a in stage.allowed_skips)]
        if n == 0:
            result.status, result.note = "FAILED", "no test ran"
        elif unexpected:
            result.status = "FAILED"
            result.note = f"{len(unexpected)} unexpected skips, e.g. {unexpected[0][:120]!r}"
        else:
            result.note = f"{n} tests" + (f", {len(reasons)} expected skips" if reasons else "")
    return result


class Check:
    """One device run (or its rehearsal): stages under a budget, results packed after each."""

    def __init__(self, out: Path, budget: float, stages_wanted: set[str] | None,
                 rehearsal: bool = False):  # fmt: skip
        self.start = time.monotonic()
        self.budget = budget
        self.out = out
        self.rehearsal = rehearsal
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.logs = self.scratch / "logs"
        self.logs.mkdir()
        self.wanted = stages_wanted
        self.results: list[Result] = []
        self.machine: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("TRITON_INTERPRET", None)
        self.commit = read_commit()
        self.golden = self._golden()
        self.install_note = ""
        self.failed = False

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start) - RESERVE_S

    def _golden(self) -> str:
        """Where the tests will read the golden data ("" if it is missing)."""
        where = Path(os.environ.get("FASTSAMPLE_GOLDEN_DIR") or GOLDEN)
        return str(where) if (where / "config.json").is_file() else ""

    # -- install and machine facts ---------------------------------------------------------

    def install(self) -> bool:
        log = self.logs / "install.log"
        t0 = time.monotonic()
        argv = _py("-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps",
                   "--disable-pip-version-check", "-q", "-e", str(ROOT))  # fmt: skip
        probe = _py("-c", "import fastsample, fastsample.kernels.attention, fastsample.export")
        if os.environ.get("GPU_CHECK_INSTALL") == "tree":  # the rehearsal tries the fallback
            rc = "not tried"
        else:
            rc, _ = run_logged(argv, log, INSTALL_LIMIT_S - 10, self.env)
        if rc == 0 and run_logged(probe, log, 30, self.env)[0] == 0:
            self.install_note = "pip install -e . (offline)"
        else:  # the package as a symlinked tree on PYTHONPATH: needs nothing but the source
            shim = self.scratch / "shim" / "fastsample"
            shim.mkdir(parents=True)
            for entry in (ROOT / "fastsample").iterdir():
                (shim / entry.name).symlink_to(entry)
            (shim / "kernels").symlink_to(ROOT / "kernels")
            (shim / "export").symlink_to(ROOT / "export")
            path = [str(shim.parent), str(ROOT), self.env.get("PYTHONPATH", "")]
            self.env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
            # The current directory (the source's fastsample/, without kernels/ and export/)
            # must not come before the tree: `python -m` would put it first.
            self.env["PYTHONSAFEPATH"] = "1"
            ok = run_logged(probe, log, 30, self.env)[0] == 0
            self.install_note = f"pip: {rc}; symlinked tree on PYTHONPATH" + (
                "" if ok else ": import STILL FAILS (see install.log)"
            )
            if not ok:
                self.results.append(Result("install", "FAILED", time.monotonic() - t0,
                                           INSTALL_LIMIT_S, self.install_note))  # fmt: skip
                return False
        self.results.append(Result("install", "ok", time.monotonic() - t0, INSTALL_LIMIT_S,
                                   self.install_note))  # fmt: skip
        return True

    def describe_machine(self) -> None:
        log = self.logs / "machine.txt"
        smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
               "clocks.max.sm,temperature.gpu,power.draw", "--format=csv,noheader"]  # fmt: skip
        probe = (
            "import sys, platform, torch\n"
            "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda',"
            " torch.version.cuda, 'cudnn', torch.backends.cudnn.version())\n"
            "try:\n import triton; print('triton', triton.__version__)\n"
            "except Exception as e: print('triton: not importable:', e)\n"
            "try:\n import onnxruntime as o; print('onnxruntime', o.__version__,"
            " o.get_available_providers())\n"
            "except Exception as e: print('onnxruntime: not importable:', e)\n"
            "if torch.cuda.is_available():\n"
            " p = torch.cuda.get_device_properties(0)\n"
            " print('gpu', p.name, f'{p.total_memory / 2**30:.0f} GiB', p.multi_processor_count,"
            " 'SMs', f'sm_{p.major}{p.minor}')\n"
            "else: print('gpu: none visible to torch')\n"
        )
        if shutil.which("nvidia-smi"):
            run_logged(smi, log, 20, self.env)
        else:
            log.write_text("nvidia-smi: not found\n")
        run_logged(_py("-c", probe), log, 60, self.env)
        self.machine = [ln for ln in log.read_text().splitlines() if not ln.startswith("$ ")]

    # -- stages ------------------------------------------------------------------------------

    def run_stage(self, stage: Stage) -> None:
        if self.wanted is not None and stage.name not in self.wanted:
            self.results.append(Result(stage.name, "not selected", 0, stage.limit_s))
            return
        if not stage.present:
            self.results.append(Result(stage.name, "absent", 0, stage.limit_s,
                                       "not built at this commit"))  # fmt: skip
            return
        argv = stage.rehearse if self.rehearsal else stage.argv
        if argv is None:
            return
        left = self.remaining()
        need = stage.limit_s if not stage.required else min(stage.limit_s, 30)
        if left < need:
            self.results.append(Result(stage.name, "skipped", 0, stage.limit_s,
                                       f"{left:.0f} s of the budget left"))  # fmt: skip
            if stage.required:
                self.failed = True
            self.pack()
            return
        limit = min(stage.limit_s, left)
        print(f"=== {stage.name} (limit {limit:.0f} s): {stage.what}", flush=True)
        log = self.logs / f"{stage.name}.log"
        rc, seconds = run_logged(argv, log, limit, self.env)
        result = judge(stage, rc, seconds, limit, self.rehearsal, self.logs)
        if result.status in ("FAILED", "CUT"):
            self.failed = True
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(f"  | {ln}" for ln in tail), flush=True)
        print(f"--- {stage.name}: {result.status} in {seconds:.0f} s {result.note}", flush=True)
        self.results.append(result)
        self.pack()

    # -- results -----------------------------------------------------------------------------

    def headline(self) -> list[str]:
        try:
            return self._headline()
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            return [f"headline figures unreadable ({type(e).__name__}: {e}); see the archive"]

    def _headline(self) -> list[str]:
        lines = []
        path = self.logs / "bench_sample.json"
        if path.is_file():
            data = json.loads(path.read_text())
            lines.append(f"bench.sample: {data['header']}")
            for r in data["rows"]:
                lines.append(
                    f"  {r['preset']} batch {r['batch']:>2} {r['path']:<10} "
                    f"{r['ms_per_image']:9.1f} ms/image  {r['speedup']:.2f}x reference  "
                    f"{r['floor_share'] * 100:5.1f}% of FLOP floor  rel err "
                    f"{r['rel_err_vs_reference']:.1e}"
                )
        path = self.logs / "bench_kernels.json"
        if path.is_file():
            data = json.loads(path.read_text())
            lines.append(f"bench.kernels: {data['header']}")
            for r in data["rows"]:
                lines.append(
                    f"  {r['op']:<34} {r['shape']:<22} {r['kernel_ms']:.4f} ms  "
                    f"x eager {r['eager_ms'] / r['kernel_ms']:.2f}  "
                    f"{r['of_bandwidth'] * 100:.0f}% of copy BW"
                )
        return lines

    def summary(self) -> str:
        used = time.monotonic() - self.start
        mode = "REHEARSAL (no GPU run)" if self.rehearsal else "device run"
        lines = [
            f"fastsample bench/gpu_check.sh, {mode}: commit {self.commit}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            f"budget {self.budget:.0f} s, used {used:.0f} s; planned (required stages) "
            f"{planned_seconds(plan(self.scratch))} s",
            f"golden data: {self.golden or f'MISSING (expected in {GOLDEN})'}",
            f"install: {self.install_note or 'not run'}",
            *(f"machine: {ln}" for ln in self.machine),
            "",
            f"{'stage':<14} {'result':<13} {'seconds':>7} {'limit':>6}  note",
        ]
        for r in self.results:
            secs = f"{r.seconds:.0f}" if r.status not in ("skipped", "absent",
                                                           "not selected") else "-"  # fmt: skip
            lines.append(f"{r.name:<14} {r.status:<13} {secs:>7} {r.limit_s:>6}  {r.note}")
        verdict = "FAILED" if self.failed else "PASSED"
        lines += ["", f"overall: {verdict}", "", *self.headline()]
        return "\n".join(lines) + "\n"

    def pack(self) -> None:
        """Rewrite the three files of $OUT (each through a temporary name and a rename)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.logs / "summary.txt").write_text(self.summary())
        results = self.scratch / "RESULTS_append.md"
        header = (
            f"\n## {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{self._card()}, commit {self.commit}\n\n"
            "Command: `bash bench/gpu_check.sh` (bench_sample: `python -m bench.sample "
            f"{' '.join(SAMPLE_ARGS)}`; bench_kernels: `python -m bench.kernels "
            f"{' '.join(KERNEL_ARGS)}`)\n"
        )
        body = results.read_text() if results.is_file() else "\n(no table was written)\n"
        stages = "\n".join(
            f"- {r.name}: {r.status}, {r.seconds:.0f} s {r.note}".rstrip() for r in self.results
        )
        text = header + body + "\nStages:\n\n" + stages + "\n"
        tmp = self.out / ".RESULTS_append.md.tmp"
        tmp.write_text(text)
        tmp.replace(self.out / "RESULTS_append.md")
        tmp = self.out / ".summary.txt.tmp"
        shutil.copyfile(self.logs / "summary.txt", tmp)
        tmp.replace(self.out / "summary.txt")
        tmp = self.out / ".gpu_check_logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.logs, arcname="gpu_check_logs")
            if results.is_file():
                tar.add(results, arcname="gpu_check_logs/RESULTS_append.md")
        tmp.replace(self.out / "gpu_check_logs.tar.gz")

    def _card(self) -> str:
        for ln in self.machine:
            if ln.startswith("gpu "):
                return ln[4:]
        return "no GPU"


def read_commit() -> str:
    marker = ROOT / DATA / "commit.txt"
    if marker.is_file():
        return marker.read_text().strip()
    return _git_commit(ROOT) or "unknown"


def _git_commit(root: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return ""
    return head + (" (with uncommitted changes)" if head and dirty else "")


def device_run(out: Path, budget: float, wanted: set[str] | None, rehearsal: bool,
               stages=None) -> int:  # fmt: skip
    """The device run (or with rehearsal, its dry run); stages: a function of the scratch folder
    giving the stage list (default: plan). Returns the exit code (1 if anything failed)."""
    check = Check(out, budget, wanted, rehearsal)
    print(f"gpu_check: commit {check.commit}; budget {budget:.0f} s; scratch {check.scratch}",
          flush=True)  # fmt: skip
    stages = (stages or plan)(check.scratch)
    if planned_seconds(stages) > budget:
        check.failed = True
        print(f"gpu_check: the required stages plan {planned_seconds(stages)} s, over the "
              f"{budget:.0f} s budget", flush=True)  # fmt: skip
    if check.install():
        check.describe_machine()
        check.pack()
        if rehearsal:
            check.run_stage(
                Stage(
                    "imports",
                    90,
                    _py("-m", "bench.gpu_check", "--imports"),
                    "import every module of fastsample and bench",
                    rehearse=_py("-m", "bench.gpu_check", "--imports"),
                )
            )
            check.run_stage(Stage("golden", 30, [],
                                  "the golden data loads where the checks look for it",
                                  rehearse=_py("-c", _GOLDEN_PROBE, check.golden)))  # fmt: skip
        for stage in stages:
            check.run_stage(stage)
    else:
        check.failed = True
    check.pack()
    text = (check.logs / "summary.txt").read_text()
    print("=== summary\n" + text, flush=True)
    shutil.rmtree(check.scratch, ignore_errors=True)
    return 1 if check.failed else 0


_GOLDEN_PROBE = (
    "import sys, json, torch, pathlib\n"
    "d = pathlib.Path(sys.argv[1])\n"
    "json.loads((d / 'config.json').read_text())\n"
    "g = torch.load(d / 'golden.pt', weights_only=True)\n"
    "assert 'unet_a_state_dict' in g, sorted(g)\n"
    "print('golden data:', d, len(g), 'entries')\n"
)


def import_everything() -> int:
    """Import every module of the installed fastsample (kernels and export included) and of
    bench/; print and count the failures."""
    import importlib
    import pkgutil

    import fastsample
    import fastsample.export
    import fastsample.kernels

    names = []
    for package in (fastsample, fastsample.kernels, fastsample.export):
        prefix = package.__name__ + "."
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix)]
    names += [f"bench.{p.stem}" for p in sorted((ROOT / "bench").glob("*.py"))
              if p.stem not in ("__init__", "conftest", "test_benchmarks")]  # fmt: skip
    failures = 0
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # report every failing module, not only the first
            failures += 1
            print(f"FAILED import {name}: {type(e).__name__}: {e}")
    print(f"imported {len(names) - failures} of {len(names)} modules")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help=f"record the commit in {DATA}/ "
                      "(here, before the device run)")  # fmt: skip
    mode.add_argument("--rehearse", action="store_true", help="rehearse the device run here")
    mode.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    mode.add_argument("--imports", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="wall-clock seconds")
    parser.add_argument("--keep", action="store_true", help="keep the rehearsal's scratch folder")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget {args.budget}: expected a positive number of seconds")
    if args.prepare or args.rehearse:
        from bench import gpu_rehearse

        return gpu_rehearse.prepare() if args.prepare else gpu_rehearse.rehearse(args.keep)
    if args.imports:
        return import_everything()
    names = {s.name for s in plan(Path("."))}
    wanted = None
    if args.stages:
        wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
        unknown = wanted - names
        if unknown:
            parser.error(f"--stages {args.stages}: unknown {sorted(unknown)}; "
                         f"stages are {sorted(names)}")  # fmt: skip
    out = Path(os.environ.get("OUT") or ROOT / "gpu_out")
    return device_run(out, args.budget, wanted, rehearsal=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
