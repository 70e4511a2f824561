"""The kernels of :mod:`.ops` on CUDA tensors: the Triton kernels (``triton_kernels/``).

Same signatures and results as the CPU ops (float32 ``out``, ``lse [Hq, nq]``), so
the step engine (``zipcache_vllm/engine/``) runs unchanged on either device. :mod:`.ops` routes here when
the tensors are on a CUDA device, or, for tests on a machine without a GPU, when
``ZIPCACHE_VLLM_KERNELS=triton`` (with ``TRITON_INTERPRET=1`` Triton then runs the
kernels on CPU tensors in its interpreter).

Mapping: decode batches (one query per request) -> ``decode_attention``; a request with
several queries -> ``prefill_attention`` (all its blocks visible); packing ->
``quantize_pack`` into fresh pages; the fused decode step -> ``decode_attention`` for
the packed part, then the staging part as in :func:`.reference.decode_staged_ref`
(torch ops on the device: one staged block per row).
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from . import reference
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
                  pool_k, pool_v, pool_score, pool_count, out, layout: BlockLayout,
                  scale: float) -> None:
    if rows.numel() == 0:
        return
    qr = q.index_select(0, rows)
    out_p, lse_p = _ops().decode_attention(qr, pages, block_table.to(torch.int32).contiguous(),
                                           num_blocks.to(torch.int32).contiguous(), layout, scale)
    reference.decode_staged_ref(q, k, v, rows, pages, block_table, num_blocks, slots, staged, probe,
                                pool_k, pool_v, pool_score, pool_count, out, layout, scale,
                                packed=(out_p, lse_p.t()))
