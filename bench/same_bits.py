"""Do two commits sample the same bits? Run once per commit, then compare.

    python -m bench.same_bits --save a.pt        # at commit A (e.g. in a git worktree)
    python -m bench.same_bits --save b.pt        # at commit B
    python -m bench.same_bits --compare a.pt b.pt

It samples the reference's golden tiny UNet and classifier (tests/data/golden_tiny) with every
solver (DDPM, DDIM at eta 0 and 0.5, DPM-Solver++(2M)), linear and cosine schedules, guided and
not, seeded per sample, on one thread; and `Pipeline.generate` on the demo model with each
solver. --compare prints, per case, whether the tensors are equal and the largest difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_tiny"
CASES = [
    ("6", "ddpm", 0.0),
    ("ddim5", "ddim", 0.0),
    ("ddim5", "ddim", 0.5),
    ("ddim7", "dpm++2m", 0.0),
]


def samples() -> dict[str, torch.Tensor]:
    import fastsample
    from fastsample import Classifier, Diffusion, Pipeline, UNet, sample

    torch.set_num_threads(1)  # (how the golden data was made; fixes the summation order)
    cfg = json.loads((GOLDEN / "config.json").read_text())
    g = torch.load(GOLDEN / "golden.pt", weights_only=True)
    unet = UNet(**cfg["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    clf = Classifier(**cfg["classifier"])
    clf.load_state_dict(g["classifier_state_dict"])
    out, y = {}, torch.tensor([1, 3])
    for spacing, sampler, eta in CASES:
        for schedule in ("linear", "cosine"):
            d = Diffusion(noise_schedule=schedule, timestep_respacing=spacing)
            for scale in (0.0, 2.0):
                out[f"{sampler} eta={eta} {spacing} {schedule} scale={scale}"] = sample(
                    unet, d, (2, 3, 16, 16), y=y, sampler=sampler, eta=eta,
                    classifier=clf if scale else None, guidance_scale=scale, seed=[5, 6],
                )  # fmt: skip
    demo = fastsample.presets["demo-mnist"]
    pipe = Pipeline.from_pretrained("demo-mnist", demo.classifier)
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        images = pipe.generate(3, batch_size=2, steps="ddim6", sampler=sampler, seed=2,
                               progress=False).images  # fmt: skip
        out[f"Pipeline.generate demo {sampler}"] = torch.from_numpy(images)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="FILE")
    group.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    if args.save:
        torch.save(samples(), args.save)
        print(f"wrote {args.save}")
        return
    a, b = (torch.load(p, weights_only=True) for p in args.compare)
    if a.keys() != b.keys():
        raise SystemExit(f"different cases: {sorted(a.keys() ^ b.keys())}")
    same = 0
    for key in a:
        equal = torch.equal(a[key], b[key])
        diff = (a[key].double() - b[key].double()).abs().max().item()
        same += equal
        print(f"{key:<44} {'equal' if equal else 'DIFFERENT'}  max |diff| {diff:.3e}")
    print(f"{same} of {len(a)} cases bit-identical")
    raise SystemExit(0 if same == len(a) else 1)


if __name__ == "__main__":
    main()
