"""The fused sampler update (fastsample.kernels.sampler_step) against the eager updates, every
solver, guided and not, through the same loop (fastsample.sampler.run)."""

import pytest
import torch

from conftest import KERNEL_DEVICE, rel_err
from fastsample import Diffusion
from fastsample import sampler as samplers
from fastsample.engine import fused_update

pytestmark = pytest.mark.usefixtures("triton_kernels", "no_fma_contraction")

SHAPE = (2, 3, 5, 7)


def _stand_ins(learn_sigma: bool):
    """A smooth stand-in model and classifier gradient of (x, t)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE[1:], generator=gen).to(KERNEL_DEVICE)

    def model(x, t):
        eps = torch.tanh(x * w + t.float()[:, None, None, None] / 1000)
        if not learn_sigma:
            return eps
        return torch.cat([eps, torch.sin(x + w)], dim=1)  # variance values in [-1, 1]

    def guidance(x, t):
        return torch.cos(x * 0.7 - w) * (1 + t.float()[:, None, None, None] / 1000)

    return model, guidance


def _noise(steps: int):
    gen = torch.Generator().manual_seed(1)
    draws = torch.randn(steps + 1, *SHAPE, generator=gen).to(KERNEL_DEVICE)
    return lambda k: draws[k]


CASES = [
    ("ddim", 0.0, "cosine", "ddim6", True),
    ("ddim", 0.5, "linear", "8", False),
    ("ddpm", 0.0, "cosine", "6", True),
    ("ddpm", 0.0, "linear", "ddim5", False),
    ("dpm++2m", 0.0, "linear", "ddim7", True),
    ("dpm++3m", 0.0, "cosine", "7", True),
    ("dpm++2m-sde", 0.0, "linear", "6", False),
    ("unipc", 0.0, "linear", "ddim6", True),
    ("unipc3", 0.0, "cosine", "8", False),
    ("ipndm", 0.0, "linear", "7", True),
]


def test_linear_forms_agree_with_the_solvers():
    """The kernel's per-name layout is the solver module's (one source each, checked here)."""
    from fastsample.kernels.sampler_step import LINEAR_FORMS

    for name, solver in samplers.SOLVERS.items():
        if solver.form is None:
            assert name not in LINEAR_FORMS
            continue
        f = solver.form
        assert LINEAR_FORMS[name] == (f.slots, f.corrector, f.eps)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[3]}")
def test_fused_update_matches_eager_trajectory(case, guided):
    sampler, eta, schedule, spacing, learn_sigma = case
    d = Diffusion(noise_schedule=schedule, learn_sigma=learn_sigma, timestep_respacing=spacing)
    model, guidance = _stand_ins(learn_sigma)
    trajectories = {"eager": [], "fused": []}
    results = {}
    for name in trajectories:
        update = fused_update(KERNEL_DEVICE, sampler) if name == "fused" else None
        results[name] = samplers.run(
            sampler, model, d, _noise(d.num_steps), guidance=guidance if guided else None,
            guidance_scale=1.7 if guided else 0.0, eta=eta, update=update,
            callback=lambda k, x, x0, name=name: trajectories[name].append((x.clone(), x0.clone())),
        )  # fmt: skip
    assert len(trajectories["fused"]) == len(trajectories["eager"]) == d.num_steps
    for k, ((x, x0), (x_want, x0_want)) in enumerate(
        zip(trajectories["fused"], trajectories["eager"], strict=True)
    ):
        assert rel_err(x, x_want) < 1e-5, ("x", k)
        assert rel_err(x0, x0_want) < 1e-5, ("x0", k)
    assert rel_err(results["fused"], results["eager"]) < 1e-5
