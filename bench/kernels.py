"""The Triton kernels against eager torch, torch.compile and SDPA at ADM-256's real shapes and
the layouts the fast engine runs (CUDA).

    python -m bench.kernels [--batch 16] [--dtype fp16] [--json FILE] [--markdown FILE]

GroupNorm + scale-shift + SiLU forward on the UNet's feature maps ([B, 256..1024 channels,
8..256 pixels square]) in NCHW and in channels_last (the engine's layout, where the kernel's
loads are strided), and the attention blocks' plain GroupNorm on the [B, C, T] views of
channels_last maps that the engine passes. Each row times what `fastsample.ops` runs on the
triton backend (the kernel, or the reference where the kernel does not take the input: the row
says which), the eager reference (GroupNorm in float32, multiply-add, SiLU as separate ops) and
torch.compile of that reference. Attention forward at T = 64, 256, 1024 (head dim 64): the
kernel on the fused [B, 3*H*D, T] projection, the reference's einsum attention, and torch's
scaled_dot_product_attention on contiguous [B, H, T, D] q, k, v (the copy into that layout is
made before timing; the "SDPA+copy" column times it too). Times are medians over CUDA-event-
timed runs after warm-up (triton.testing.do_bench); GB/s counts the fewest bytes the op must
move (input read once, output written once) against the card's copy bandwidth measured in the
same run.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from bench.common import commit, report

# (channels, side) of ADM-256's GroupNorms, from the 256x256 level down to 8x8.
GN_SHAPES = [(256, 256), (256, 128), (512, 64), (512, 32), (1024, 16), (1024, 8)]
# (tokens, channels) of its attention blocks (32x32, 16x16, 8x8), head dim 64.
ATTN_SHAPES = [(1024, 512), (256, 1024), (64, 1024)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"
# --smoke: the same code on the CPU under TRITON_INTERPRET=1 at tiny shapes (no timings worth
# reading, no torch.compile), so that a mistake here shows before a GPU is lent.
SMOKE_GN_SHAPES = [(64, 8), (64, 4)]
SMOKE_ATTN_SHAPES = [(16, 128)]


def _bench(fn) -> float:
    if DEVICE != "cuda":
        from bench.common import median_seconds

        return median_seconds(fn, 2) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(1 << (28 if DEVICE == "cuda" else 20), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--markdown", help="append a markdown table here (e.g. bench/RESULTS.md)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _group_norm_rows(b, dtype, size, bandwidth, gen) -> list[dict]:
    from fastsample import ops
    from fastsample.kernels.group_norm import group_norm_reference, supports

    compiled_ref = None
    if DEVICE == "cuda":
        # One compiled function over every row's shape, layout and None-ness: raise the limit
        # so that no row silently falls back to eager (dynamo's default allows 8 recompiles).
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        compiled_ref = torch.compile(group_norm_reference)
    cases = []
    for channels, side in GN_SHAPES:  # ResBlock norms: scale-shift + SiLU, NCHW / channels_last
        for layout in ("nchw", "channels_last"):
            cases.append(("groupnorm+ss+silu", channels, side, layout, True))
    for tokens, channels in ATTN_SHAPES:  # attention norms: [B, C, T] views of channels_last
        side = int(tokens**0.5)
        cases.append(("attn groupnorm [B,C,T]", channels, side, "channels_last view", False))
    rows = []
    for op, channels, side, layout, ss in cases:
        x = torch.randn(b, channels, side, side, device=DEVICE, generator=gen).to(dtype)
        if layout != "nchw":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "channels_last view":
            x = x.reshape(b, channels, side * side)  # what AttentionBlock passes its norm
        w = torch.randn(channels, device=DEVICE, generator=gen)
        bias = torch.randn(channels, device=DEVICE, generator=gen)
        sc = torch.randn(b, channels, device=DEVICE, generator=gen) * 0.1 if ss else None
        sc = sc.to(dtype) if ss else None
        sh = torch.randn(b, channels, device=DEVICE, generator=gen).to(dtype) if ss else None
        args = (x, 32, w, bias, 1e-5, sc, sh, ss)

        def fast(x=x, w=w, bias=bias, sc=sc, sh=sh, ss=ss):
            return ops.group_norm(x, 32, w, bias, scale=sc, shift=sh, silu=ss, kernels="triton")

        err = _rel(fast(), group_norm_reference(*args))
        t_fast = _bench(fast)
        t_eager = _bench(lambda args=args: group_norm_reference(*args))
        t_compile = _bench(lambda args=args: compiled_ref(*args)) if compiled_ref else None
        gbs = 2 * x.numel() * size / (t_fast * 1e-3) / 1e9
        rows.append({
            "op": op, "shape": "x".join(map(str, x.shape)), "layout": layout,
            "path": "kernel" if supports(x, 32) else "reference (kernel does not take it)",
            "kernel_ms": t_fast, "eager_ms": t_eager, "compile_ms": t_compile, "sdpa_ms": None,
            "sdpa_copy_ms": None, "GB/s": gbs, "of_bandwidth": gbs / bandwidth, "rel_err": err,
        })  # fmt: skip
    return rows


def _attention_rows(b, dtype, size, bandwidth, gen) -> list[dict]:
    from fastsample.kernels.attention import attention, attention_reference

    rows = []
    for tokens, channels in ATTN_SHAPES:
        heads = channels // 64
        qkv = torch.randn(b, 3 * channels, tokens, device=DEVICE, generator=gen).to(dtype)
        # legacy layout: per head q, k, v rows; [B, H, T, D] contiguous copies for SDPA
        views = qkv.reshape(b, heads, 3, 64, tokens).unbind(2)
        q, k, v = (t.transpose(-1, -2).contiguous() for t in views)

        def sdpa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D), ADM's

        def sdpa_copy(views=views):
            q, k, v = (t.transpose(-1, -2).contiguous() for t in views)
            return F.scaled_dot_product_attention(q, k, v)

        ref = attention_reference(qkv, heads, "legacy")
        out = attention(qkv, heads, "legacy")
        err = _rel(out, ref)
        sdpa_err = _rel(sdpa().transpose(-1, -2).reshape(b, channels, tokens), ref)
        t_kernel = _bench(lambda qkv=qkv, heads=heads: attention(qkv, heads, "legacy"))
        t_eager = _bench(lambda qkv=qkv, heads=heads: attention_reference(qkv, heads, "legacy"))
        moved = (qkv.numel() + out.numel()) * size
        gbs = moved / (t_kernel * 1e-3) / 1e9
        rows.append({
            "op": "attention fwd (D=64)", "shape": f"{b}x{channels}, T={tokens}",
            "layout": "qkv [B,3C,T]", "path": "kernel", "kernel_ms": t_kernel,
            "eager_ms": t_eager, "compile_ms": None, "sdpa_ms": _bench(sdpa),
            "sdpa_copy_ms": _bench(sdpa_copy), "GB/s": gbs, "of_bandwidth": gbs / bandwidth,
            "rel_err": err, "sdpa_rel_err": sdpa_err,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    global DEVICE, GN_SHAPES, ATTN_SHAPES
    args = parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench.kernels --smoke runs under TRITON_INTERPRET=1")
        DEVICE, GN_SHAPES, ATTN_SHAPES = "cpu", SMOKE_GN_SHAPES, SMOKE_ATTN_SHAPES
    elif not torch.cuda.is_available():
        raise SystemExit("bench.kernels times CUDA kernels: no CUDA device here")
    dtype = DTYPES[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    bandwidth = _copy_bandwidth()
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreted smoke run)"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = _group_norm_rows(args.batch, dtype, size, bandwidth, gen)
    rows += _attention_rows(args.batch, dtype, size, bandwidth, gen)
    header = (
        f"card: {card}; copy bandwidth {bandwidth:.0f} GB/s; dtype {args.dtype}; batch "
        f"{args.batch}; torch {torch.__version__}; commit {commit()}"
    )
    lines = [
        header,
        "",
        "| op | shape | layout | path | ms | eager ms | x eager | torch.compile ms | x compile "
        "| SDPA ms | x SDPA | SDPA+copy ms | GB/s | of copy BW | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, fmt=".4f"):
        return "" if value is None else format(value, fmt)

    for r in rows:

        def ratio(base, r=r):
            return f"{base / r['kernel_ms']:.2f}" if base else ""

        lines.append(
            f"| {r['op']} | {r['shape']} | {r['layout']} | {r['path']} | {r['kernel_ms']:.4f} | "
            f"{r['eager_ms']:.4f} | {ratio(r['eager_ms'])} | {cell(r['compile_ms'])} | "
            f"{ratio(r['compile_ms'])} | {cell(r['sdpa_ms'])} | {ratio(r['sdpa_ms'])} | "
            f"{cell(r['sdpa_copy_ms'])} | {r['GB/s']:.0f} | {r['of_bandwidth'] * 100:.0f}% | "
            f"{r['rel_err']:.1e} |"
        )
    report("kernels", lines, header, rows, args.json, args.markdown)


if __name__ == "__main__":
    main()
