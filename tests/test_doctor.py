"""`fastsample doctor`: the report on this CPU machine (table, JSON, exit 0), a failing check or
runtime named with exit 1, the GPU branch on fakes (the self-check's verdicts read back), and
bad options as one-line errors with exit 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fastsample import diagnostics, doctor, ops, selfcheck
from fastsample.cli import main
from fastsample.doctor import Report, Timing
from fastsample.selfcheck import Check


def test_doctor_on_this_cpu_exits_0_prints_the_table_and_writes_json(tmp_path):
    """The real thing at 64x64 (the default also times 256x256: ~1 min on 2 threads)."""
    path = tmp_path / "doctor.json"
    result = CliRunner().invoke(
        main, ["doctor", "--device", "cpu", "--sizes", "64", "--json", str(path)]
    )
    assert result.exit_code == 0, result.output
    table = result.stdout
    for line in ("environment", "checks: no GPU: CPU checks", "onednn unet", "guided sampling",
                 "onednn conv 3x3 (Winograd)", "TensorRT", "oneDNN"):  # fmt: skip
        assert line in table
    assert table.rstrip().endswith("verdict: OK")
    row = next(line for line in table.splitlines() if line.strip().startswith("64x64"))
    assert row.split()[1:3] == ["eager", "fp32"] and float(row.split()[3]) > 0
    report = json.loads(path.read_text())
    assert report["ok"] and report["verdict"] == "OK" and report["failed"] == []
    assert report["device"] == "cpu"
    assert report["environment"]["torch"].startswith(torch.__version__)
    assert {"fastsample", "python", "triton", "CUDA available", "GPU", "onnxruntime",
            "TensorRT", "CPU"} <= set(report["environment"])  # fmt: skip
    records = report["checks"]["records"]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert all(r["err"]["onednn"] <= diagnostics.SAMPLING_TOL for r in records)
    (timed,) = [t for t in report["timings"] if t["ms"] is not None]
    assert (timed["size"], timed["runtime"], timed["dtype"]) == (64, "eager", "fp32")
    assert timed["ms"] > 0 and timed["first_s"] > 0
    untimed = {t["runtime"]: t["note"] for t in report["timings"] if t["ms"] is None}
    assert set(untimed) == {"onnxruntime", "tensorrt", "aoti"}
    assert all(note for note in untimed.values())  # each says why (and the flag that times it)


def _report(checks=(), timings=()) -> Report:
    return Report("cpu", {"torch": torch.__version__}, "no GPU: CPU checks", list(checks),
                  list(timings), 1.0)  # fmt: skip


def test_json_alone_is_json_on_stdout(monkeypatch):
    timing = Timing(64, "eager", "fp32", ms=12.5, first_s=3.0, steps=1, repeats=1)
    ok = Check("onednn unet", "demo", "onednn", "ok", err={"onednn": 1e-7}, ms={"onednn": 1.0})
    monkeypatch.setattr(doctor, "diagnose", lambda *a, **k: _report([ok], [timing]))
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["timings"][0]["ms"] == 12.5 and report["checks"]["records"][0]["status"] == "ok"
    assert set(report) >= {"device", "environment", "checks", "timings", "failed", "verdict"}


def _perturbed_sdpa(monkeypatch):
    """A broken fused attention: the onednn kernels' SDPA (the torch kernels use einsum)."""
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa(*a, **k) * 1.01)


@pytest.mark.skipif(not ops.onednn_available(), reason="this torch build has no oneDNN")
def test_a_disagreeing_kernel_fails_its_cpu_check_and_the_cli_exits_1(monkeypatch):
    _perturbed_sdpa(monkeypatch)
    monkeypatch.setattr(diagnostics, "CPU_CHECKS", diagnostics.CPU_CHECKS[:3])  # (no sampling)
    monkeypatch.setattr(doctor, "_timings", lambda *a: [])
    result = CliRunner().invoke(main, ["doctor", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    verdict = result.stdout.rstrip().splitlines()[-1]
    assert verdict.startswith("verdict: FAILED: onednn unet (demo-mnist 32x32 b2 fp32)")
    assert "conv 3x3" not in verdict  # the convolutions still agree
    assert "onednn unet: relative error" in result.stdout
    assert "doctor: FAILED: onednn unet" in result.stderr


@pytest.mark.skipif(not ops.onednn_available(), reason="this torch build has no oneDNN")
def test_a_crashing_kernel_is_a_failed_check_not_a_traceback(monkeypatch):
    conv2d = ops.conv2d

    def broken(conv, x, kernels="torch"):
        if kernels == "onednn":
            raise RuntimeError("oneDNN primitive creation failed")
        return conv2d(conv, x, kernels)

    monkeypatch.setattr(ops, "conv2d", broken)
    checks = {c.component: c for c in diagnostics.cpu_checks()}
    assert set(checks) == {name for name, *_ in diagnostics.CPU_CHECKS}
    assert all(c.status == "FAILED" for c in checks.values())
    assert checks["onednn conv 3x3 (Winograd)"].error == (
        "RuntimeError: oneDNN primitive creation failed"
    )
    report = _report(checks.values())
    assert not report.ok and report.verdict().startswith("FAILED: onednn unet")


def test_an_installed_runtime_that_fails_is_named_and_its_export_cache_removed(monkeypatch):
    caches = []

    def runs(size, runtime, device, steps, repeats, timing):
        if runtime == "eager":
            timing.dtype = "fp32"
            return [2.0, 1.0]
        cache = os.environ["FASTSAMPLE_CACHE"]
        caches.append(cache)
        (open(os.path.join(cache, "partial.onnx"), "w")).close()
        raise RuntimeError("ONNX Runtime session failed\nsecond line")

    monkeypatch.setattr(doctor, "cpu_checks", lambda log=None: [])
    monkeypatch.setattr(doctor, "_guided_runs", runs)
    monkeypatch.setattr(doctor, "runtime_problem",
                        lambda r, d: "TensorRT absent" if r == "tensorrt" else None)  # fmt: skip
    monkeypatch.setenv("FASTSAMPLE_CACHE", "/users/cache")
    runtimes = doctor.parse_runtimes("onnxruntime,tensorrt")
    report = doctor.diagnose("cpu", (64,), runtimes)
    assert report.failed == ["onnxruntime 64x64"]
    assert report.verdict() == "FAILED: onnxruntime 64x64"
    by_runtime = {t.runtime: t for t in report.timings}
    assert by_runtime["eager"].ms == 1000.0 and by_runtime["eager"].first_s == 2.0
    assert by_runtime["onnxruntime"].note == "RuntimeError: ONNX Runtime session failed"
    assert not by_runtime["tensorrt"].failed  # asked for but absent: reported, not failed
    assert by_runtime["tensorrt"].note == "TensorRT absent"
    assert "--runtimes aoti" in by_runtime["aoti"].note  # not asked: the flag that times it
    assert "FAILED: RuntimeError: ONNX Runtime session failed" in report.table()
    assert caches and not os.path.exists(caches[0])  # the temporary export cache is gone
    assert os.environ["FASTSAMPLE_CACHE"] == "/users/cache"


def _fake_gpu(monkeypatch, decisions, calls):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU 80GB")
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setattr(doctor, "environment", lambda d: {"GPU": "Fake GPU 80GB"})
    monkeypatch.setattr(selfcheck, "reset", lambda d: calls.append(("reset", str(d))))
    monkeypatch.setattr(
        selfcheck, "decisions", lambda d: calls.append(("read", str(d))) or decisions
    )

    def step(size, runtime, device):
        calls.append(("time", size, runtime))
        return Timing(size, runtime, "fp16", ms=20.0, first_s=9.0, steps=10, repeats=3,
                      peak_gib=1.5)  # fmt: skip

    monkeypatch.setattr(doctor, "time_guided_step", step)
    monkeypatch.setattr(doctor, "cpu_checks", lambda log=None: pytest.fail("CPU checks on a GPU"))
    monkeypatch.delenv(selfcheck.FORCE_ENV, raising=False)


GPU_CHECKS = [
    Check("group_norm", "fp16 [1,256,64,64] channels_last", "triton", "ok",
          err={"triton": 2e-4, "torch": 3e-4}, ms={"triton": 0.02, "torch": 0.05}),
    Check("attention", "fp16 T=256 D=64 fwd+bwd", "sdpa", "FAILED",
          error="relative error 3.1e-01 > 3 x torch's 2.0e-04", err={"triton": 0.31, "sdpa": 2e-4}),
    Check("cuda_graph", "b1 64x64 ddim", "graph", "ok", ms={"graph": 5.0, "eager": 9.0}),
]  # fmt: skip


def test_gpu_branch_resets_the_self_check_times_then_reports_its_verdicts(monkeypatch):
    calls = []
    _fake_gpu(monkeypatch, GPU_CHECKS, calls)
    report = doctor.diagnose(None, (64, 256), ("eager",))
    assert report.device == "cuda:0"  # as its tensors name it: the self-check's key
    assert calls[0] == ("reset", "cuda:0") and calls[-1] == ("read", "cuda:0")
    assert [c for c in calls if c[0] == "time"] == [("time", 64, "eager"), ("time", 256, "eager")]
    assert report.checks_title == "self-check of the fast paths on Fake GPU 80GB"
    assert report.failed == ["attention (fp16 T=256 D=64 fwd+bwd)"]
    table = report.table()
    assert "attention: relative error 3.1e-01" in table and "peak GiB" in table
    assert "triton 2.0e-04 / torch 3.0e-04" in table
    assert report.table().endswith("verdict: FAILED: attention (fp16 T=256 D=64 fwd+bwd)")

    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1 and "FAILED: attention" in result.stderr


def test_gpu_branch_all_ok_exits_0(monkeypatch):
    _fake_gpu(monkeypatch, [GPU_CHECKS[0], GPU_CHECKS[2]], [])
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and [r["component"] for r in report["checks"]["records"]] == [
        "group_norm", "cuda_graph"
    ]  # fmt: skip
    assert report["timings"][0]["peak_gib"] == 1.5


def test_gpu_branch_says_why_nothing_was_checked(monkeypatch):
    _fake_gpu(monkeypatch, [], [])
    monkeypatch.setenv(selfcheck.FORCE_ENV, "torch")
    report = doctor.diagnose("cuda", (64,), ("eager",))
    assert report.ok and report.checks_title.startswith("FASTSAMPLE_KERNELS=torch: the fast paths")
    monkeypatch.delenv(selfcheck.FORCE_ENV)
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert doctor.diagnose("cuda", (64,), ("eager",)).checks_title.startswith("Triton absent")


def test_a_bad_fastsample_kernels_value_is_a_named_failure(monkeypatch):
    monkeypatch.setenv(selfcheck.FORCE_ENV, "fast")
    monkeypatch.setattr(doctor, "cpu_checks", lambda log=None: [])
    monkeypatch.setattr(doctor, "_timings", lambda *a: [])
    report = doctor.diagnose("cpu", (64,), ("eager",))
    assert report.failed == ["FASTSAMPLE_KERNELS"]
    assert "'fast'" in next(x for x in report.table().splitlines() if "FASTSAMPLE_KERNELS:" in x)


def test_options_parse():
    assert doctor.parse_sizes("256,64,64") == (256, 64)
    assert doctor.parse_runtimes("onnxruntime") == ("eager", "onnxruntime")
    assert doctor.parse_runtimes("aoti,eager") == ("eager", "aoti")
    assert doctor.parse_runtimes("all") == ("eager", "onnxruntime", "tensorrt", "aoti")
    assert doctor.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "65"], "error: --sizes '65': expected sizes among 64, 128, 256, 512"),
        (["--sizes", "64,big"], "error: --sizes '64,big': expected sizes among"),
        (["--runtimes", "eager,onnx"], "error: --runtimes 'eager,onnx': 'onnx' is not a runtime"),
        (["--device", "tpu"], "error: --device 'tpu': expected cpu, cuda or cuda:N"),
        (["--json", "/no/such/dir/doctor.json"], "error: --json /no/such/dir/doctor.json: no"),
        pytest.param(["--device", "cuda"], "error: --device cuda: torch sees no CUDA GPU here",
                     marks=pytest.mark.skipif(torch.cuda.is_available(),
                                            reason="a GPU is present: nothing to refuse")),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_and_exit_code_2(monkeypatch, args, message):
    monkeypatch.setattr(doctor, "environment", lambda d: pytest.fail("ran with a bad option"))
    result = CliRunner().invoke(main, ["doctor", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
