"""Decode-attention benchmark on a CUDA GPU: zipcache pages vs a bf16 baseline.

Run on a GPU machine (torch + triton, no vLLM needed)::

    python -m triton_kernels.bench                      # defaults below
    python -m triton_kernels.bench --contexts 1024,8192 --batches 1 --csv out.csv

For every (batch, context) it times, with ``triton.testing.do_bench``:

* ``zip``: :func:`triton_kernels.decode_attention` over the packed pages alone;
* ``zip+stage``: the whole decode read of the backend, packed pages plus a full
  bf16 staging block (:func:`staging_attention`) merged by :func:`merge_lse`;
* ``bf16``: ``torch.nn.functional.scaled_dot_product_attention`` over contiguous
  bf16 K/V ``[batch, Hk, ctx, D]`` (``enable_gqa=True``; torch picks the backend).

and reports achieved GB/s = bytes the kernel must read (pages, or bf16 K and V;
queries and outputs are negligible) / time. Pages are real quantized data: a pool of
distinct pages is packed with :func:`quantize_pack` and copied to fill the cache, so
no two block-table entries alias and L2 cannot serve repeated reads.
It refuses to run without CUDA (the Triton interpreter would time numpy, not a GPU).
"""
from __future__ import annotations

import argparse
import csv
import sys

import torch

from zipcache_vllm.layout import BlockLayout

DEFAULT_CONTEXTS = (1024, 8192, 32768, 131072)
DEFAULT_BATCHES = (1, 16)
UNIQUE_PAGES = 256  # distinct quantized pages, copied to fill the cache


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m triton_kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=_parse_ints, default=list(DEFAULT_CONTEXTS),
                   help="context lengths in tokens (comma separated)")
    p.add_argument("--batches", type=_parse_ints, default=list(DEFAULT_BATCHES),
                   help="decode batch sizes (comma separated)")
    p.add_argument("--num-heads", type=int, default=32, help="query heads (Llama-3-8B: 32)")
    p.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (Llama-3-8B: 8)")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128, help="tokens per page (preset: 128)")
    p.add_argument("--hi-bits", type=int, default=4)
    p.add_argument("--lo-bits", type=int, default=2)
    p.add_argument("--salient-ratio", type=float, default=0.45, help="preset zipcache: 0.45")
    p.add_argument("--split-kv", type=int, default=None, help="default: ops.default_split_kv")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    return p.parse_args(argv)


def _fill_pages(layout: BlockLayout, num_pages: int, device: torch.device) -> torch.Tensor:
    from .ops import quantize_pack

    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    n = min(UNIQUE_PAGES, num_pages)
    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(n, B, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(n, B, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    ranks = torch.rand(n, H, B, device=device, generator=gen)
    salient = torch.zeros(n, H, B, dtype=torch.bool, device=device)
    salient.scatter_(-1, ranks.topk(layout.n_hi, dim=-1).indices, True)
    uniq = torch.empty(n, layout.page_bytes, dtype=torch.uint8, device=device)
    quantize_pack(k, v, salient, layout, uniq, torch.arange(n, device=device))
    pages = torch.empty(num_pages, layout.page_bytes, dtype=torch.uint8, device=device)
    for start in range(0, num_pages, n):
        m = min(n, num_pages - start)
        pages[start:start + m] = uniq[:m]
    return pages


def copy_bandwidth(dev: torch.device, rep: int) -> float:
    """GB/s of a 1 GiB device-to-device tensor copy (bytes read + written), the practical
    bandwidth limit the kernels' GB/s are compared with."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=rep)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / ms / 1e6


def run(args: argparse.Namespace, dev: torch.device = torch.device("cuda")) -> list[dict]:
    """Times every (batch, context) on ``dev``; returns one dict per row (also printed)."""
    import triton.testing

    from .ops import decode_attention, default_split_kv, merge_lse, staging_attention

    Hq, Hk, D, B = args.num_heads, args.num_kv_heads, args.head_size, args.block_size
    layout = BlockLayout(block_size=B, head_size=D, num_kv_heads=Hk, hi_bits=args.hi_bits,
                         lo_bits=args.lo_bits, n_hi=int(round(args.salient_ratio * B)))
    scale = D ** -0.5
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    copy_gbps = copy_bandwidth(dev, args.rep)
    print(f"# device copy bandwidth (1 GiB tensor copy, read + write counted): {copy_gbps:.0f} GB/s; "
          "a kernel's share of it is its GB/s divided by this")
    print(f"# {name}; Hq={Hq} Hk={Hk} D={D} B={B} "
          f"bits={args.hi_bits}/{args.lo_bits} n_hi={layout.n_hi}; page {layout.page_bytes} B "
          f"({layout.compression_vs_bf16:.2f}x vs bf16)")
    print(f"{'batch':>5} {'ctx':>7} {'split':>5} | {'zip ms':>8} {'GB/s':>7} | {'zip+stage ms':>12} | "
          f"{'bf16 ms':>8} {'GB/s':>7} | {'bf16/zip':>8}")
    rows = []
    for batch in args.batches:
        for ctx in args.contexts:
            nb = ctx // B
            pages = _fill_pages(layout, batch * nb, dev)
            table = torch.randperm(batch * nb, device=dev).to(torch.int32).reshape(batch, nb)
            num_blocks = torch.full((batch,), nb, dtype=torch.int32, device=dev)
            q = torch.randn(batch, Hq, D, device=dev, dtype=torch.bfloat16)
            split = args.split_kv or default_split_kv(batch, Hk, nb, dev)
            k_st = torch.randn(batch, Hk, B, D, device=dev, dtype=torch.bfloat16)
            v_st = torch.randn_like(k_st)
            st_len = torch.full((batch,), B, dtype=torch.int32, device=dev)

            def zip_only():
                return decode_attention(q, pages, table, num_blocks, layout, scale, split_kv=split)

            def zip_stage():
                po, pl = decode_attention(q, pages, table, num_blocks, layout, scale, split_kv=split)
                so, sl = staging_attention(q, k_st, v_st, st_len, scale)
                return merge_lse(po, pl, so, sl)

            t_zip = triton.testing.do_bench(zip_only, rep=args.rep)
            t_stage = triton.testing.do_bench(zip_stage, rep=args.rep)
            del pages, table
            torch.cuda.empty_cache()

            k = torch.randn(batch, Hk, ctx, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q4 = q.unsqueeze(2)  # [batch, Hq, 1, D]
            t_bf16 = triton.testing.do_bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, scale=scale,
                                                                         enable_gqa=True),
                rep=args.rep)
            del k, v
            torch.cuda.empty_cache()

            zip_bytes = batch * nb * layout.page_bytes
            bf16_bytes = 2 * batch * Hk * ctx * D * 2
            row = dict(batch=batch, ctx=ctx, split_kv=split, zip_ms=t_zip,
                       zip_gbps=zip_bytes / t_zip / 1e6, zip_stage_ms=t_stage, bf16_ms=t_bf16,
                       bf16_gbps=bf16_bytes / t_bf16 / 1e6, zip_bytes=zip_bytes, bf16_bytes=bf16_bytes,
                       copy_gbps=copy_gbps, zip_share_of_copy=zip_bytes / t_zip / 1e6 / copy_gbps)
            rows.append(row)
            print(f"{batch:>5} {ctx:>7} {split:>5} | {t_zip:>8.3f} {row['zip_gbps']:>7.0f} | "
                  f"{t_stage:>12.3f} | {t_bf16:>8.3f} {row['bf16_gbps']:>7.0f} | "
                  f"{t_bf16 / t_zip:>8.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from .ops import interpret_mode

    if not torch.cuda.is_available() or interpret_mode():
        print("triton_kernels.bench needs a CUDA GPU and TRITON_INTERPRET unset: "
              "the interpreter would time numpy on the CPU, not the kernels. Nothing measured.",
              file=sys.stderr)
        return 2
    rows = run(args)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
