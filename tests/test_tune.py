"""`fastsample tune` on the golden tiny model (pixel features, a few seconds per run): the
output's chosen recipe is the cheapest full-count point that meets the target (the best FID
among those within 5% of its time), recomputed here from its points; the Pareto flags; a run
killed with SIGKILL continues from its state and measures the same figures as an uninterrupted
one; the options' bad values in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsample.cli import main
from fastsample.errors import InputError
from fastsample.recipes import Recipe
from fastsample.tune import Target, moves, parse_budget, parse_target


@pytest.fixture(scope="module")
def ref_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(path, rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8))
    return path


def _args(tiny_checkpoints, ref_npz, out, budget="25s"):
    return ["tune", "--model", str(tiny_checkpoints["model"]), "--classifier",
            str(tiny_checkpoints["classifier"]), "--ref", str(ref_npz), "--extractor", "pixels",
            "--samples", "40", "--batch-size", "10", "--budget", budget, "--within", "50%",
            "--out", str(out)]  # fmt: skip


def _check_output(result: dict) -> None:
    full = result["samples"]
    pts = [p for p in result["points"] if str(full) in p["figures"]]
    ref = next(p for p in result["points"] if p["recipe"]["name"] == "reference")
    ref_fid = ref["figures"][str(full)]["fid"]
    ok = [p for p in pts if p["figures"][str(full)]["fid"] <= 1.5 * ref_fid]
    assert ok, "the reference itself meets an FID target relative to it"
    fastest = min(p["ms_per_image"] for p in ok)  # times within 5% tie; then the best FID
    tied = [p for p in ok if p["ms_per_image"] <= fastest * 1.05]
    cheapest = min(tied, key=lambda p: (p["figures"][str(full)]["fid"], p["ms_per_image"]))
    chosen = result["recipe"]
    knobs = {k: v for k, v in chosen.items() if k not in ("name", "source", "figures")}
    assert knobs == {k: v for k, v in cheapest["recipe"].items()
                     if k not in ("name", "source", "figures")}  # fmt: skip
    assert chosen["figures"]["ms_per_image"] == cheapest["ms_per_image"]
    # Pareto flags: a full-count point is on the front iff no other is at least as fast and
    # as good and better in one (settings that give the same images tie in FID)
    for p in pts:
        fid, ms = p["figures"][str(full)]["fid"], p["ms_per_image"]
        dominated = any(
            q is not p and q["ms_per_image"] <= ms and q["figures"][str(full)]["fid"] <= fid
            and (q["ms_per_image"] < ms or q["figures"][str(full)]["fid"] < fid) for q in pts
        )  # fmt: skip
        assert p["pareto"] == (not dominated), p


def test_tune_chooses_the_cheapest_point_that_meets_the_target(tiny_checkpoints, ref_npz,
                                                                tmp_path):  # fmt: skip
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, _args(tiny_checkpoints, ref_npz, out))
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and "[" in result.output  # progress lines, best so far
    data = json.loads(out.read_text())
    assert len(data["points"]) >= 2
    _check_output(data)
    # the file is a recipe for `fastsample sample --recipe`
    run = CliRunner().invoke(main, ["sample", "--model", str(tiny_checkpoints["model"]),
                                    "--classifier", str(tiny_checkpoints["classifier"]),
                                    "--recipe", str(out), "--num-samples", "2", "--quiet",
                                    "--out", str(tmp_path / "s")])  # fmt: skip
    assert run.exit_code == 0, run.output


def test_tune_killed_then_rerun_continues(tiny_checkpoints, ref_npz, tmp_path):
    out = tmp_path / "r.json"
    args = [sys.executable, "-m", "fastsample", *_args(tiny_checkpoints, ref_npz, out, "20s")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = tmp_path / "r.json.tune" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.is_file() and len(json.loads(state.read_text())["points"]) >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads(state.read_text())
    assert before["spent_s"] > 0 and not out.exists()
    chunks = sorted((tmp_path / "r.json.tune" / "samples").rglob("*.npz"))
    stamps = {c: c.stat().st_mtime_ns for c in chunks}
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    after = json.loads(state.read_text())
    assert after["spent_s"] >= before["spent_s"]
    for c, stamp in stamps.items():  # what was made before the kill is kept, not redone
        assert c.stat().st_mtime_ns == stamp
    for key, point in before["points"].items():
        for n, fig in point["rungs"].items():
            assert after["points"][key]["rungs"][n]["fid"] == fig["fid"]
    resumed = json.loads(out.read_text())
    _check_output(resumed)
    # the same figures as an uninterrupted tune (same seeds): the reference's
    fresh = tmp_path / "fresh.json"
    solo = CliRunner().invoke(main, _args(tiny_checkpoints, ref_npz, fresh, "5s"))
    assert solo.exit_code == 0, solo.output

    def ref_fid(data):
        figs = next(p for p in data["points"] if p["recipe"]["name"] == "reference")["figures"]
        return {n: (f["fid"], f["precision"], f["recall"]) for n, f in figs.items()}

    # (float64 statistics summed by another thread count: equal to ~1e-9, not bit for bit)
    a, b = ref_fid(json.loads(fresh.read_text())), ref_fid(resumed)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n] == pytest.approx(b[n], rel=1e-7, abs=1e-9)


def test_other_settings_in_the_state_are_refused(tiny_checkpoints, ref_npz, tmp_path):
    out = tmp_path / "r.json"
    state = tmp_path / "r.json.tune"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"format": "fastsample-tune-state/1",
                                                  "settings": {"seed": 99}, "points": {}}))
    result = CliRunner().invoke(main, _args(tiny_checkpoints, ref_npz, out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize(
    "option, value, message",
    [("--budget", "20", "expected a duration"), ("--budget", "-5m", "expected a duration"),
     ("--within", "ten", "expected a share"), ("--target", "fid", "metric=value"),
     ("--target", "speed=3", "metric=value"), ("--samples", "0", "positive integer"),
     ("--ref", "/nonexistent.npz", "no such file"),
     ("--target", "accuracy=0.9", "only the judge extractor measures accuracy"),
     ("--samples", "10", "expected at least 20")],
)  # fmt: skip
def test_bad_options_are_one_line(tiny_checkpoints, ref_npz, tmp_path, option, value, message):
    args = _args(tiny_checkpoints, ref_npz, tmp_path / "r.json")
    i = args.index(option) if option in args else len(args)
    args = args[:i] + [option, value] + args[i + 2:] if option in args else args + [option, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


@settings(max_examples=50, deadline=None)
@given(st.floats(0.5, 1e4), st.sampled_from(["s", "m", "h"]))
def test_budget_units(value, unit):
    assert parse_budget(f"{value}{unit}") == pytest.approx(value * {"s": 1, "m": 60,
                                                                    "h": 3600}[unit])  # fmt: skip


def test_target_semantics():
    t = parse_target("fid=10,accuracy=0.9", None)
    ref = {"fid": 20.0, "accuracy": 0.9}
    assert t.meets({"fid": 9.9, "accuracy": 0.91}, ref, ref, full=True)
    assert not t.meets({"fid": 10.1, "accuracy": 0.91}, ref, ref, full=True)
    assert not t.meets({"fid": 9.0, "accuracy": 0.89}, ref, ref, full=True)
    assert t.meets({"fid": 9.0, "accuracy": 0.89}, ref, ref, full=False)  # the noise margin
    w = parse_target(None, "10%")
    assert w == Target(0.1, ()) and parse_target(None, None) == Target(0.1, ())
    assert w.meets({"fid": 21.9}, ref, ref, True) and not w.meets({"fid": 22.1}, ref, ref, True)
    with pytest.raises(InputError, match="does not measure"):
        parse_target("accuracy=0.5", None).meets({"fid": 1.0}, ref, ref, True)


def test_moves_change_one_knob_each():
    rec = Recipe("ddpm", "14", guidance_scale=2.0, guidance_every=2, cache_interval=2)
    cheaper, better = moves(rec, 1000, ("bf16",))
    for m in cheaper + better:
        changed = [k for k, v in m.knobs().items() if v != rec.knobs()[k]]
        assert len(changed) == 1, (m, changed)
    assert {m.knobs()["steps"] for m in cheaper} >= {"12"}
    assert any(m.guidance_every == 3 for m in cheaper) and any(m.dtype == "bf16" for m in cheaper)
    assert any(m.guidance_every == 1 for m in better) and any(m.steps == "16" for m in better)
