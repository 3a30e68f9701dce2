"""Per-step sampler overhead: everything a step does except the networks, as a share of a step.

    python -m bench.sampler [--preset 64x64_diffusion] [--batch 1] [--steps 25] [--threads 2]

One process, random weights (never zeros), the preset's shapes, fp32 on CPU. The networks'
own time per step is measured directly (UNet forward; classifier input gradient). Each sampler
loop then runs with stand-ins that return those networks' precomputed outputs instantly: its time
per step is the overhead (coefficient gathers, x0 and variance maths, noise draws, updates).
Share = overhead / (overhead + networks).
"""

from __future__ import annotations

import argparse
import json

import torch

import fastsample
from bench.common import commit, median_seconds, randomize
from fastsample import sampler as samplers
from fastsample.netfns import guidance_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="64x64_diffusion")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", default="ddim25", help="respacing spec")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the stand-in loops")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    preset = fastsample.presets[args.preset]
    model = randomize(fastsample.create_model(args.preset, dtype=torch.float32), 0)
    cfg = model.config
    classifier = None
    if preset.classifier:
        classifier = randomize(fastsample.create_model(preset.classifier), 1)
    diffusion = preset.diffusion.respaced(args.steps)
    n = diffusion.num_steps
    shape = (args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = torch.randn(shape)
    y = torch.randint(0, cfg.num_classes or 1000, (args.batch,))
    t = torch.full((args.batch,), 500)

    # The networks' own time per step (median of a few calls).
    with torch.no_grad():
        out = model(x, t, y if cfg.num_classes else None)
        unet_s = median_seconds(lambda: model(x, t, y if cfg.num_classes else None), 2)
    guide = guidance_fn(classifier, y) if classifier is not None else None
    grad_s = median_seconds(lambda: guide(x, t), 2) if guide is not None else 0.0
    grad = guide(x, t) if guide is not None else None

    def stand_in_net(x_t, t_):
        return out

    def stand_in_guide(x_t, t_):
        return grad

    def noise(k):
        return torch.randn(shape)

    commit_id = commit()
    print(
        f"CPU x{args.threads} threads | torch {torch.__version__} | fp32 | {args.preset} "
        f"batch {args.batch}, {args.steps} ({n} steps) | commit {commit_id}"
    )
    print(f"networks per step: UNet {unet_s * 1e3:,.1f} ms, classifier gradient ", end="")
    print(f"{grad_s * 1e3:,.1f} ms")
    print(f"{'sampler':<18} {'overhead ms/step':>16} {'step ms':>10} {'overhead share':>15}")
    rows = []
    for name in samplers.SAMPLERS:
        for guided in (False, True) if guide is not None else (False,):
            g = stand_in_guide if guided else None
            loop_s = median_seconds(
                lambda name=name, g=g: samplers.run(
                    name, stand_in_net, diffusion, noise, guidance=g, guidance_scale=1.0
                ),
                args.repeats,
            )
            overhead = loop_s / n
            step = overhead + unet_s + (grad_s if guided else 0.0)
            label = name + (" +guidance" if guided else "")
            rows.append(
                {
                    "sampler": label,
                    "overhead_ms": overhead * 1e3,
                    "step_ms": step * 1e3,
                    "share": overhead / step,
                }
            )
            print(
                f"{label:<18} {overhead * 1e3:>16.3f} {step * 1e3:>10.1f} {overhead / step:>14.3%}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
