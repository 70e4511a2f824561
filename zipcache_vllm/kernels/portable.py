"""The kernels of :mod:`.ops` in plain PyTorch ops: the portable path.

:mod:`.ops` runs these when the C++ extension cannot be built (or with
``ZIPCACHE_VLLM_KERNELS=torch``), on any device torch runs on; the CUDA route
(:mod:`.gpu`) shares the decode step's staging bookkeeping (:func:`stage_tokens`,
:func:`staged_scores`, :func:`accumulate_saliency`). Arguments are checked by
:mod:`.ops`, not here. Packing and dequantization are the page format's own
definitions (``quant.block``), called by :mod:`.ops` directly.

Shapes as in :mod:`.ops`. Attention dequantizes ``GROUP_BLOCKS`` pages at a time
(storage order) and folds them into an online softmax (the update of
``engine/attention.py``'s ``OnlineSoftmax`` without its mask: every packed key is
visible, and non-finite scores propagate as in the C++ kernel). The fused decode step
folds the packed part into the softmax of the staged tokens as one more "key" (logit
``lse``, value ``out``), the formula of ``csrc/decode.cpp``. A staging slot holds ``C``
tokens (its capacity, a multiple of the block size ``B``: one block, or more with a
saliency delay), read from the tensors' shapes.
The independent oracles the tests hold every path to are in :mod:`.reference`.
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout, StagingLayout
from ..quant.block import unpack_dequantize_blocks
from ..quant.uniform import dequantize, quant_params, quantize, sanitize

GROUP_BLOCKS = 16  # pages dequantized at once (bounds the fp32 temporary)


def attend_packed_varlen(q: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor,
                         num_blocks: torch.Tensor, query_start_loc: torch.Tensor,
                         layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~zipcache_vllm.kernels.ops.attend_packed_varlen`: ``out`` float32
    ``[nq, Hq, D]``, ``lse`` float32 ``[Hq, nq]`` (``0`` / ``-inf`` for a request
    without blocks)."""
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


def stage_tokens(k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                 staged: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor) -> None:
    """Write each row's new ``k/v[rows[r]]`` (``[T, H, D]``) into its staging slot
    ``slots[r]`` at index ``staged[r]``, rounded to the pool's dtype."""
    pool_k[slots, :, staged] = k.index_select(0, rows).to(pool_k.dtype)
    pool_v[slots, :, staged] = v.index_select(0, rows).to(pool_v.dtype)


def staged_scores(qr: torch.Tensor, kl: torch.Tensor, staged: torch.Tensor, num_kv_heads: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores of the rows' queries ``qr [R, Hq, D]`` over their slots' keys
    ``kl`` float32 ``[R, H, C, D]``: ``sc`` ``[R, H, g, C]`` (``-inf`` beyond the row's
    staged tokens ``0..staged[r]``) and ``visible`` bool ``[R, C]``."""
    R, Hq, D = qr.shape
    C = kl.shape[2]
    qs = (qr.float() * scale).reshape(R, num_kv_heads, Hq // num_kv_heads, D)
    visible = torch.arange(C, device=qr.device).unsqueeze(0) <= staged.unsqueeze(1)  # [R, C]
    sc = torch.einsum("rhgd,rhtd->rhgt", qs, kl).masked_fill(~visible[:, None, None, :],
                                                            float("-inf"))
    return sc, visible


def accumulate_saliency(sc: torch.Tensor, lse: torch.Tensor, visible: torch.Tensor,
                        staged: torch.Tensor, probe: torch.Tensor, slots: torch.Tensor,
                        pool_score: torch.Tensor, pool_count: torch.Tensor) -> None:
    """The slots' saliency after a decode token: token ``t < s`` adds the probe attention
    ``exp(sc - lse)`` (summed over the KV group's query heads, times ``probe[r]``),
    ``t == s`` starts from it, ``t > s`` is cleared; the count of probe queries likewise.

    ``sc`` ``[R, H, g, C]`` and ``visible`` as :func:`staged_scores` returns them; ``lse``
    ``[R, H, g]`` the row's log-sum-exp over its packed and staged tokens."""
    C = sc.shape[-1]
    prob = torch.exp(sc - lse.unsqueeze(-1)).sum(2) * probe[:, None, None]  # [R, H, C]
    before = (torch.arange(C, device=sc.device).unsqueeze(0) < staged.unsqueeze(1)).float()
    pool_score[slots] = pool_score.index_select(0, slots) * before[:, None, :] + prob
    pool_count[slots] = (pool_count.index_select(0, slots) * before
                         + visible.float() * probe[:, None])


def decode_staged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                  pages: torch.Tensor, block_table: torch.Tensor, num_blocks: torch.Tensor,
                  slots: torch.Tensor, staged: torch.Tensor, probe: torch.Tensor,
                  pool: tuple[torch.Tensor, ...], out: torch.Tensor, layout: BlockLayout,
                  scale: float) -> None:
    """The fused decode step (``zipcache::decode_staged``, :func:`.ops.decode_staged`), in place.

    For each row ``r`` (query row ``rows[r]``, staging slot ``slots[r]`` holding
    ``s = staged[r]`` tokens): write ``k/v[rows[r]]`` at index ``s`` of the slot, attend
    the packed blocks then staged tokens ``0..s``, the packed part folded into the staged
    tokens' softmax, into ``out[rows[r]]``; update the slot's saliency
    (:func:`accumulate_saliency`). ``pool``: the staging slots' ``(k, v, score, count)``,
    ``[S, H, C, D]``, ``[S, H, C]``, ``[S, C]`` (``staged < C``).
    """
    R = rows.numel()
    if R == 0:
        return
    pool_k, pool_v, pool_score, pool_count = pool
    H, D = layout.num_kv_heads, layout.head_size
    g = q.shape[1] // H
    qr = q.index_select(0, rows)
    out_p, lse_p = attend_packed_varlen(qr, pages, block_table, num_blocks,
                                        torch.arange(R + 1, device=q.device), layout, scale)
    stage_tokens(k, v, rows, slots, staged, pool_k, pool_v)
    kl = pool_k.index_select(0, slots).float()  # [R, H, C, D]
    vl = pool_v.index_select(0, slots).float()
    sc, visible = staged_scores(qr, kl, staged, H, scale)
    m_p = lse_p.t().reshape(R, H, g)
    m = torch.maximum(m_p, sc.amax(-1))  # finite: token s is always visible
    w_p = torch.where(torch.isinf(m_p), torch.zeros_like(m_p), torch.exp(m_p - m))
    p = torch.exp(sc - m.unsqueeze(-1))
    den = w_p + p.sum(-1)
    acc = out_p.reshape(R, H, g, D) * w_p.unsqueeze(-1) + torch.einsum("rhgt,rhtd->rhgd", p, vl)
    out[rows] = (acc / den.unsqueeze(-1)).reshape(R, H * g, D).to(out.dtype)
    lse = m + torch.log(den)
    accumulate_saliency(sc, lse, visible, staged, probe, slots, pool_score, pool_count)


def _sections(pages: torch.Tensor, st: StagingLayout, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Typed views of the staging sections of every page (no copy): ``k, v [P, H, T, D]``
    (``model_dtype``, or uint8 codes), with 8 bits ``kp, vp [P, H, T, 2]`` float16
    ``(min, step)``; ``score [P, H, T]``, ``count [P, T]`` float32."""
    P = pages.shape[0]
    H, T, D = st.num_kv_heads, st.tokens_per_page, st.head_size

    def view(start: int, stop: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return pages[:, start:stop].view(dtype).reshape(P, *shape)

    out = {}
    if st.kv_bits == 8:
        out["k"] = view(0, st.v_offset, torch.uint8, H, T, D)
        out["v"] = view(st.v_offset, st.params_offset, torch.uint8, H, T, D)
        mid = st.params_offset + 4 * H * T
        out["kp"] = view(st.params_offset, mid, torch.float16, H, T, 2)
        out["vp"] = view(mid, st.score_offset, torch.float16, H, T, 2)
    else:
        out["k"] = view(0, st.v_offset, model_dtype, H, T, D)
        out["v"] = view(st.v_offset, st.score_offset, model_dtype, H, T, D)
    out["score"] = view(st.score_offset, st.count_offset, torch.float32, H, T)
    out["count"] = view(st.count_offset, st.used_bytes, torch.float32, T)
    return out


def _token_index(ids: torch.Tensor, st: StagingLayout, t0: int, t1: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Page and position in the page of staged tokens ``t0..t1-1`` (``t1 <= capacity``) of
    each run ``ids [n, pages]``: two int64 ``[n * (t1 - t0)]`` (run-major)."""
    T = st.tokens_per_page
    t = torch.arange(t0, t1, device=ids.device)
    page = ids.index_select(1, t // T).reshape(-1)
    return page, (t % T).repeat(ids.shape[0])


def quantize_rows8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit staging of rows ``x [..., D]``: uint8 codes and float16 ``(min, step)`` ``[..., 2]``
    (``quant.uniform`` over each row's own range; ``zipcache::decode_paged`` stores the
    same bits)."""
    xf = sanitize(x)
    m, s = quant_params(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), 8)
    return quantize(xf, m, s, 8), torch.cat([m, s], -1)


def dequantize_rows8(codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """float32 rows of :func:`quantize_rows8`'s output."""
    return dequantize(codes, params[..., :1], params[..., 1:])


def fake_quantize_rows8(x: torch.Tensor) -> torch.Tensor:
    """``x`` as 8-bit staging reads it back (float32)."""
    return dequantize_rows8(*quantize_rows8(x))


def store_token(pages: torch.Tensor, ids: torch.Tensor, st: StagingLayout, at: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> None:
    """Stage one token of each of ``n`` runs: ``k, v [n, H, D]`` at staged index ``at[n]``
    (``< st.capacity``) of the run ``ids [n, pages]`` (8-bit staging quantizes it, as the
    C++ decode step)."""
    T = st.tokens_per_page
    page = ids.gather(1, (at // T).unsqueeze(1)).squeeze(1)
    _put_kv(_sections(pages, st, k.dtype), st, page, at % T, k, v)


def _put_kv(sec: dict[str, torch.Tensor], st: StagingLayout, page: torch.Tensor,
            pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write token rows ``k, v [N, H, D]`` at ``(page, pos)`` of the sections ``sec``
    (:func:`_sections`), quantized when the staging is 8-bit."""
    for name, x in (("k", k), ("v", v)):
        if st.kv_bits == 8:
            codes, params = quantize_rows8(x)
            sec[name][page, :, pos] = codes
            sec[name + "p"][page, :, pos] = params
        else:
            sec[name][page, :, pos] = x.to(sec[name].dtype)


def gather_staged(pages: torch.Tensor, ids: torch.Tensor, st: StagingLayout,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paged staging of ``n`` requests as dense copies: ``ids`` int64 ``[n, pages]`` (each
    request's page run) of ``pages`` uint8 ``[num_blocks, page_bytes]`` to ``k, v
    [n, H, C, D]`` in ``dtype`` (8-bit staging: dequantized in float32, then rounded to
    ``dtype``), ``score [n, H, C]`` and ``count [n, C]`` float32, ``C = st.capacity``.
    Tokens never staged hold whatever the pages held."""
    n, C = ids.shape[0], st.capacity
    sec = _sections(pages, st, dtype)
    page, pos = _token_index(ids, st, 0, C)

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [P, H, T, ...] -> [n, H, C, ...]
        return x[page, :, pos].unflatten(0, (n, C)).transpose(1, 2)

    if st.kv_bits == 8:
        k = dequantize_rows8(tokens(sec["k"]), tokens(sec["kp"])).to(dtype)
        v = dequantize_rows8(tokens(sec["v"]), tokens(sec["vp"])).to(dtype)
    else:
        k, v = tokens(sec["k"]).to(dtype), tokens(sec["v"]).to(dtype)
    count = sec["count"][page, pos].reshape(n, C)
    return k, v, tokens(sec["score"]), count


def scatter_staged(pages: torch.Tensor, ids: torch.Tensor, st: StagingLayout, k: torch.Tensor,
                   v: torch.Tensor, score: torch.Tensor, count: torch.Tensor,
                   kv_from: int = 0, limit: torch.Tensor | None = None) -> None:
    """Write ``t`` staged tokens of ``n`` requests into their page runs (``ids [n, pages]``):
    ``k, v [n, H, t, D]``, ``score [n, H, t]``, ``count [n, t]``, ``t <= st.capacity``.
    K and V are written for tokens ``kv_from..t-1`` only (8-bit staging quantizes them
    here; tokens already staged keep the bits they were stored with), scores and counts
    for all ``t``; with ``limit`` (int64 ``[n]``) only run ``i``'s tokens before
    ``limit[i]`` (the pages after them may not be allocated yet). Other bytes of the pages
    are not touched."""
    n, t = ids.shape[0], k.shape[2]
    if t > st.capacity:
        raise ValueError(f"{t} tokens do not fit a staging capacity of {st.capacity}")
    if st.kv_bits is None and k.element_size() != st.elt_bytes:
        raise ValueError(f"staged K/V are {k.dtype}, the staging layout holds {st.elt_bytes}-byte "
                         "elements")
    if not t:
        return
    sec = _sections(pages, st, k.dtype)

    def kept(t0: int) -> torch.Tensor | None:  # run-major mask of tokens t0..t-1 to write
        if limit is None:
            return None
        return (torch.arange(t0, t, device=ids.device).unsqueeze(0) < limit.unsqueeze(1)).reshape(-1)

    page, pos = _token_index(ids, st, 0, t)
    sc, cn = score.float().transpose(1, 2).reshape(n * t, -1), count.float().reshape(-1)
    mask = kept(0)
    if mask is not None:
        page, pos, sc, cn = page[mask], pos[mask], sc[mask], cn[mask]
    sec["score"][page, :, pos] = sc
    sec["count"][page, pos] = cn
    if kv_from >= t:
        return
    page, pos = _token_index(ids, st, kv_from, t)

    def rows(x: torch.Tensor) -> torch.Tensor:  # [n, H, t, D] -> [n * (t - kv_from), H, D]
        return x[:, :, kv_from:].transpose(1, 2).reshape(-1, *x.shape[1:2], x.shape[-1])

    kr, vr = rows(k), rows(v)
    mask = kept(kv_from)
    if mask is not None:
        page, pos, kr, vr = page[mask], pos[mask], kr[mask], vr[mask]
    _put_kv(sec, st, page, pos, kr, vr)


def _byte_sections(pages: torch.Tensor, st: StagingLayout) -> list[torch.Tensor]:
    """uint8 views ``[P, heads, T, width]`` of every staging section of every page (no copy):
    K, V (and their 8-bit ``(min, step)``), score (``heads = H``), count (``heads = 1``);
    ``width`` the bytes of one token's entry of one head."""
    P, H, T = pages.shape[0], st.num_kv_heads, st.tokens_per_page
    kv = st.head_size * st.kv_elt_bytes
    spans = [(0, H, kv), (st.v_offset, H, kv)]
    if st.kv_bits == 8:
        spans += [(st.params_offset, H, 4), (st.params_offset + 4 * H * T, H, 4)]
    spans += [(st.score_offset, H, 4), (st.count_offset, 1, 4)]
    return [pages[:, off:off + heads * T * width].view(P, heads, T, width)
            for off, heads, width in spans]


def move_staged(pages: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor,
                st: StagingLayout, src_from: int, n: int) -> None:
    """Move staged tokens within paged staging, bit-exact: for each row ``i``, tokens
    ``src_from .. src_from + n - 1`` of the run ``src_ids[i]`` become tokens ``0 .. n - 1``
    of the run ``dst_ids[i]`` (int64 ``[R, st.pages]`` both).

    Every section is copied as raw bytes (K and V, their 8-bit parameters, scores,
    counts: no dequantize / requantize). With a saliency delay a request's run starts at
    its oldest staged block; once that block is packed the run moves one block on, and the
    tokens still staged move to its start: the two runs share pages, so every byte is read
    before any is written. Other bytes of the pages are not touched."""
    R = src_ids.shape[0]
    if src_ids.dim() != 2 or src_ids.shape != dst_ids.shape or src_ids.shape[1] != st.pages:
        raise ValueError(f"src_ids and dst_ids must be [R, {st.pages}], got "
                         f"{list(src_ids.shape)} and {list(dst_ids.shape)}")
    if src_from < 0 or n < 0 or src_from + n > st.capacity:
        raise ValueError(f"tokens {src_from}..{src_from + n - 1} are not within the staging "
                         f"capacity {st.capacity}")
    if not (R and n):
        return
    secs = _byte_sections(pages, st)
    src_page, src_pos = _token_index(src_ids, st, src_from, src_from + n)
    dst_page, dst_pos = _token_index(dst_ids, st, 0, n)
    moved = [x[src_page, :, src_pos] for x in secs]  # copies [R * n, heads, width]
    for x, val in zip(secs, moved):
        x[dst_page, :, dst_pos] = val


__all__ = ["GROUP_BLOCKS", "accumulate_saliency", "attend_packed_varlen", "decode_staged",
           "dequantize_rows8", "fake_quantize_rows8", "gather_staged", "move_staged",
           "quantize_rows8", "scatter_staged", "stage_tokens", "staged_scores", "store_token"]
