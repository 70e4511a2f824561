"""Test oracles of the kernels: the plainest statement of what each computes.

No production path calls these (``tests/kernels/`` hold the C++ kernels, the Triton
route and the portable PyTorch path of :mod:`.portable` to them). One request or row
at a time, float64, one softmax over all of a query's keys (no online softmax, no
log-sum-exp merge), pages dequantized in token order by the page format's own
definition (``quant.block.unpack_dequantize_blocks``). Shapes as in :mod:`.ops`.
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from ..quant.block import unpack_dequantize_blocks


def _packed_tokens(pages: torch.Tensor, ids: torch.Tensor,
                   layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 keys and values ``[H, nb * B, D]`` of the pages ``ids``."""
    H, D = layout.num_kv_heads, layout.head_size
    if not ids.numel():
        return (torch.zeros(H, 0, D, dtype=torch.float64),) * 2
    kd, vd = unpack_dequantize_blocks(pages.index_select(0, ids.to(torch.int64)), layout)
    return (kd.permute(1, 0, 2, 3).reshape(H, -1, D).double(),
            vd.permute(1, 0, 2, 3).reshape(H, -1, D).double())


def attend_packed_varlen_ref(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                             num_blocks: torch.Tensor, query_start_loc: torch.Tensor,
                             layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :func:`~zipcache_vllm.kernels.ops.attend_packed_varlen`: float32 ``out
    [nq, Hq, D]`` and ``lse [Hq, nq]`` (``0`` / ``-inf`` for a request without blocks)."""
    Hq, H = q.shape[1], layout.num_kv_heads
    out = torch.zeros(q.shape)
    lse = torch.full((Hq, q.shape[0]), float("-inf"))
    starts = query_start_loc.tolist()
    for r, (q0, q1, nb) in enumerate(zip(starts, starts[1:], num_blocks.tolist())):
        if nb and q1 > q0:
            k, v = _packed_tokens(pages, block_table[r, :nb], layout)
            logits = torch.einsum("nhgd,htd->nhgt", q[q0:q1].double().unflatten(1, (H, -1)) * scale, k)
            out[q0:q1] = torch.einsum("nhgt,htd->nhgd", logits.softmax(-1), v).flatten(1, 2).float()
            lse[:, q0:q1] = logits.logsumexp(-1).flatten(1, 2).t().float()
    return out, lse


def decode_staged_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                      pages: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                      slots: torch.Tensor, staged: torch.Tensor, probe: torch.Tensor,
                      pool: tuple[torch.Tensor, ...], out: torch.Tensor, layout: BlockLayout,
                      scale: float) -> None:
    """Oracle of the fused decode step (``zipcache::decode_staged``), in place, on the
    staging slots ``pool = (k, v, score, count)``: ``[S, H, C, D]``, ``[S, H, C]``,
    ``[S, C]``, ``C`` tokens a slot (a multiple of the block size ``B``, ``staged < C``).

    For each row ``r`` (query row ``rows[r]``, staging slot ``slots[r]`` holding
    ``s = staged[r]`` tokens): write ``k/v[rows[r]]`` at index ``s`` of the slot (rounded
    to the pool's dtype); ``out[rows[r]]`` = softmax attention over the row's packed
    tokens and staged tokens ``0..s`` together; the slot's saliency: token ``t < s`` adds
    its attention probability summed over the KV group's query heads, times
    ``probe[r]``, token ``s`` starts from it, tokens ``s < t < C`` are cleared; the probe
    counts likewise (``probe[r]`` for every token ``t <= s``).
    """
    H, B, D = layout.num_kv_heads, layout.block_size, layout.head_size
    g = q.shape[1] // H
    pool_k, pool_v, pool_score, pool_count = pool
    for r in range(rows.numel()):
        row, slot, s = int(rows[r]), int(slots[r]), int(staged[r])
        nb, pr = int(num_blocks[r]), float(probe[r])
        pool_k[slot, :, s] = k[row].to(pool_k.dtype)
        pool_v[slot, :, s] = v[row].to(pool_v.dtype)
        kp, vp = _packed_tokens(pages, block_table[r, :nb], layout)
        keys = torch.cat([kp, pool_k[slot, :, :s + 1].double()], 1)  # [H, nb * B + s + 1, D]
        vals = torch.cat([vp, pool_v[slot, :, :s + 1].double()], 1)
        logits = torch.einsum("hgd,htd->hgt", q[row].double().reshape(H, g, D) * scale, keys)
        p = torch.softmax(logits, -1)
        out[row] = torch.einsum("hgt,htd->hgd", p, vals).reshape(H * g, D).to(out.dtype)
        prob = p[:, :, nb * B:].sum(1) * pr  # [H, s + 1]: the staged tokens
        pool_score[slot, :, :s] += prob[:, :s].float()
        pool_score[slot, :, s] = prob[:, s].float()
        pool_score[slot, :, s + 1:] = 0.0
        pool_count[slot, :s] += pr
        pool_count[slot, s] = pr
        pool_count[slot, s + 1:] = 0.0


__all__ = ["attend_packed_varlen_ref", "decode_staged_ref"]
