"""The Triton kernels against eager torch and torch.compile at ADM-256's real shapes (CUDA).

    python -m bench.kernels [--batch 4] [--dtype fp16] [--json FILE] [--markdown FILE]

GroupNorm + scale-shift + SiLU forward on the UNet's feature maps ([B, 256..1024 channels,
8..256 pixels square]): the fused kernel, the eager reference (GroupNorm in float32, multiply-add,
SiLU as separate ops) and torch.compile of that reference. Attention forward at T = 64, 256, 1024
(head dim 64): the kernel, the reference's einsum attention, and torch's
scaled_dot_product_attention on the same qkv views. Times are medians over CUDA-event-timed runs
after warm-up (triton.testing.do_bench); GB/s counts the fewest bytes the op must move (input
read once, output written once) against the card's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import commit, report

# (channels, side) of ADM-256's GroupNorms, from the 256x256 level down to 8x8.
GN_SHAPES = [(256, 256), (256, 128), (512, 64), (512, 32), (1024, 16), (1024, 8)]
# (tokens, channels) of its attention blocks (32x32, 16x16, 8x8), head dim 64.
ATTN_SHAPES = [(1024, 512), (256, 1024), (64, 1024)]


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--markdown", help="append a markdown table here (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels times CUDA kernels: no CUDA device here")
    from fastsample.kernels.attention import attention, attention_reference
    from fastsample.kernels.group_norm import group_norm, group_norm_reference

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    bandwidth = _copy_bandwidth()
    card = torch.cuda.get_device_name()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    compiled_ref = torch.compile(group_norm_reference)
    for channels, side in GN_SHAPES:
        b = args.batch
        x = torch.randn(b, channels, side, side, device="cuda", generator=gen).to(dtype)
        w = torch.randn(channels, device="cuda", generator=gen)
        bias = torch.randn(channels, device="cuda", generator=gen)
        sc = (torch.randn(b, channels, device="cuda", generator=gen) * 0.1).to(dtype)
        sh = torch.randn(b, channels, device="cuda", generator=gen).to(dtype)
        args_ = (x, 32, w, bias, 1e-5, sc, sh, True)
        ref = group_norm_reference(*args_)
        out = group_norm(x, 32, w, bias, scale=sc, shift=sh, silu=True)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t_kernel = _bench(lambda: group_norm(x, 32, w, bias, scale=sc, shift=sh, silu=True))  # noqa: B023
        t_eager = _bench(lambda: group_norm_reference(*args_))  # noqa: B023
        t_compile = _bench(lambda: compiled_ref(*args_))  # noqa: B023
        gbs = 2 * x.numel() * size / (t_kernel * 1e-3) / 1e9
        rows.append({
            "op": "groupnorm+ss+silu fwd", "shape": f"{b}x{channels}x{side}x{side}",
            "kernel_ms": t_kernel, "eager_ms": t_eager, "compile_ms": t_compile,
            "GB/s": gbs, "of_bandwidth": gbs / bandwidth, "rel_err": err,
        })  # fmt: skip
    for tokens, channels in ATTN_SHAPES:
        b, heads = args.batch, channels // 64
        qkv = torch.randn(b, 3 * channels, tokens, device="cuda", generator=gen).to(dtype)
        q, k, v = qkv.reshape(b, heads, 3, 64, tokens).unbind(2)  # legacy layout

        def sdpa(q=q, k=k, v=v, b=b, channels=channels, tokens=tokens):
            o = F.scaled_dot_product_attention(
                q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
            )
            return o.transpose(-1, -2).reshape(b, channels, tokens)

        ref = attention_reference(qkv, heads, "legacy")
        out = attention(qkv, heads, "legacy")
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t_kernel = _bench(lambda: attention(qkv, heads, "legacy"))  # noqa: B023
        t_eager = _bench(lambda: attention_reference(qkv, heads, "legacy"))  # noqa: B023
        t_sdpa = _bench(sdpa)
        moved = (qkv.numel() + out.numel()) * size
        gbs = moved / (t_kernel * 1e-3) / 1e9
        rows.append({
            "op": "attention fwd (D=64)", "shape": f"{b}x{channels}, T={tokens}",
            "kernel_ms": t_kernel, "eager_ms": t_eager, "compile_ms": None, "sdpa_ms": t_sdpa,
            "GB/s": gbs, "of_bandwidth": gbs / bandwidth, "rel_err": err,
        })  # fmt: skip

    header = (
        f"card: {card}; copy bandwidth {bandwidth:.0f} GB/s; dtype {args.dtype}; "
        f"torch {torch.__version__}; commit {commit()}"
    )
    lines = [
        header,
        "",
        "| op | shape | kernel ms | eager ms | x eager | torch.compile ms | x compile | SDPA ms "
        "| x SDPA | GB/s | of copy BW | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def ratio(base, r=r):
            return f"{base / r['kernel_ms']:.2f}" if base else ""

        lines.append(
            f"| {r['op']} | {r['shape']} | {r['kernel_ms']:.4f} | {r['eager_ms']:.4f} | "
            f"{ratio(r['eager_ms'])} | {r['compile_ms'] or 0:.4f} | {ratio(r['compile_ms'])} | "
            f"{r.get('sdpa_ms') or 0:.4f} | {ratio(r.get('sdpa_ms'))} | {r['GB/s']:.0f} | "
            f"{r['of_bandwidth'] * 100:.0f}% | {r['rel_err']:.1e} |"
        )
    report("kernels", lines, header, rows, args.json, args.markdown)


if __name__ == "__main__":
    main()
