"""Compile every kernel for a CUDA target without a GPU (ahead of time, down to cubin).

The CPU interpreter runs kernels as numpy and misses what only the compiler
checks (non-constexpr globals, dot shapes and dtypes, layouts, shared memory).
This builds each kernel for ``--arch`` (default sm_90) with the wrappers' own
constexprs and prints its shared memory, so those errors show up on a CPU
machine too::

    python -m triton_kernels.compile_check            # preset layouts, ~2 min on 2 cores
    python -m triton_kernels.compile_check --quick    # one small layout

It needs ``TRITON_INTERPRET`` unset (under the interpreter the kernels are not
compilable objects) and the ``ptxas`` that ships with the triton wheel.
"""
from __future__ import annotations

import argparse
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zipcache_vllm.layout import BlockLayout

from . import kernels
from .ops import _attn_constexprs, _pow2, interpret_mode, layout_constexprs, token_tile

PRESET_LAYOUTS = [  # (B, D, Hk, hi, lo, n_hi): zipcache default, kivi3, a small mixed one
    (128, 128, 8, 4, 2, 58),
    (128, 128, 8, 3, 3, 0),
    (64, 64, 2, 3, 3, 20),
]
QUICK_LAYOUTS = [(64, 64, 2, 4, 2, 29)]


def _signature(fn, types: dict[str, str], consts: dict) -> dict[str, str]:
    return {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}


def _compile(fn, types: dict[str, str], consts: dict, target: GPUTarget, num_warps: int = 4,
             **options) -> int:
    t = time.time()
    src = ASTSource(fn, _signature(fn, types, consts), constexprs=consts)
    compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps, **options))
    shared = int(compiled.metadata.shared)
    print(f"  {fn.__name__:<28} ok  shared {shared / 1024:6.1f} KiB  ({time.time() - t:.1f}s)",
          flush=True)
    return shared


def check(layouts: list[tuple[int, ...]], arch: int) -> int:
    """Compiles all kernels for ``layouts``; returns the largest shared memory in bytes."""
    target = GPUTarget("cuda", arch, 32)
    out = f32 = "*fp32"
    worst = 0
    for B, D, H, hi, lo, n_hi in layouts:
        layout = BlockLayout(B, D, H, hi, lo, n_hi)
        print(f"layout B={B} D={D} Hk={H} bits={hi}/{lo} n_hi={n_hi}", flush=True)
        c = layout_constexprs(layout)
        ac = _attn_constexprs(layout)
        worst = max(worst, _compile(
            kernels.quantize_pack_kernel,
            dict(k_ptr="*bf16", v_ptr="*bf16", sal_ptr="*u8", c_ptr="*fp16", pages_ptr="*u8",
                 page_ids_ptr="*i64"),
            dict(c, OFF_MASK=layout.section("mask").offset, CONTENT=layout.content_bytes,
                 PAD_PAD=_pow2(max(1, layout.padding_bytes))),
            target, num_warps=8, enable_fp_fusion=False))
        worst = max(worst, _compile(
            kernels.decode_attention_kernel,
            dict(q_ptr="*bf16", pages_ptr="*u8", bt_ptr="*i32", nb_ptr="*i32", out_ptr=out,
                 lse_ptr=f32, qk_scale="fp32"),
            dict(ac, G=4, G_PAD=16, SPLITS=4), target))
        worst = max(worst, _compile(
            kernels.prefill_attention_kernel,
            dict(q_ptr="*bf16", pages_ptr="*u8", ids_ptr="*i32", out_ptr=out, lse_ptr=f32,
                 qk_scale="fp32"),
            dict(ac, G=4, BLOCK_R=32), target))
        for BS in (B, 2 * B):  # one staged block; two with a saliency delay of one block
            worst = max(worst, _compile(
                kernels.staging_attention_kernel,
                dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", len_ptr="*i32", out_ptr=out,
                     lse_ptr=f32, qk_scale="fp32"),
                dict(G=4, G_PAD=16, BS=BS, KT=token_tile(BS, D), D=D, D_PAD=_pow2(D)), target))
    D = layouts[0][1]
    print("merge kernels", flush=True)
    _compile(kernels.merge_splits_kernel,
             dict(part_ptr=out, plse_ptr=f32, out_ptr=out, lse_ptr=f32),
             dict(SPLITS=5, S_PAD=8, D=D, D_PAD=_pow2(D)), target)
    _compile(kernels.merge_lse_kernel,
             dict(oa_ptr=f32, la_ptr=f32, ob_ptr=f32, lb_ptr=f32, out_ptr=out, lse_ptr=f32),
             dict(D=D, D_PAD=_pow2(D), BLOCK_R=16), target)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m triton_kernels.compile_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="one small layout only")
    args = p.parse_args(argv)
    if interpret_mode():
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    worst = check(QUICK_LAYOUTS if args.quick else PRESET_LAYOUTS, args.arch)
    print(f"all kernels compiled for sm_{args.arch}; largest shared memory {worst / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
