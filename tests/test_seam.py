"""The seams between layers: networks -> (model, guidance) functions -> solvers -> kernels.

What is checked here is structure the other tests take for granted: the kernels import alone,
every solver provides the tables its kernel branch reads, the engine leaves the caller's
networks alone, the renamed keywords still work (with a warning)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import fastsample
from conftest import ROOT, rel_err
from fastsample import errors, netfns
from fastsample import sampler as solvers
from fastsample.engine import prepared_copy
from fastsample.schedule import Diffusion


def test_kernels_import_without_the_core():
    code = (
        "import sys, fastsample.kernels.attention, fastsample.kernels.group_norm, "
        "fastsample.kernels.sampler_step, fastsample.kernels.reference\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastsample.') "
        "and 'kernels' not in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip())  # a printed list of module names
    heavy = {"pipeline", "sampling", "checkpoint", "unet", "layers", "sampler", "engine", "ops"}
    assert not {m.split(".")[1] for m in loaded} & heavy, loaded
    for path in (ROOT / "kernels").glob("*.py"):
        text = path.read_text()
        assert "from fastsample" not in text and "import fastsample" not in text, path.name


def test_every_solver_provides_what_its_kernel_branch_reads():
    from fastsample.kernels import sampler_step

    assert set(solvers.SOLVERS) == set(sampler_step.SOLVER_IDS)
    d = Diffusion(noise_schedule="cosine", timestep_respacing="ddim5")
    for name, solver in solvers.SOLVERS.items():
        tables = solver.tables(d, torch.device("cpu"), 0.3)
        wanted = {*sampler_step.COMMON, *sampler_step.READS[name]}
        assert wanted <= set(tables), (name, wanted - set(tables))
        assert set(tables) - {"t_model", "alphas_cumprod", "alphas_cumprod_prev"} <= set(
            sampler_step.TABLES
        ), name
        for key, table in tables.items():
            assert table.shape == (d.num_steps,), (name, key)
            assert table.dtype == (torch.int64 if key == "t_model" else torch.float32), key


def test_the_loop_hands_the_update_its_history_and_unscaled_gradient():
    """A recording update: DPM-Solver++(2M) gets one zeroed buffer for the whole run, the
    gradient unscaled with the scale beside it, and no noise."""
    d = Diffusion(learn_sigma=False, timestep_respacing="4")
    seen = []

    def update(tab, i, x, out, grad, scale, z, history, spec):
        seen.append((i, grad, scale, z, history, history.clone()))
        return solvers.dpmpp_2m_update(tab, i, x, out, grad, scale, z, history, spec)

    def model(x, t):
        return torch.full_like(x, 0.1)

    def guidance(x, t):
        return torch.ones_like(x)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    want = solvers.run("dpm++2m", model, d, lambda k: x_T, guidance=guidance, guidance_scale=3.0)
    got = solvers.run(
        "dpm++2m", model, d, lambda k: x_T, guidance=guidance, guidance_scale=3.0, update=update
    )
    assert torch.equal(got, want)
    assert [i for i, *_ in seen] == [3, 2, 1, 0]
    assert all(torch.equal(g, torch.ones_like(x_T)) and s == 3.0 and z is None
               for _, g, s, z, _, _ in seen)  # fmt: skip
    buffers = {id(h) for *_, h, _ in seen}
    assert len(buffers) == 1 and not seen[0][5].any()  # one buffer, zeros before step one
    assert seen[1][5].any()  # it holds the previous x0 afterwards


def test_guidance_is_unscaled_and_scaled_once():
    clf = fastsample.create_model("demo-mnist-classifier")
    gen = torch.Generator().manual_seed(1)
    x, t, y = (
        torch.randn(2, 1, 32, 32, generator=gen),
        torch.tensor([10, 500]),
        torch.tensor([3, 4]),
    )
    grad = netfns.guidance_fn(clf, y)(x, t)
    # Central differences of log p(y | x) along a random direction (float32: a step of 1e-2
    # keeps rounding near 1e-5 and the truncation error of order 1e-4 of the slope).
    v = torch.randn(x.shape, generator=gen)

    def log_p(z):
        with torch.no_grad():
            return torch.log_softmax(clf(z, t), -1).gather(1, y[:, None]).sum()

    eps = 1e-2
    numeric = float((log_p(x + eps * v) - log_p(x - eps * v)) / (2 * eps))
    slope = float((grad * v).sum())
    assert abs(slope - numeric) < 2e-3 * max(1.0, abs(numeric)), (slope, numeric)
    assert rel_err(netfns.scaled(netfns.guidance_fn(clf, y), 2.5)(x, t), 2.5 * grad) < 1e-6


def test_prepared_copy_shares_weights_and_leaves_the_original():
    model = fastsample.create_model("demo-mnist").requires_grad_(True)
    before = {k: (v.data_ptr(), v.requires_grad, v.stride()) for k, v in model.named_parameters()}
    copy = prepared_copy(model, channels_last=True)
    after = {k: (v.data_ptr(), v.requires_grad, v.stride()) for k, v in model.named_parameters()}
    assert before == after
    params = dict(copy.named_parameters())
    for name, p in model.named_parameters():
        q = params[name]
        assert not q.requires_grad and torch.equal(p, q)
        if p.ndim != 4:  # channels_last re-lays only the 4-D weights
            assert q.data_ptr() == p.data_ptr(), name
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([7])
    with torch.no_grad():
        assert rel_err(copy(x, t, torch.tensor([2])), model(x, t, torch.tensor([2]))) < 1e-5


def test_renamed_keywords_warn_and_still_work():
    model = fastsample.create_model("demo-mnist").set_kernels("torch")
    d = Diffusion(timestep_respacing="2")
    common = dict(y=torch.tensor([1]), seed=[0], sampler="ddim")
    want = fastsample.sample(model, d, (1, 1, 32, 32), **common, runtime="eager")
    with pytest.warns(DeprecationWarning, match="backend= is renamed runtime="):
        got = fastsample.sample(model, d, (1, 1, 32, 32), **common, backend="eager")
    assert torch.equal(got, want)
    with pytest.warns(DeprecationWarning), pytest.raises(fastsample.InputError, match="runtime="):
        fastsample.sample(model, d, (1, 1, 32, 32), **common, runtime="aoti", backend="eager")
    with pytest.warns(DeprecationWarning, match="set_kernels"):
        model.set_backend("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = fastsample.Pipeline(model, d, runtime="eager", kernels="torch")
    assert pipe.runtime == pipe.backend == "eager"
    with pytest.raises(fastsample.InputError, match="runtime 'onnx'"):
        fastsample.Pipeline(model, d, runtime="onnx")


def test_errors_come_from_one_module():
    """(The classes and their builtins: tests/test_cli.py.) The export package re-uses them."""
    from fastsample.export import ExportError

    assert ExportError is errors.ExportError
    with pytest.raises(fastsample.FastsampleError):
        fastsample.sample(fastsample.create_model("demo-mnist"), Diffusion(), (1, 2, 32, 32))
