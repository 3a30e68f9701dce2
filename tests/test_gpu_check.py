"""bench/gpu_check.sh, the one call a lent GPU runs: its plan fits the budget, a failing, cut or
skipping stage is reported as such, $OUT gets three files, and the whole device run rehearses
here (bare copy of the tree, fresh venv of the GPU image's packages, offline install)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_check
from bench.gpu_check import Stage

ROOT = Path(__file__).resolve().parents[1]


def test_plan_fits_the_budget_with_headline_first():
    stages = gpu_check.plan(Path("/scratch"))
    assert gpu_check.planned_seconds(stages) <= gpu_check.BUDGET_S <= 540
    names = [s.name for s in stages]
    assert names[:3] == ["doctor", "bench_sample", "bench_kernels"]
    assert names.index("kernel_checks") < names.index("export_gpu")
    # exports, then the eval's CUDA check: last, optional
    assert [s.name for s in stages if not s.required] == ["export_gpu", "eval_gpu"]
    sample = next(s for s in stages if s.name == "bench_sample")
    assert "256x256_diffusion" in sample.argv and "16" in sample.argv


def test_kernel_checks_stage_runs_tests_kernels_in_parallel():
    stage = next(s for s in gpu_check.plan(Path("/scratch")) if s.name == "kernel_checks")
    assert stage.argv[-1] == "tests/kernels" and stage.rehearse[-1] == "tests/kernels"
    assert stage.argv[stage.argv.index("-n") + 1] == "8" and stage.junit
    assert sorted(p.name for p in (ROOT / "tests" / "kernels").glob("test_*.py")) == [
        "test_attention.py", "test_fast_engine.py", "test_group_norm.py", "test_networks.py",
        "test_sampler_step.py", "test_selfcheck.py",
    ]  # fmt: skip
    assert (gpu_check.GOLDEN / "golden.pt").is_file()  # tracked: no copy is carried


def test_bench_stage_arguments_parse():
    import bench.kernels
    import bench.sample

    args = bench.sample.parse_args(gpu_check.SAMPLE_ARGS)
    assert args.dtype == "auto" and args.batch == [1, 16]  # auto: the README's fp16 on CUDA
    assert bench.kernels.parse_args(gpu_check.KERNEL_ARGS).dtype == "fp16"
    with pytest.raises(SystemExit):
        bench.sample.parse_args(["--presets", "300x300_diffusion"])


def _fake(tmp: Path, body: str) -> list[str]:
    script = tmp / f"stage_{abs(hash(body))}.py"
    script.write_text(body)
    return [sys.executable, str(script)]


def _junit(path: Path, skips: list[str], cases: int = 3) -> str:
    rows = "".join(
        f'<testcase name="t{i}">' + (f'<skipped message="{skips[i]}"/>' if i < len(skips) else "")
        + "</testcase>" for i in range(cases)
    )  # fmt: skip
    return (
        "import pathlib\n"
        f"pathlib.Path({str(path)!r}).write_text('<testsuites><testsuite>{rows}"
        "</testsuite></testsuites>')\n"
    )


def _current_environment(self) -> bool:
    self.install_note = "the test's environment"
    self.results.append(gpu_check.Result("install", "ok", 0, gpu_check.INSTALL_LIMIT_S))
    return True


def test_stage_results_failed_cut_skipped_and_unexpected_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.Check, "install", _current_environment)
    monkeypatch.setattr(gpu_check.Check, "describe_machine", lambda self: None)

    def stages(scratch):
        logs = scratch / "logs"
        return [
            Stage("good", 20, _fake(tmp_path, "print('fine')"), "passes"),
            Stage("broken", 20, _fake(tmp_path, "raise SystemExit(3)"), "exits 3"),
            Stage(
                "slow",
                2,
                _fake(tmp_path, "import time; print('started'); time.sleep(60)"),
                "cut at its limit",
            ),  # fmt: skip
            Stage(
                "skippy",
                20,
                _fake(tmp_path, _junit(logs / "skippy.xml", ["golden data not found"])),
                "a pytest stage with an unexpected skip",
                junit=True,
            ),  # fmt: skip
            Stage(
                "trt",
                20,
                _fake(tmp_path, _junit(logs / "trt.xml", ["needs TensorRT"])),
                "an expected skip",
                junit=True,
                allowed_skips=("TensorRT",),
            ),  # fmt: skip
            Stage("huge", 10_000, ["true"], "optional, over the budget", required=False),
        ]

    out = tmp_path / "out"
    rc = gpu_check.device_run(out, 120, None, False, stages=stages)
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUT_FILES)
    summary = (out / "summary.txt").read_text()
    lines = summary.splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("stage "))) + 1 :]
    rows = {ln.split()[0]: ln for ln in table[: table.index("")]}
    assert rows["good"].split()[1] == "ok"
    assert rows["broken"].split()[1] == "FAILED" and "exit code 3" in rows["broken"]
    assert rows["slow"].split()[1] == "CUT" and "limit" in rows["slow"]
    assert rows["skippy"].split()[1] == "FAILED" and "golden data not found" in rows["skippy"]
    assert rows["trt"].split()[1] == "ok" and "1 expected skips" in rows["trt"]
    assert rows["huge"].split()[1] == "skipped"
    assert "overall: FAILED" in summary
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        slow_log = tar.extractfile("gpu_check_logs/slow.log").read().decode()
    assert "started" in slow_log  # unbuffered: a stage killed at its limit keeps its output
    assert "slow: CUT" in capsys.readouterr().out


def test_a_clean_run_passes_and_selected_stages_only(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.Check, "install", _current_environment)
    monkeypatch.setattr(gpu_check.Check, "describe_machine", lambda self: None)

    def stages(scratch):
        return [Stage("a", 20, _fake(tmp_path, "print(1)"), "a"),
                Stage("b", 20, ["false"], "b")]  # fmt: skip

    out = tmp_path / "out"
    assert gpu_check.device_run(out, 120, {"a"}, False, stages=stages) == 0
    summary = (out / "summary.txt").read_text()
    assert "overall: PASSED" in summary and "not selected" in summary


def test_stage_names_and_budget_are_checked():
    for argv in (["--stages", "bench_sample,warp_drive"], ["--budget", "-5"]):
        with pytest.raises(SystemExit) as info:
            gpu_check.main(argv)
        assert info.value.code == 2


def test_headline_reads_the_bench_json(tmp_path, monkeypatch):
    """The summary's headline from bench.sample's real JSON (CPU, demo shapes)."""
    check = gpu_check.Check(tmp_path / "out", 60, None)
    run = subprocess.run(
        [sys.executable, "-m", "bench.sample", "--presets", "demo-mnist", "--steps", "ddim2",
         "--json", str(check.logs / "bench_sample.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    lines = check.headline()
    assert lines[0].startswith("bench.sample: CPU")
    assert [ln.split()[3] for ln in lines[1:]] == ["reference", "fastsample"]
    assert all("ms/image" in ln and "x reference" in ln for ln in lines[1:])
    (check.logs / "bench_kernels.json").write_text("{not json")
    assert "unreadable" in check.headline()[0]  # a damaged file never stops the run
    shutil.rmtree(check.scratch)


@pytest.mark.slow
def test_rehearsal_of_the_device_run():
    """The device run's set-up in a bare copy and a fresh venv: offline install, every module
    imported, every GPU test collected, bench arguments parsed, golden data loaded, the plan
    within the budget, three files in $OUT."""
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--rehearse"],
                         capture_output=True, text=True, timeout=1500)  # fmt: skip
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "rehearsal PASSED" in run.stdout
    assert "$OUT holds 3 files" in run.stdout
    for stage in ("install", "imports", "golden", "bench_sample", "kernel_checks", "engine_gpu"):
        assert any(ln.startswith(stage) and ("rehearsed" in ln or " ok " in ln)
                   for ln in run.stdout.splitlines()), stage  # fmt: skip


def test_bench_kernels_runs_interpreted(tmp_path):
    """bench.kernels' own code (every row kind: GroupNorm NCHW / channels_last / attention-norm
    view, attention with SDPA on contiguous q, k, v) on the CPU under the interpreter."""
    import json
    import os

    out = tmp_path / "kernels.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--smoke", "--batch", "2", "--json", str(out)],
        cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["layout"] for r in rows} == {"nchw", "channels_last", "channels_last view",
                                           "qkv [B,3C,T]"}  # fmt: skip
    for r in rows:  # fp16 inputs against the fp32 reference: a few float16 ulps
        assert r["rel_err"] < 3e-3, r
    attention = [r for r in rows if r["op"].startswith("attention")]
    assert attention and all(r["sdpa_rel_err"] < 3e-3 for r in attention)
