"""Compile every kernel configuration for a GPU target without a GPU, and read its resources.

    python -m fastsample.kernels.compile_check [--arch 90]

Triton compiles to PTX and a cubin on any machine; the cuobjdump bundled with Triton's NVIDIA
backend reports registers, stack, local memory (spills) and shared memory per kernel. This
catches compile failures, spills and shared-memory overflows before a GPU is at hand (the
interpreter checks the numerics, not the code generation).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 100: 227 * 1024}  # bytes per block (opt-in max)
_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


@dataclass
class Compiled:
    kernel: str
    config: str
    registers: int
    stack: int
    local: int
    shared: int  # bytes, static + dynamic

    def problems(self, arch: int) -> list[str]:
        """What would fail at launch: shared memory beyond the block limit."""
        if self.shared > SHARED_LIMIT.get(arch, 227 * 1024):
            return [f"shared memory {self.shared} B over the limit"]
        return []

    @property
    def spills(self) -> bool:
        """Registers spilled to the stack or local memory: slower, not wrong."""
        return bool(self.stack or self.local)

    def line(self) -> str:
        return (
            f"{self.kernel:<18} {self.config:<44} regs {self.registers:>3}  stack {self.stack:>3}"
            f"  local {self.local:>3}  shared {self.shared / 1024:6.1f} KiB"
        )


def _compile(
    fn,
    pointers: dict[str, str],
    floats: tuple[str, ...],
    constexprs: dict,
    num_warps: int,
    arch: int,
):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "i32" for name in fn.arg_names}
    signature.update(pointers)
    signature.update({name: "fp32" for name in floats})
    signature.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _resources(kernel, cubin: bytes) -> tuple[int, int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout

    def field(name):
        match = re.search(rf"{name}:(\d+)", text)
        return int(match.group(1)) if match else 0

    return field("REG"), field("STACK"), field("LOCAL")


def configurations():
    """(kernel name, config label, jit fn, pointer types, float args, constexprs, num_warps)."""
    from . import attention as A
    from . import group_norm as G

    for dtype in ("float32", "float16", "bfloat16"):
        ptr = _PTR[dtype]
        for ss in (True, False):
            flags = dict(HAS_W=True, HAS_B=True, HAS_SS=ss, SILU=ss)
            label = f"{dtype} {'scale-shift+silu' if ss else 'plain'}"
            fwd_ptrs = dict(
                X=ptr, Y=ptr, W="*fp32", B="*fp32", SCALE=ptr, SHIFT=ptr, MEAN="*fp32", RSTD="*fp32"
            )
            yield (
                "gn_forward",
                label,
                G._forward_kernel,
                fwd_ptrs,
                ("eps",),
                dict(flags, BLOCK=1024),
                4,
            )
            bwd_ptrs = dict(
                DY=ptr,
                X=ptr,
                W="*fp32",
                B="*fp32",
                SCALE=ptr,
                SHIFT=ptr,
                MEAN="*fp32",
                RSTD="*fp32",
                DX=ptr,
                DW="*fp32",
                DB="*fp32",
                DSCALE="*fp32",
                DSHIFT="*fp32",
            )
            yield (
                "gn_backward",
                label,
                G._backward_kernel,
                bwd_ptrs,
                (),
                dict(flags, BLOCK=1024),
                4,
            )
    for dtype in ("float16", "float32", "bfloat16"):
        ptr = _PTR[dtype]
        ieee = dtype == "float32"
        dims = (32, 64, 128, 192, 256) if dtype == "float16" else (64, 256)
        for d in dims:
            for backward in (False, True):
                bm, bn, bd, warps = A.launch_config(d, 4096, ieee, backward)
                meta = dict(IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
                label = f"{dtype} D={d} M{bm} N{bn} w{warps}"
                if not backward:
                    yield (
                        "attn_forward",
                        label,
                        A._forward_kernel,
                        dict(QKV=ptr, OUT=ptr, LSE="*fp32"),
                        ("sm_scale",),
                        meta,
                        warps,
                    )
                    continue
                grads = dict(QKV=ptr, DOUT=ptr, LSE="*fp32", DELTA="*fp32", DQKV=ptr)
                yield ("attn_dkdv", label, A._dkdv_kernel, grads, ("sm_scale",), meta, warps)
                yield ("attn_dq", label, A._dq_kernel, grads, ("sm_scale",), meta, warps)
        bm, bn, bd, warps = A.launch_config(64, 1, ieee)  # the attention pool: one query
        yield (
            "attn_forward",
            f"{dtype} D=64 one query M{bm}",
            A._forward_kernel,
            dict(QKV=ptr, OUT=ptr, LSE="*fp32"),
            ("sm_scale",),
            dict(IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd),
            warps,
        )


def _step_configurations():
    from . import sampler_step as S

    tables = (
        "SRA SRM1 S1M SQRT_AC_PREV DIR SIGMA COEF1 COEF2 MAX_LOG MIN_LOG FIXED RATIO LIN CUR PREV "
        "LX LZ LV0 LV1 LV2 LV3 CSELF CX CV0 CV1 CV2 CV3 GUIDE"
    )
    pointers = {name: "*fp32" for name in tables.split()}
    pointers.update(
        X="*fp32",
        OUT="*fp32",
        GRAD="*fp32",
        Z="*fp32",
        X0_PREV="*fp32",
        XN="*fp32",
        X0="*fp32",
        STEP="*i32",
    )
    for name, sampler in S.SOLVER_IDS.items():
        meta = dict(
            SAMPLER=sampler,
            GUIDED=True,
            CLIP=True,
            LEARN_SIGMA=True,
            PREDICT_XSTART=False,
            NOISE=name not in ("dpm++2m", "dpm++3m", "unipc", "unipc3", "ipndm"),
            BLOCK=1024,
        )
        slots, correct, hist_eps = S.LINEAR_FORMS.get(name, (0, False, False))
        # the guidance plan's per-step weight (guidance interval, every k-th step) with it
        meta.update(SLOTS=slots, CORRECT=correct, HIST_EPS=hist_eps, WEIGHTED=True)
        yield ("sampler_step", f"{name} guided", S._step_kernel, pointers, ("scale",), meta, 4)


def compile_all(arch: int = 90, log=lambda line: None, only: str = "") -> list[Compiled]:
    results = []
    for name, label, fn, pointers, floats, constexprs, warps in [
        *configurations(),
        *_step_configurations(),
    ]:
        if only and not name.startswith(only):
            continue
        kernel = _compile(fn, pointers, floats, constexprs, warps, arch)
        regs, stack, local = _resources(kernel, kernel.asm["cubin"])
        item = Compiled(name, label, regs, stack, local, int(kernel.metadata.shared))
        log(item.line())
        results.append(item)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    parser.add_argument("--only", default="", help="kernel name prefix (gn_, attn_, ...)")
    args = parser.parse_args()
    try:
        import triton
    except ImportError:
        raise SystemExit("compile_check needs Triton: pip install 'fastsample[triton]'") from None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        raise SystemExit(f"compile_check needs Triton's NVIDIA backend tools ({tool} is missing)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check compiles kernels: unset TRITON_INTERPRET")
    results = compile_all(args.arch, log=print, only=args.only)
    bad = [(r, p) for r in results for p in r.problems(args.arch)]
    for r, p in bad:
        print(f"PROBLEM {r.kernel} {r.config}: {p}")
    spilled = [r for r in results if r.spills]
    print(
        f"{len(results)} configurations compiled for sm_{args.arch}: {len(bad)} cannot launch, "
        f"{len(spilled)} spill registers"
    )
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
