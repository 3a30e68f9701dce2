"""The fused sampler update against the eager loops, every sampler, guided and not."""

import pytest
import torch
from _helpers import DEVICE, rel_err

from fastsample import Diffusion
from fastsample import sampler as samplers
from fastsample.engine import fused_loop

SHAPE = (2, 3, 5, 7)


def _stand_ins(learn_sigma: bool):
    """A smooth stand-in network and classifier gradient of (x, t)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE[1:], generator=gen).to(DEVICE)

    def net(x, t):
        eps = torch.tanh(x * w + t.float()[:, None, None, None] / 1000)
        if not learn_sigma:
            return eps
        return torch.cat([eps, torch.sin(x + w)], dim=1)  # variance values in [-1, 1]

    def grad(x, t):
        return torch.cos(x * 0.7 - w) * (1 + t.float()[:, None, None, None] / 1000)

    return net, grad


def _noise(steps: int):
    gen = torch.Generator().manual_seed(1)
    draws = torch.randn(steps + 1, *SHAPE, generator=gen).to(DEVICE)
    return lambda k: draws[k]


pytestmark = pytest.mark.usefixtures("no_fma_contraction")


CASES = [
    ("ddim", 0.0, "cosine", "ddim6", True),
    ("ddim", 0.5, "linear", "8", False),
    ("ddpm", 0.0, "cosine", "6", True),
    ("ddpm", 0.0, "linear", "ddim5", False),
    ("dpm++2m", 0.0, "linear", "ddim7", True),
]


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[3]}")
def test_fused_loop_equals_eager(case, guided):
    sampler, eta, schedule, spacing, learn_sigma = case
    d = Diffusion(noise_schedule=schedule, learn_sigma=learn_sigma, timestep_respacing=spacing)
    net, grad = _stand_ins(learn_sigma)
    scale = 1.7 if guided else 0.0
    eager_traj, fused_traj = [], []
    guide = (lambda x, t: grad(x, t) * scale) if guided else None
    want = samplers.run(
        sampler, net, d, _noise(d.num_steps), eta=eta, guide=guide,
        callback=lambda k, x, x0: eager_traj.append((x.clone(), x0.clone())),
    )  # fmt: skip
    got = fused_loop(
        sampler, net, d, _noise(d.num_steps), eta=eta, grad=grad if guided else None,
        guidance_scale=scale, callback=lambda k, x, x0: fused_traj.append((x.clone(), x0.clone())),
    )  # fmt: skip
    assert len(fused_traj) == len(eager_traj) == d.num_steps
    for k, ((xa, x0a), (xb, x0b)) in enumerate(zip(fused_traj, eager_traj, strict=True)):
        assert rel_err(xa, xb) < 1e-5, ("x", k)
        assert rel_err(x0a, x0b) < 1e-5, ("x0", k)
    assert rel_err(got, want) < 1e-5
