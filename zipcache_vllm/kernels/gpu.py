"""The kernels of :mod:`.ops` on CUDA tensors: the Triton kernels (``triton_kernels/``).

Same signatures and results as the CPU ops (float32 ``out``, ``lse [Hq, nq]``), so
the step engine (``zipcache_vllm/engine/``) runs unchanged on either device. :mod:`.ops`
routes here (:func:`.ops.kernel_path` ``"triton"``) when the tensors are on a CUDA
device, or, for tests on a machine without a GPU, when ``ZIPCACHE_VLLM_KERNELS=triton``
(with ``TRITON_INTERPRET=1`` Triton then runs the kernels on CPU tensors in its
interpreter). Arguments are checked by :mod:`.ops` (and the Triton host wrappers).

Mapping: decode batches (one query per request) -> ``decode_attention``; a request with
several queries -> ``prefill_attention`` (all its blocks visible); packing ->
``quantize_pack`` into fresh pages; the fused decode step -> ``decode_attention`` for
the packed part, ``staging_attention`` for the staged tokens, ``merge_lse`` for their
log-sum-exp merge, then the staging append and the saliency accumulation as torch ops on
the device (:mod:`.portable`'s ``stage_tokens`` / ``staged_scores`` /
``accumulate_saliency``); a row's staging holds ``C`` tokens (the pool's third
dimension, one block or more with a saliency delay), ``staging_attention`` reads them
in tiles of a power of two, masked past the row's staged tokens.
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from . import portable
from .triton_loader import load


def _ops():
    return load("ops")


def attend_packed_varlen(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                         num_blocks: torch.Tensor, query_start_loc: torch.Tensor,
                         layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ops = _ops()
    nq, Hq, D = q.shape
    nreq = block_table.shape[0]
    if nreq == nq and bool((query_start_loc == torch.arange(nreq + 1, device=q.device)).all()):
        out, lse = ops.decode_attention(q, pages, block_table.to(torch.int32).contiguous(),
                                        num_blocks.to(torch.int32).contiguous(), layout, scale)
        return out, lse.t().contiguous()
    out = torch.zeros(nq, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((Hq, nq), float("-inf"), dtype=torch.float32, device=q.device)
    qsl, nbs = query_start_loc.tolist(), num_blocks.tolist()
    for r in range(nreq):
        a, b, nb = qsl[r], qsl[r + 1], nbs[r]
        if b > a and nb > 0:
            o, l = ops.prefill_attention(q[a:b], pages, block_table[r, :nb].to(torch.int32).contiguous(),
                                         layout, scale)
            out[a:b], lse[:, a:b] = o, l.t()
    return out, lse


def quantize_pack(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor,
                  layout: BlockLayout) -> torch.Tensor:
    n = k.shape[0]
    pages = torch.zeros(n, layout.page_bytes, dtype=torch.uint8, device=k.device)
    if n:
        _ops().quantize_pack(k.contiguous(), v.contiguous(), salient.contiguous(), layout, pages,
                             torch.arange(n, dtype=torch.int32, device=k.device))
    return pages


def decode_staged(q, k, v, rows, pages, block_table, num_blocks, slots, staged, probe,
                  pool: tuple, out, layout: BlockLayout, scale: float) -> None:
    """The fused decode step (:func:`.ops.decode_staged`) on the Triton kernels, in place;
    ``pool``: the staging slots' ``(k, v, score, count)``."""
    R = rows.numel()
    if R == 0:
        return
    pool_k, pool_v, pool_score, pool_count = pool
    ops = _ops()
    H = layout.num_kv_heads
    qr = q.index_select(0, rows)
    out_p, lse_p = ops.decode_attention(qr, pages, block_table.to(torch.int32).contiguous(),
                                        num_blocks.to(torch.int32).contiguous(), layout, scale)
    portable.stage_tokens(k, v, rows, slots, staged, pool_k, pool_v)
    kl = pool_k.index_select(0, slots)  # [R, H, C, D], the new token included
    out_s, lse_s = ops.staging_attention(qr, kl, pool_v.index_select(0, slots),
                                         (staged + 1).to(torch.int32), scale)
    merged, lse = ops.merge_lse(out_p, lse_p, out_s, lse_s)  # [R, Hq, D], [R, Hq]
    out[rows] = merged.to(out.dtype)
    sc, visible = portable.staged_scores(qr, kl.float(), staged, H, scale)
    portable.accumulate_saliency(sc, lse.reshape(R, H, -1), visible, staged, probe, slots,
                                 pool_score, pool_count)
