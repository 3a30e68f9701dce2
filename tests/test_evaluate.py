"""Metric maths against closed forms and brute force; the eval command on small .npz files."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from fastsample.cli import main
from fastsample.evaluate import (
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    statistics,
)


def test_frechet_distance_of_gaussians_with_known_moments():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    # Commuting covariances Q diag(a) Q^T and Q diag(b) Q^T: sum (sqrt a - sqrt b)^2 in closed form.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # One dimension: (mu1 - mu2)^2 + (std1 - std2)^2.
    assert frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9 + 1, rel=1e-12)
    # Non-commuting: tr sqrt(S1 S2) from the eigenvalues of the non-symmetric product itself.
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_statistics_use_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = statistics(x)
    assert np.allclose(mu, [2, 4])
    assert np.allclose(sigma, [[4, 7], [7, 13]])  # N - 1 normalisation


def test_inception_score_of_one_hot_and_uniform_predictions():
    one_hot = np.full((1000, 10), -1e3)
    one_hot[np.arange(1000), np.arange(1000) % 10] = 0.0
    assert inception_score(one_hot) == pytest.approx(10.0, rel=1e-9)
    assert inception_score(np.zeros((1000, 10))) == pytest.approx(1.0, rel=1e-12)
    one_class = np.full((1000, 10), -1e3)
    one_class[:, 3] = 0.0  # confident but never diverse
    assert inception_score(one_class) == pytest.approx(1.0, rel=1e-9)


def _brute_force_pr(ref, samples, k=3):
    def radii(points):
        out = []
        for p in points:
            d = sorted(((points - p) ** 2).sum(axis=1))
            out.append(d[k])  # d[0] is the point itself
        return np.array(out)

    rr, rs = radii(ref), radii(samples)
    precision = np.mean(
        [any(((s - r) ** 2).sum() <= rr[j] for j, r in enumerate(ref)) for s in samples]
    )
    recall = np.mean(
        [any(((r - s) ** 2).sum() <= rs[j] for j, s in enumerate(samples)) for r in ref]
    )
    return precision, recall


def test_precision_recall_identical_disjoint_and_brute_force():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 4))
    assert precision_recall(ref, ref.copy()) == (1.0, 1.0)
    far = rng.normal(size=(50, 4)) + 100.0
    assert precision_recall(ref, far) == (0.0, 0.0)
    samples = rng.normal(size=(40, 4)) * 1.5 + 0.5
    got = precision_recall(ref, samples, batch=7)  # odd batches exercise the blocking
    assert got == pytest.approx(_brute_force_pr(ref, samples), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert np.allclose(manifold_radii(ref, batch=9), manifold_radii(ref))


def _write_npz(path, images, labels=None):
    arrays = [images] + ([labels] if labels is not None else [])
    np.savez(path, *arrays)
    return str(path)


def test_eval_command_on_two_small_npz_files(tmp_path):
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    same = _write_npz(tmp_path / "same.npz", ref)
    ref_path = _write_npz(tmp_path / "ref.npz", ref)
    result = CliRunner().invoke(main, ["eval", same, "--ref", ref_path, "--extractor", "pixels"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("extractor: pixels (40 samples vs 40 reference, reference statis")
    values = dict(line.split(": ", 1) for line in lines[1:])
    assert abs(float(values["FID"])) < 1e-6 and float(values["Precision"]) == 1.0
    assert float(values["Recall"]) == 1.0
    other = _write_npz(tmp_path / "other.npz", 255 - ref)
    result = CliRunner().invoke(main, ["eval", other, "--ref", ref_path, "--extractor", "pixels"])
    values = dict(line.split(": ", 1) for line in result.output.splitlines()[1:])
    assert float(values["FID"]) > 1.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "missing.npz", "--extractor", "pixels"], "missing.npz: no such file"),
        (["eval", "{bad}", "--extractor", "pixels"], "not a readable .npz"),
        (["eval", "{ok}", "--extractor", "nope"], "extractor 'nope'"),
        (["eval", "{ok}", "--extractor", "os:nothing_here"], "cannot be imported"),
    ],
)
def test_eval_refuses_bad_input_in_one_line(tmp_path, args, message):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    ok = _write_npz(tmp_path / "ok.npz", np.zeros((5, 8, 8, 3), dtype=np.uint8))
    args = [a.format(bad=bad, ok=ok) for a in args]
    result = CliRunner().invoke(main, [*args, "--ref", ok])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_help_names_the_extractor_caveat():
    result = CliRunner().invoke(main, ["eval", "--help"])
    assert "not comparable" in result.output and "Inception-v3" in result.output
