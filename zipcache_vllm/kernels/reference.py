"""Pure-PyTorch versions of the kernels: the fallback when the C++ extension is
not built, and the readable statement of what the kernels compute.

Shapes as in :mod:`zipcache_vllm.kernels.ops`. Attention dequantizes
``GROUP_BLOCKS`` pages at a time (storage order) and folds them into an online
softmax (the update of ``engine/attention.py``'s ``OnlineSoftmax`` without its mask:
every packed key is visible, and non-finite scores propagate as in the C++ kernel).
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from ..quant.block import quantize_pack_blocks, unpack_dequantize_blocks

GROUP_BLOCKS = 16  # pages dequantized at once (bounds the fp32 temporary)


def attend_packed_varlen_ref(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                             num_blocks: torch.Tensor, query_start_loc: torch.Tensor,
                             layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`~zipcache_vllm.kernels.ops.attend_packed_varlen`."""
    nq, Hq, D = q.shape
    H = layout.num_kv_heads
    g = Hq // H
    out = torch.zeros(nq, Hq, D)
    lse = torch.full((Hq, nq), float("-inf"))
    qsl = query_start_loc.tolist()
    for r, nb in enumerate(num_blocks.tolist()):
        q0, q1 = qsl[r], qsl[r + 1]
        n = q1 - q0
        if nb == 0 or n == 0:
            continue
        qs = (q[q0:q1].float() * scale).reshape(n, H, g, D).permute(1, 2, 0, 3)  # [H, g, n, D]
        m = torch.full((H, g, n), float("-inf"))
        l = torch.zeros(H, g, n)
        acc = torch.zeros(H, g, n, D)
        for start in range(0, nb, GROUP_BLOCKS):
            ids = block_table[r, start:min(nb, start + GROUP_BLOCKS)].to(torch.int64)
            kd, vd = unpack_dequantize_blocks(pages.index_select(0, ids), layout, order="storage")
            k = kd.permute(1, 0, 2, 3).reshape(H, -1, D)
            v = vd.permute(1, 0, 2, 3).reshape(H, -1, D)
            s = torch.einsum("hgqd,htd->hgqt", qs, k)
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new.unsqueeze(-1))
            alpha = torch.exp(m - m_new)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.einsum("hgqt,htd->hgqd", p, v)
            m = m_new
        out[q0:q1] = (acc / l.unsqueeze(-1)).permute(2, 0, 1, 3).reshape(n, Hq, D)
        lse[:, q0:q1] = (m + torch.log(l)).reshape(Hq, n)
    return out, lse


def quantize_pack_ref(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor,
                      layout: BlockLayout) -> torch.Tensor:
    """Reference of :func:`~zipcache_vllm.kernels.ops.quantize_pack` (the page format's definition)."""
    return quantize_pack_blocks(k, v, salient, layout)


def decode_staged_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                      pages: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                      slots: torch.Tensor, staged: torch.Tensor, probe: torch.Tensor,
                      pool_k: torch.Tensor, pool_v: torch.Tensor, pool_score: torch.Tensor,
                      pool_count: torch.Tensor, out: torch.Tensor, layout: BlockLayout,
                      scale: float,
                      packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Reference of the fused decode step (``zipcache::decode_staged``), in place.

    For each row ``r`` (query row ``rows[r]``, staging slot ``slots[r]`` holding
    ``s = staged[r]`` tokens): write ``k/v[rows[r]]`` at index ``s`` of the slot, attend
    the packed blocks then staged tokens ``0..s``, merge by log-sum-exp into
    ``out[rows[r]]``; update the slot's saliency: ``t < s`` add the probe attention
    (summed over the KV group's query heads, times ``probe[r]``), ``t == s`` starts from
    it, ``t > s`` is cleared; the count of probe queries likewise. ``packed``: the
    attention over the packed blocks ``(out [R, Hq, D], lse [Hq, R])`` when the caller
    computed it with another kernel (the Triton path).
    """
    R = rows.numel()
    if R == 0:
        return
    H, B, D = layout.num_kv_heads, layout.block_size, layout.head_size
    g = q.shape[1] // H
    qr = q.index_select(0, rows)
    dev = q.device
    if packed is None:
        packed = attend_packed_varlen_ref(qr, pages, block_table, num_blocks,
                                          torch.arange(R + 1, device=dev), layout, scale)
    out_p, lse_p = packed
    pool_k[slots, :, staged] = k.index_select(0, rows).to(pool_k.dtype)
    pool_v[slots, :, staged] = v.index_select(0, rows).to(pool_v.dtype)
    kl = pool_k.index_select(0, slots).float()  # [R, H, B, D]
    vl = pool_v.index_select(0, slots).float()
    qs = (qr.float() * scale).reshape(R, H, g, D)
    visible = torch.arange(B, device=dev).unsqueeze(0) <= staged.unsqueeze(1)  # [R, B]
    sc = torch.einsum("rhgd,rhtd->rhgt", qs, kl).masked_fill(~visible[:, None, None, :],
                                                            float("-inf"))
    m_p = lse_p.t().reshape(R, H, g)
    m = torch.maximum(m_p, sc.amax(-1))  # finite: token s is always visible
    w_p = torch.where(torch.isinf(m_p), torch.zeros_like(m_p), torch.exp(m_p - m))
    p = torch.exp(sc - m.unsqueeze(-1))
    den = w_p + p.sum(-1)
    acc = out_p.reshape(R, H, g, D) * w_p.unsqueeze(-1) + torch.einsum("rhgt,rhtd->rhgd", p, vl)
    out[rows] = (acc / den.unsqueeze(-1)).reshape(R, H * g, D).to(out.dtype)
    lse = m + torch.log(den)
    prob = torch.exp(sc - lse.unsqueeze(-1)).sum(2) * probe[:, None, None]  # [R, H, B]
    before = (torch.arange(B, device=dev).unsqueeze(0) < staged.unsqueeze(1)).float()
    pool_score[slots] = pool_score.index_select(0, slots) * before[:, None, :] + prob
    pool_count[slots] = (pool_count.index_select(0, slots) * before
                         + visible.float() * probe[:, None])
