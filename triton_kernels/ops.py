"""Host wrappers of the zipcache Triton kernels: check, then launch.

Every wrapper checks shapes, dtypes, strides and devices on the host (tensor
metadata only, no device sync unless stated) and derives the kernels' layout
constexprs from :class:`zipcache_vllm.layout.BlockLayout`. Nothing here imports
vLLM. On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests).

Shapes: ``nreq`` requests, ``Hq`` query heads, ``Hk = layout.num_kv_heads`` KV
heads (``Hq % Hk == 0``, GQA group ``G = Hq / Hk``), ``D`` head size, ``B``
tokens per block. ``lse`` outputs are natural-log log-sum-exp of ``scale * q.k``;
a row that saw no key has output 0 and lse ``-inf`` (an identity for
:func:`merge_lse`).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton

from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.quant.uniform import EPS, fp16_round, sanitize

from . import kernels

LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
MAX_SPLITS = 64  # split-KV slices per (request, KV head)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=64)
def layout_constexprs(layout: BlockLayout) -> dict[str, int]:
    """Kernel constexprs of ``layout``: sizes and section offsets, all read from the dataclass."""
    off = {s.name: s.offset for s in layout.sections}
    for name in ("k_hi_params", "k_lo_params", "v_channel_scale", "v_token_params"):
        if layout.section(name).nbytes and off[name] % 2:
            raise ValueError(f"{layout}: float16 section {name!r} starts at odd byte {off[name]}; "
                             "the kernels need 2-byte aligned parameters")
    return dict(
        B=layout.block_size, D=layout.head_size, N_HI=layout.n_hi,
        HI_BITS=layout.hi_bits, LO_BITS=layout.lo_bits, HEAD_BYTES=layout.head_bytes,
        OFF_KHI=off["k_hi_codes"], OFF_KLO=off["k_lo_codes"], OFF_VHI=off["v_hi_codes"],
        OFF_VLO=off["v_lo_codes"], OFF_KHIP=off["k_hi_params"], OFF_KLOP=off["k_lo_params"],
        OFF_VC=off["v_channel_scale"], OFF_VTP=off["v_token_params"],
        B_PAD=_pow2(layout.block_size), D_PAD=_pow2(layout.head_size),
    )


def token_tile(tokens: int, head_size: int) -> int:
    """Key rows per attention sub-tile: float32 K and V tiles of at most 32 KiB each.

    Bounds the shared memory of the float32 dot operands (one 128-token tile at
    D = 128 needed 136 KiB on sm_90, more than many GPUs have per block).
    """
    return max(16, min(_pow2(tokens), 8192 // _pow2(head_size)))


def _attn_constexprs(layout: BlockLayout) -> dict[str, int]:
    c = dict(layout_constexprs(layout))
    out = {k: c[k] for k in ("B", "D", "N_HI", "HI_BITS", "LO_BITS", "HEAD_BYTES", "OFF_KHI",
                             "OFF_KLO", "OFF_VHI", "OFF_VLO", "OFF_KHIP", "OFF_KLOP", "OFF_VC",
                             "OFF_VTP", "D_PAD")}
    out["KT"] = token_tile(layout.block_size, layout.head_size)
    return out


def _check_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(dev != first for dev in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if first.type != "cuda" and not interpret_mode():
        raise ValueError(f"zipcache Triton kernels need CUDA tensors (got {first}); "
                         "set TRITON_INTERPRET=1 to run them on CPU for testing")
    return first


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_pages(pages: torch.Tensor, layout: BlockLayout) -> None:
    _check(pages.dim() == 2 and pages.dtype == torch.uint8 and pages.shape[1] == layout.page_bytes,
           f"pages must be uint8 [num_pages, {layout.page_bytes}], got {pages.dtype} {list(pages.shape)}")
    _check(pages.stride(1) == 1, f"pages must be contiguous along the page, got strides {pages.stride()}")
    _check(pages.data_ptr() % 2 == 0 and pages.stride(0) % 2 == 0,
           "pages must be 2-byte aligned (float16 parameters are read in place)")


def _check_q(q: torch.Tensor, layout: BlockLayout, name: str = "q") -> int:
    """Checks ``[n, Hq, D]`` queries; returns the GQA group size."""
    _check(q.dim() == 3 and q.dtype in _FLOAT_DTYPES,
           f"{name} must be float16/bfloat16/float32 [n, Hq, D], got {q.dtype} {list(q.shape)}")
    Hq, D, Hk = q.shape[1], q.shape[2], layout.num_kv_heads
    _check(D == layout.head_size, f"{name} head size {D} != layout.head_size {layout.head_size}")
    _check(Hq % Hk == 0, f"{name} has {Hq} heads, not a multiple of num_kv_heads={Hk}")
    _check(q.stride(2) == 1, f"{name} must be contiguous in the head dim, got strides {q.stride()}")
    return Hq // Hk


def value_channel_scale(v: torch.Tensor) -> torch.Tensor:
    """float16 ``[N, H, D]`` CSTQ channel scales ``fp16_up(sqrt(max_t |v|))`` (1 below EPS).

    Computed with torch, exactly as ``quant.block`` does (same ops on a contiguous
    ``[N, H, D]`` tensor), because torch's CPU ``sqrt`` is not correctly rounded
    (torch 2.13, AVX2: about 15% of float32 inputs are 1 ulp off), so no kernel
    ``sqrt`` can reproduce CPU-packed pages bit for bit. It is a reduction over
    ``[N, B, H, D]`` to ``N * H * D`` values: small next to the packing.
    """
    vmax = sanitize(v).abs_().amax(dim=1).contiguous()  # [N, H, D]
    c = fp16_round(vmax.sqrt(), up=True)
    return torch.where(c.float() < EPS, torch.ones_like(c), c)


def quantize_pack(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor, layout: BlockLayout,
                  out_pages: torch.Tensor, page_ids: torch.Tensor,
                  validate_mask: bool = True) -> torch.Tensor:
    """Quantize ``N`` full blocks and write them into ``out_pages[page_ids]``.

    Args:
        k, v: ``[N, B, H, D]`` keys (after RoPE) / values, float16/bfloat16/float32,
            contiguous in ``D``.
        salient: bool ``[N, H, B]``, exactly ``layout.n_hi`` True per (block, head).
        out_pages: uint8 ``[num_pages, layout.page_bytes]`` (the layer's cache).
        page_ids: int32/int64 ``[N]`` destination page of each block (distinct).
        validate_mask: count the salient tokens per row first (one device sync);
            a wrong count would write outside the head section's code runs.
    Returns:
        ``out_pages``; the written pages are byte-identical to
        ``zipcache_vllm.quant.block.quantize_pack_blocks(k, v, salient, layout)``.
    """
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    _check(k.dim() == 4 and k.shape[1:] == (B, H, D) and v.shape == k.shape,
           f"k and v must be [N, {B}, {H}, {D}], got {list(k.shape)} and {list(v.shape)}")
    _check(k.dtype in _FLOAT_DTYPES and v.dtype in _FLOAT_DTYPES,
           f"k/v must be float16/bfloat16/float32, got {k.dtype}/{v.dtype}")
    _check(k.stride(3) == 1 and v.stride(3) == 1, "k and v must be contiguous in the head dim")
    n = k.shape[0]
    _check(salient.shape == (n, H, B) and salient.dtype == torch.bool,
           f"salient must be bool [{n}, {H}, {B}], got {salient.dtype} {list(salient.shape)}")
    _check(page_ids.shape == (n,) and page_ids.dtype in _INDEX_DTYPES,
           f"page_ids must be int32/int64 [{n}], got {page_ids.dtype} {list(page_ids.shape)}")
    _check_pages(out_pages, layout)
    _check_device(k=k, v=v, salient=salient, out_pages=out_pages, page_ids=page_ids)
    if validate_mask:
        _check(bool((salient.sum(-1) == layout.n_hi).all()),
               f"every (block, head) needs exactly n_hi={layout.n_hi} salient tokens")
    if n == 0:
        return out_pages
    sal = salient.to(torch.uint8)
    scale = value_channel_scale(v)
    c = layout_constexprs(layout)
    pad = layout.head_bytes - layout.content_bytes
    kernels.quantize_pack_kernel[(n, H)](
        k, v, sal, scale, out_pages, page_ids,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        sal.stride(0), sal.stride(1), scale.stride(0), scale.stride(1),
        out_pages.stride(0),
        OFF_MASK=layout.section("mask").offset, CONTENT=layout.content_bytes,
        PAD_PAD=_pow2(max(pad, 1)), num_warps=8, enable_fp_fusion=False, **c,
    )
    return out_pages


def default_split_kv(nreq: int, num_kv_heads: int, max_blocks: int,
                     device: torch.device | None = None) -> int:
    """Slices per (request, KV head) so that the grid fills the GPU about twice."""
    sms = 132
    if device is not None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, nreq * num_kv_heads))
    return int(max(1, min(want, max_blocks, MAX_SPLITS)))


def decode_attention(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                     num_blocks: torch.Tensor, layout: BlockLayout, scale: float,
                     split_kv: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per request over its packed pages (in-kernel dequantization, split-KV).

    Args:
        q: ``[nreq, Hq, D]`` float16/bfloat16/float32.
        pages: uint8 ``[num_pages, layout.page_bytes]``.
        block_table: int32 ``[nreq, max_blocks]``; row ``r`` lists request ``r``'s full
            packed blocks in order (only the first ``num_blocks[r]`` are read).
        num_blocks: int32 ``[nreq]``, each in ``[0, max_blocks]`` (not checked: no sync).
        scale: softmax scale.
        split_kv: slices of each request's blocks run by separate programs, merged by
            log-sum-exp in a second kernel; ``None`` picks one from the grid size.
    Returns:
        ``(out, lse)``: float32 ``[nreq, Hq, D]`` and ``[nreq, Hq]``.
    """
    G = _check_q(q, layout)
    nreq, Hq, D = q.shape
    Hk = layout.num_kv_heads
    _check_pages(pages, layout)
    _check(block_table.dim() == 2 and block_table.shape[0] == nreq and block_table.dtype == torch.int32,
           f"block_table must be int32 [{nreq}, max_blocks], got {block_table.dtype} {list(block_table.shape)}")
    _check(block_table.stride(1) == 1, "block_table must be contiguous along a row")
    _check(num_blocks.shape == (nreq,) and num_blocks.dtype == torch.int32,
           f"num_blocks must be int32 [{nreq}], got {num_blocks.dtype} {list(num_blocks.shape)}")
    _check(num_blocks.is_contiguous(), "num_blocks must be contiguous")
    dev = _check_device(q=q, pages=pages, block_table=block_table, num_blocks=num_blocks)
    max_blocks = block_table.shape[1]
    if split_kv is None:
        split_kv = default_split_kv(nreq, Hk, max_blocks, dev)
    _check(1 <= split_kv <= MAX_SPLITS, f"split_kv must be in [1, {MAX_SPLITS}], got {split_kv}")
    out = torch.empty(nreq, Hq, D, dtype=torch.float32, device=dev)
    lse = torch.empty(nreq, Hq, dtype=torch.float32, device=dev)
    if nreq == 0:
        return out, lse
    if split_kv == 1:  # write the final result directly
        part, plse = out.unsqueeze(2), lse.unsqueeze(2)
    else:
        part = torch.empty(nreq, Hq, split_kv, D, dtype=torch.float32, device=dev)
        plse = torch.empty(nreq, Hq, split_kv, dtype=torch.float32, device=dev)
    kernels.decode_attention_kernel[(nreq, Hk, split_kv)](
        q, pages, block_table, num_blocks, part, plse,
        q.stride(0), q.stride(1), block_table.stride(0), pages.stride(0),
        part.stride(0), part.stride(1), part.stride(2), plse.stride(0), plse.stride(1), plse.stride(2),
        scale * LOG2E,
        G=G, G_PAD=max(16, _pow2(G)), SPLITS=split_kv, num_warps=4, **_attn_constexprs(layout),
    )
    if split_kv > 1:
        kernels.merge_splits_kernel[(nreq, Hq)](
            part, plse, out, lse,
            part.stride(0), part.stride(1), part.stride(2), plse.stride(0), plse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            SPLITS=split_kv, S_PAD=_pow2(split_kv), D=D, D_PAD=_pow2(D), num_warps=4,
        )
    return out, lse


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention partials over disjoint keys: ``[..., D]`` outputs, ``[...]`` lse.

    Returns float32 ``(out, lse)`` of attention over the union of both key sets. A side
    with lse ``-inf`` (no keys) contributes nothing; both ``-inf`` gives 0 / ``-inf``.
    """
    _check(out_a.shape == out_b.shape and out_a.dim() >= 1,
           f"outputs must have one shape, got {list(out_a.shape)} and {list(out_b.shape)}")
    _check(lse_a.shape == lse_b.shape == out_a.shape[:-1],
           f"lse must be {list(out_a.shape[:-1])}, got {list(lse_a.shape)} and {list(lse_b.shape)}")
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
    dev = _check_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    D = out_a.shape[-1]
    oa, ob = out_a.contiguous(), out_b.contiguous()
    la, lb = lse_a.contiguous(), lse_b.contiguous()
    out = torch.empty(out_a.shape, dtype=torch.float32, device=dev)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=dev)
    rows = la.numel()
    if rows:
        block_r = 16
        kernels.merge_lse_kernel[(triton.cdiv(rows, block_r),)](
            oa, la, ob, lb, out, lse, rows, D=D, D_PAD=_pow2(D), BLOCK_R=block_r, num_warps=4)
    return out, lse


def staging_attention(q: torch.Tensor, k_stage: torch.Tensor, v_stage: torch.Tensor,
                      stage_len: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per request over its full-precision staged tokens.

    Args:
        q: ``[nreq, Hq, D]``.
        k_stage, v_stage: ``[nreq, Hk, BS, D]`` (bf16 in the backend; any float dtype),
            contiguous in ``D``; ``BS`` the staging capacity, any size (one block, or
            several with a saliency delay): read in tiles of :func:`token_tile` tokens.
        stage_len: int32 ``[nreq]``: tokens visible in each row (``<= BS``; 0 gives 0 / -inf).
    Returns:
        float32 ``(out [nreq, Hq, D], lse [nreq, Hq])``.
    """
    _check(k_stage.dim() == 4 and v_stage.shape == k_stage.shape,
           f"k_stage/v_stage must be [nreq, Hk, BS, D], got {list(k_stage.shape)} and {list(v_stage.shape)}")
    _check(k_stage.dtype in _FLOAT_DTYPES and v_stage.dtype in _FLOAT_DTYPES,
           f"k_stage/v_stage must be float16/bfloat16/float32, got {k_stage.dtype}/{v_stage.dtype}")
    nreq, Hk, BS, D = k_stage.shape
    _check(q.dim() == 3 and q.shape[0] == nreq and q.shape[2] == D and q.dtype in _FLOAT_DTYPES,
           f"q must be float [{nreq}, Hq, {D}], got {q.dtype} {list(q.shape)}")
    _check(q.shape[1] % Hk == 0, f"q has {q.shape[1]} heads, not a multiple of {Hk} KV heads")
    _check(q.stride(2) == 1 and k_stage.stride(3) == 1 and v_stage.stride(3) == 1,
           "q, k_stage and v_stage must be contiguous in the head dim")
    _check(stage_len.shape == (nreq,) and stage_len.dtype == torch.int32 and stage_len.is_contiguous(),
           f"stage_len must be contiguous int32 [{nreq}], got {stage_len.dtype} {list(stage_len.shape)}")
    dev = _check_device(q=q, k_stage=k_stage, v_stage=v_stage, stage_len=stage_len)
    Hq = q.shape[1]
    G = Hq // Hk
    out = torch.empty(nreq, Hq, D, dtype=torch.float32, device=dev)
    lse = torch.empty(nreq, Hq, dtype=torch.float32, device=dev)
    if nreq:
        kernels.staging_attention_kernel[(nreq, Hk)](
            q, k_stage, v_stage, stage_len, out, lse,
            q.stride(0), q.stride(1), k_stage.stride(0), k_stage.stride(1), k_stage.stride(2),
            v_stage.stride(0), v_stage.stride(1), v_stage.stride(2),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            scale * LOG2E,
            G=G, G_PAD=max(16, _pow2(G)), BS=BS, KT=token_tile(BS, D), D=D, D_PAD=_pow2(D),
            num_warps=4,
        )
    return out, lse


def prefill_attention(q: torch.Tensor, pages: torch.Tensor, block_ids: torch.Tensor,
                      layout: BlockLayout, scale: float,
                      block_rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Many queries of one request over its packed blocks, all visible (no causal mask).

    Args:
        q: ``[nq, Hq, D]`` queries of the chunk.
        pages: uint8 ``[num_pages, layout.page_bytes]``.
        block_ids: int32/int64 ``[nb]`` the request's full packed blocks (any order).
        block_rows: (query, head) rows per program tile (a power of two, >= 16).
    Returns:
        float32 ``(out [nq, Hq, D], lse [nq, Hq])``.
    """
    G = _check_q(q, layout)
    nq, Hq, D = q.shape
    _check_pages(pages, layout)
    _check(block_ids.dim() == 1 and block_ids.dtype in _INDEX_DTYPES and block_ids.is_contiguous(),
           f"block_ids must be contiguous int32/int64 [nb], got {block_ids.dtype} {list(block_ids.shape)}")
    _check(block_rows >= 16 and block_rows == _pow2(block_rows),
           f"block_rows must be a power of two >= 16, got {block_rows}")
    dev = _check_device(q=q, pages=pages, block_ids=block_ids)
    out = torch.empty(nq, Hq, D, dtype=torch.float32, device=dev)
    lse = torch.empty(nq, Hq, dtype=torch.float32, device=dev)
    if nq:
        grid = (triton.cdiv(nq * G, block_rows), layout.num_kv_heads)
        kernels.prefill_attention_kernel[grid](
            q, pages, block_ids, out, lse, nq, block_ids.numel(),
            q.stride(0), q.stride(1), pages.stride(0), out.stride(0), out.stride(1),
            lse.stride(0), lse.stride(1),
            scale * LOG2E,
            G=G, BLOCK_R=block_rows, num_warps=4, **_attn_constexprs(layout),
        )
    return out, lse


__all__ = ["decode_attention", "default_split_kv", "interpret_mode", "layout_constexprs",
           "merge_lse", "prefill_attention", "quantize_pack", "staging_attention"]
