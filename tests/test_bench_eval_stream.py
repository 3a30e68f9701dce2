"""bench.eval_stream at a tiny size: the files it writes read back as written, and its row's
figures are the eval's own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import eval_stream
from fastsample.evaluate import evaluate
from fastsample.imagesource import open_images


def test_streamed_samples_file_holds_the_drawn_images(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_stream, "CHUNK", 3)  # several chunks, the last one short
    eval_stream.write_stored_npz(tmp_path / "s.npz", 7, 5, seed=11)
    rng = np.random.default_rng(11)
    drawn = [rng.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8) for n in (3, 3, 1)]
    with open_images(tmp_path / "s.npz") as source:
        np.testing.assert_array_equal(source.read_all(), np.concatenate(drawn))
    with np.load(tmp_path / "s.npz") as data:  # numpy reads it too
        np.testing.assert_array_equal(data["arr_0"], np.concatenate(drawn))


def test_tiny_run_reports_the_evals_figures(tmp_path):
    """Also: the peak is the child's, not this process's (here 2 GiB of ballast, touched)."""
    ballast = np.ones(2**28, np.float64)
    out = tmp_path / "rows.json"
    eval_stream.main(["--samples", "6", "--ref-count", "5", "--size", "64", "--workdir",
                      str(tmp_path), "--json", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["samples"], row["ref"], row["size"]) == (6, 5, 64)
    assert 100 < row["peak_rss_mib"] < 2000 and row["wall_s"] > 0
    del ballast
    assert row["images_per_s"] == pytest.approx(11 / row["wall_s"], rel=0.01)
    # The same files in this process give the FID the child printed: to fp32's 1e-5 relative,
    # since the child's thread count (2) may differ from this process's, which changes the
    # convolutions' summation order (2e-7 relative measured under pytest -n 2).
    eval_stream.random_inception(tmp_path / "w.pth", seed=0)
    eval_stream.write_stored_npz(tmp_path / "s.npz", 6, 64, seed=2 + 6)
    ref = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    report = evaluate(tmp_path / "s.npz", ref, extractor="inception",
                      inception_weights=tmp_path / "w.pth", device="cpu")  # fmt: skip
    assert row["fid"] == pytest.approx(report.fid, rel=1e-5)


@pytest.mark.parametrize("args", [["--samples", "0"], ["--samples", "ten"], ["--size", "0"]])
def test_bad_options_are_refused(args, capsys):
    with pytest.raises(SystemExit) as e:
        eval_stream.main(args)
    assert e.value.code == 2 and args[1] in capsys.readouterr().err
