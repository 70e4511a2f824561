"""Pure Triton kernels over zipcache pages (no checks here: see ``ops.py``).

Every kernel takes the page layout as constexprs built by
``ops.layout_constexprs`` from :class:`zipcache_vllm.layout.BlockLayout`, the
single source of truth for the byte layout. Names used below:

* ``B``, ``D``: tokens per block and head size; ``B_PAD``, ``D_PAD`` the next
  powers of two (tiles), with masks for the tail.
* ``N_HI``: salient tokens per (block, KV head); ``HI_BITS``/``LO_BITS``.
* ``OFF_*``: byte offsets of the sections inside one head section,
  ``HEAD_BYTES`` its padded size; ``CONTENT`` the unpadded size.

Rows of a page are in storage order (salient tokens first); attention does not
need the token order, so the attention kernels never scatter.

Softmax runs in base 2 (queries pre-scaled by ``scale * log2(e)``); every
``lse`` a kernel writes is the natural log-sum-exp of ``scale * q.k``.
"""
from __future__ import annotations

import triton
import triton.language as tl

FP16_MAX = tl.constexpr(65504.0)
EPS = tl.constexpr(2.0 ** -14)  # smallest normal float16, as quant/uniform.py
LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------- helpers


@triton.jit
def _fp16_round(x, UP: tl.constexpr):
    """float32 ``x`` -> the float16 value towards +inf (``UP``) or -inf, saturating, as float32.

    Same as ``quant.uniform.fp16_round``: round to nearest even, then step one
    float16 ulp (``nextafter``) when that landed on the wrong side of ``x``.
    """
    y = tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX).to(tl.float16)
    yf = y.to(tl.float32)
    if UP:
        wrong = yf < x
    else:
        wrong = yf > x
    bits = y.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    is_zero = (bits & 0x7FFF) == 0
    positive = bits < 0x8000
    if UP:
        nxt = tl.where(is_zero, 1, tl.where(positive, bits + 1, bits - 1))
    else:
        nxt = tl.where(is_zero, 0x8001, tl.where(positive, bits - 1, bits + 1))
    bits = tl.where(wrong, nxt, bits)
    y = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.minimum(tl.maximum(y, -FP16_MAX), FP16_MAX)


@triton.jit
def _round_half_even(y):
    """``torch.round`` (half to even), exact for |y| < 2**23."""
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _quant_params(xmin, xmax, levels):
    """float16 ``(min, step)`` (as float32) whose grid covers ``[xmin, xmax]``; ``levels`` float32."""
    m = _fp16_round(xmin, False)
    s = _fp16_round(tl.maximum(tl.math.div_rn(xmax - m, levels), EPS), True)
    return m, s


@triton.jit
def _codes(x, m, s, levels):
    """Integer codes ``clamp(round((x - m) / s), 0, levels)`` as int32 (broadcast)."""
    q = _round_half_even(tl.math.div_rn(x - m, s))
    return tl.minimum(tl.maximum(q, 0.0), levels).to(tl.int32)


@triton.jit
def _store_packed_rows(codes, base, slot, row_mask, BITS: tl.constexpr, D: tl.constexpr,
                       R: tl.constexpr, D_PAD: tl.constexpr):
    """Pack rows of ``codes [R, D_PAD]`` little-endian (``quant/packing.py``) to ``base + slot * row_bytes``.

    Eight codes make one ``BITS``-byte word, so 3-bit codes need no special case.
    """
    BP: tl.constexpr = 2 if BITS <= 2 else (4 if BITS <= 4 else 8)  # bytes per word, padded
    ROW_BYTES: tl.constexpr = D * BITS // 8
    c3 = tl.reshape(codes, (R, D_PAD // 8, 8)).to(tl.int64)
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    word = tl.sum(c3 << shifts[None, None, :], axis=2)  # [R, D_PAD // 8]
    kk = tl.arange(0, BP)
    byts = (word[:, :, None] >> (kk * 8).to(tl.int64)[None, None, :]) & 0xFF
    g = tl.arange(0, D_PAD // 8)
    ptr = base + slot.to(tl.int64)[:, None, None] * ROW_BYTES + g[None, :, None] * BITS + kk[None, None, :]
    mask = row_mask[:, None, None] & (g < D // 8)[None, :, None] & (kk < BITS)[None, None, :]
    tl.store(ptr, byts.to(tl.uint8), mask=mask)


@triton.jit
def _load_codes(base, rows, row_mask, d, BITS: tl.constexpr, D: tl.constexpr):
    """Unpack codes ``[R, D_PAD]`` (int32) of rows ``rows`` at ``base`` (row stride ``D * BITS / 8``)."""
    ROW_BYTES: tl.constexpr = D * BITS // 8
    bitpos = d * BITS
    shift = bitpos & 7
    mask = row_mask[:, None] & (d < D)[None, :]
    ptr = base + rows.to(tl.int64)[:, None] * ROW_BYTES + (bitpos >> 3)[None, :]
    w = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    if (8 % BITS) != 0:  # a code may straddle two bytes
        hi = tl.load(ptr + 1, mask=mask & (shift + BITS > 8)[None, :], other=0).to(tl.int32)
        w = w | (hi << 8)
    return (w >> shift[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _f16_ptr(base, offset: tl.constexpr):
    return (base + offset).to(tl.pointer_type(tl.float16))


@triton.jit
def _fold(qs, m_i, l_i, acc, k, vhat, c, valid):
    """Online-softmax step: keys ``k`` / values ``vhat * c`` ``[KT, D_PAD]``, ``valid [KT]``."""
    s = tl.dot(qs, tl.trans(k), input_precision="ieee")  # [R, KT], base-2 logits
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # c is per channel and constant over a page: apply it to p @ (v / c).
    acc = acc * alpha[:, None] + tl.dot(p, vhat, input_precision="ieee") * c[None, :]
    return m_new, l_i, acc


@triton.jit
def _attend_page(qs, m_i, l_i, acc, page, d,
                 B: tl.constexpr, D: tl.constexpr, N_HI: tl.constexpr,
                 HI_BITS: tl.constexpr, LO_BITS: tl.constexpr,
                 OFF_KHI: tl.constexpr, OFF_KLO: tl.constexpr, OFF_VHI: tl.constexpr,
                 OFF_VLO: tl.constexpr, OFF_KHIP: tl.constexpr, OFF_KLOP: tl.constexpr,
                 OFF_VC: tl.constexpr, OFF_VTP: tl.constexpr,
                 KT: tl.constexpr, D_PAD: tl.constexpr):
    """Fold one packed head section at ``page`` into the online softmax of rows ``qs [R, D_PAD]``.

    ``qs`` is pre-scaled by ``scale * log2(e)``; ``m_i``/``l_i`` [R] are base-2 running
    max / sum, ``acc [R, D_PAD]`` the unnormalized output. Keys and values are
    dequantized in registers (storage order), ``KT`` rows at a time (bounds the shared
    memory of the float32 dot operands), once for all rows of the tile.
    """
    dmask = d < D
    if N_HI > 0:
        kp = _f16_ptr(page, OFF_KHIP)
        khm = tl.load(kp + d, mask=dmask, other=0.0).to(tl.float32)
        khs = tl.load(kp + D + d, mask=dmask, other=0.0).to(tl.float32)
    if N_HI < B:
        kp = _f16_ptr(page, OFF_KLOP)
        klm = tl.load(kp + d, mask=dmask, other=0.0).to(tl.float32)
        kls = tl.load(kp + D + d, mask=dmask, other=0.0).to(tl.float32)
    c = tl.load(_f16_ptr(page, OFF_VC) + d, mask=dmask, other=0.0).to(tl.float32)
    vtp = _f16_ptr(page, OFF_VTP)
    for t0 in tl.static_range(0, B, KT):
        t = t0 + tl.arange(0, KT)
        valid = t < B
        k = tl.zeros([KT, D_PAD], dtype=tl.float32)
        vq = tl.zeros([KT, D_PAD], dtype=tl.int32)
        if N_HI > t0:  # this sub-tile holds salient rows
            is_hi = t < N_HI
            kq = _load_codes(page + OFF_KHI, t, is_hi, d, HI_BITS, D)
            k = tl.where(is_hi[:, None], kq.to(tl.float32) * khs[None, :] + khm[None, :], k)
            vq = tl.where(is_hi[:, None], _load_codes(page + OFF_VHI, t, is_hi, d, HI_BITS, D), vq)
        if N_HI < t0 + KT:  # this sub-tile holds regular rows
            is_lo = valid & (t >= N_HI)
            kq = _load_codes(page + OFF_KLO, t - N_HI, is_lo, d, LO_BITS, D)
            k = tl.where(is_lo[:, None], kq.to(tl.float32) * kls[None, :] + klm[None, :], k)
            vq = tl.where(is_lo[:, None], _load_codes(page + OFF_VLO, t - N_HI, is_lo, d, LO_BITS, D), vq)
        vmin = tl.load(vtp + t, mask=valid, other=0.0).to(tl.float32)
        vstep = tl.load(vtp + B + t, mask=valid, other=0.0).to(tl.float32)
        vhat = vq.to(tl.float32) * vstep[:, None] + vmin[:, None]  # v / c, per token
        m_i, l_i, acc = _fold(qs, m_i, l_i, acc, k, vhat, c, valid)
    return m_i, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """Normalized output and natural-log lse; rows that saw no key give 0 and -inf."""
    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    return out, lse


# --------------------------------------------------------------------------- quantize + pack


@triton.jit
def _pack_precision_group(x, vcodes, page, slot, in_group, d, dmask, BITS: tl.constexpr,
                          OFF_KP: tl.constexpr, OFF_K: tl.constexpr, OFF_V: tl.constexpr,
                          D: tl.constexpr, B_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """One precision group of a block (its tokens ``in_group``, at row ``slot`` of the
    group): channelwise key parameters over the group, then its key and value codes."""
    gm = in_group[:, None] & dmask[None, :]
    kmin = tl.where(dmask, tl.min(tl.where(gm, x, float("inf")), axis=0), 0.0)
    kmax = tl.where(dmask, tl.max(tl.where(gm, x, float("-inf")), axis=0), 0.0)
    lv = tl.full([D_PAD], (1 << BITS) - 1, tl.float32)
    km, ks = _quant_params(kmin, kmax, lv)
    kp = _f16_ptr(page, OFF_KP)
    tl.store(kp + d, km.to(tl.float16), mask=dmask)
    tl.store(kp + D + d, ks.to(tl.float16), mask=dmask)
    kc = _codes(x, km[None, :], ks[None, :], lv[None, :])
    _store_packed_rows(kc, page + OFF_K, slot, in_group, BITS, D, B_PAD, D_PAD)
    _store_packed_rows(vcodes, page + OFF_V, slot, in_group, BITS, D, B_PAD, D_PAD)


@triton.jit
def quantize_pack_kernel(
    k_ptr, v_ptr, sal_ptr, c_ptr, pages_ptr, page_ids_ptr,
    stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh,
    stride_sn, stride_sh, stride_cn, stride_ch,
    stride_page,
    B: tl.constexpr, D: tl.constexpr, N_HI: tl.constexpr,
    HI_BITS: tl.constexpr, LO_BITS: tl.constexpr, HEAD_BYTES: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_KLO: tl.constexpr, OFF_VHI: tl.constexpr, OFF_VLO: tl.constexpr,
    OFF_KHIP: tl.constexpr, OFF_KLOP: tl.constexpr, OFF_VC: tl.constexpr, OFF_VTP: tl.constexpr,
    OFF_MASK: tl.constexpr, CONTENT: tl.constexpr, PAD_PAD: tl.constexpr,
    B_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """One program per (block n, KV head h): quantize ``k/v[n, :, h, :]`` into its head section.

    Grid ``(N, H)``. ``sal`` is uint8 ``[N, H, B]`` (1 = salient, exactly ``N_HI`` per row);
    ``c`` float16 ``[N, H, D]`` the value channel scales, computed by the wrapper with the
    reference's own torch ops (torch's CPU ``sqrt`` is not correctly rounded, so an
    in-kernel ``sqrt_rn`` would not match a CPU-packed reference). Everything else is in
    the kernel; bytes equal ``quant.block.quantize_pack_blocks`` (same float32
    operations, IEEE division, float16 directed rounding, round half to even).
    """
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, B_PAD)
    d = tl.arange(0, D_PAD)
    valid = t < B
    dmask = d < D
    tile = valid[:, None] & dmask[None, :]
    page = pages_ptr + tl.load(page_ids_ptr + n).to(tl.int64) * stride_page + h * HEAD_BYTES

    sal = tl.load(sal_ptr + n * stride_sn + h * stride_sh + t, mask=valid, other=0)
    is_hi = (sal != 0) & valid
    is_lo = (sal == 0) & valid
    n_before = tl.cumsum(is_hi.to(tl.int32), axis=0)  # salient tokens up to t (inclusive)
    slot = tl.where(is_hi, n_before - 1, N_HI + t - n_before)  # storage slot of token t

    # Sanitize like quant.uniform.sanitize: NaN -> 0, clamp to the float16 range.
    x = tl.load(k_ptr + n * stride_kn + h * stride_kh + t[:, None] * stride_kb + d[None, :],
                mask=tile, other=0.0).to(tl.float32)
    x = tl.minimum(tl.maximum(tl.where(x != x, 0.0, x), -FP16_MAX), FP16_MAX)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + t[:, None] * stride_vb + d[None, :],
                mask=tile, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(tl.where(v != v, 0.0, v), -FP16_MAX), FP16_MAX)

    # Value channel scale c = fp16_up(sqrt(max_t |v|)) (1 where below EPS), from the wrapper.
    c = tl.load(c_ptr + n * stride_cn + h * stride_ch + d, mask=dmask, other=1.0).to(tl.float32)
    tl.store(_f16_ptr(page, OFF_VC) + d, c.to(tl.float16), mask=dmask)
    vn = tl.math.div_rn(v, c[None, :])

    # Value token parameters: per token over the channels, at the token's bit width.
    levels_hi = tl.full([B_PAD], (1 << HI_BITS) - 1, tl.float32)
    levels_lo = tl.full([B_PAD], (1 << LO_BITS) - 1, tl.float32)
    levels = tl.where(is_hi, levels_hi, levels_lo)
    tmin = tl.min(tl.where(tile, vn, float("inf")), axis=1)
    tmax = tl.max(tl.where(tile, vn, float("-inf")), axis=1)
    tmin = tl.where(valid, tmin, 0.0)
    tmax = tl.where(valid, tmax, 0.0)
    vm, vs = _quant_params(tmin, tmax, levels)
    vtp = _f16_ptr(page, OFF_VTP)
    tl.store(vtp + slot, vm.to(tl.float16), mask=valid)
    tl.store(vtp + B + slot, vs.to(tl.float16), mask=valid)
    vcodes = _codes(vn, vm[:, None], vs[:, None], levels[:, None])

    # Keys: channelwise per precision group.
    if N_HI > 0:
        _pack_precision_group(x, vcodes, page, slot, is_hi, d, dmask, HI_BITS, OFF_KHIP, OFF_KHI,
                              OFF_VHI, D, B_PAD, D_PAD)
    if N_HI < B:
        _pack_precision_group(x, vcodes, page, slot - N_HI, is_lo, d, dmask, LO_BITS, OFF_KLOP,
                              OFF_KLO, OFF_VLO, D, B_PAD, D_PAD)

    # Precision mask (token order, bit t of the stream), only when both groups exist.
    if (N_HI > 0) & (N_HI < B):
        bits = tl.reshape(is_hi.to(tl.int32), (B_PAD // 8, 8))
        byte = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1)
        i = tl.arange(0, B_PAD // 8)
        tl.store(page + OFF_MASK + i, byte.to(tl.uint8), mask=i < B // 8)
    # Padding to HEAD_BYTES is zero, as in the reference.
    if HEAD_BYTES > CONTENT:
        j = tl.arange(0, PAD_PAD)
        tl.store(page + CONTENT + j, tl.zeros([PAD_PAD], tl.uint8), mask=j < HEAD_BYTES - CONTENT)


# --------------------------------------------------------------------------- attention


@triton.jit
def decode_attention_kernel(
    q_ptr, pages_ptr, bt_ptr, nb_ptr, out_ptr, lse_ptr,
    stride_qr, stride_qh, stride_bt, stride_page,
    stride_or, stride_oh, stride_os, stride_lr, stride_lh, stride_ls,
    qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, SPLITS: tl.constexpr, HEAD_BYTES: tl.constexpr,
    B: tl.constexpr, D: tl.constexpr, N_HI: tl.constexpr,
    HI_BITS: tl.constexpr, LO_BITS: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_KLO: tl.constexpr, OFF_VHI: tl.constexpr, OFF_VLO: tl.constexpr,
    OFF_KHIP: tl.constexpr, OFF_KLOP: tl.constexpr, OFF_VC: tl.constexpr, OFF_VTP: tl.constexpr,
    KT: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid ``(nreq, Hk, SPLITS)``: one KV head of one request over one slice of its blocks.

    All ``G`` query heads of the KV head's group are the rows of one tile, so each page is
    read and dequantized once per KV head. Writes the split's normalized output and lse
    (``out[r, h*G + g, split, :]``, ``lse[r, h*G + g, split]``); an empty split writes 0 / -inf.
    """
    req = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    qh = h * G + g
    qs = tl.load(q_ptr + req * stride_qr + qh[:, None] * stride_qh + d[None, :],
                 mask=gmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32) * qk_scale

    nb = tl.load(nb_ptr + req)
    per = tl.cdiv(nb, SPLITS)
    start = split * per
    end = tl.minimum(nb, start + per)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for i in range(start, end):
        bid = tl.load(bt_ptr + req * stride_bt + i).to(tl.int64)
        page = pages_ptr + bid * stride_page + h * HEAD_BYTES
        m_i, l_i, acc = _attend_page(qs, m_i, l_i, acc, page, d, B, D, N_HI, HI_BITS, LO_BITS,
                                     OFF_KHI, OFF_KLO, OFF_VHI, OFF_VLO, OFF_KHIP, OFF_KLOP,
                                     OFF_VC, OFF_VTP, KT, D_PAD)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(out_ptr + req * stride_or + qh[:, None] * stride_oh + split * stride_os + d[None, :],
             out, mask=gmask[:, None] & (d < D)[None, :])
    tl.store(lse_ptr + req * stride_lr + qh * stride_lh + split * stride_ls, lse, mask=gmask)


@triton.jit
def merge_splits_kernel(
    part_ptr, plse_ptr, out_ptr, lse_ptr,
    stride_pr, stride_ph, stride_ps, stride_lr, stride_lh,
    stride_or, stride_oh, stride_fr, stride_fh,
    SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid ``(nreq, Hq)``: log-sum-exp combine of the split partials of one (request, head)."""
    req = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < SPLITS
    lse = tl.load(plse_ptr + req * stride_lr + hq * stride_lh + s, mask=smask, other=float("-inf"))
    o = tl.load(part_ptr + req * stride_pr + hq * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=smask[:, None] & (d < D)[None, :], other=0.0)
    mx = tl.max(lse, axis=0)
    m_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - m_safe)
    den = tl.sum(w, axis=0)
    seen = den > 0.0
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(seen, den, 1.0)
    tl.store(out_ptr + req * stride_or + hq * stride_oh + d, out, mask=d < D)
    tl.store(lse_ptr + req * stride_fr + hq * stride_fh,
             tl.where(seen, m_safe + tl.log(tl.where(seen, den, 1.0)), float("-inf")))


@triton.jit
def merge_lse_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, lse_ptr, ROWS,
                     D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """Grid ``(cdiv(ROWS, BLOCK_R),)``: combine two contiguous partials ``[ROWS, D]`` by their lse."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, D_PAD)
    rmask = r < ROWS
    tile = rmask[:, None] & (d < D)[None, :]
    la = tl.load(la_ptr + r, mask=rmask, other=float("-inf"))
    lb = tl.load(lb_ptr + r, mask=rmask, other=float("-inf"))
    mx = tl.maximum(la, lb)
    m_safe = tl.where(mx == float("-inf"), 0.0, mx)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    den = wa + wb
    seen = den > 0.0
    inv = 1.0 / tl.where(seen, den, 1.0)
    oa = tl.load(oa_ptr + r[:, None] * D + d[None, :], mask=tile, other=0.0)
    ob = tl.load(ob_ptr + r[:, None] * D + d[None, :], mask=tile, other=0.0)
    out = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None])
    tl.store(out_ptr + r[:, None] * D + d[None, :], out, mask=tile)
    tl.store(lse_ptr + r, tl.where(seen, m_safe + tl.log(tl.where(seen, den, 1.0)), float("-inf")),
             mask=rmask)


@triton.jit
def staging_attention_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, lse_ptr,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_kt, stride_vr, stride_vh, stride_vt,
    stride_or, stride_oh, stride_lr, stride_lh,
    qk_scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, KT: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid ``(nreq, Hk)``: the G query heads of one KV head over the first ``len[r]`` staged tokens.

    The staged tokens (``BS`` slots: the staging capacity, one block or several) are read
    ``KT`` tokens at a time (a power of two, masked past ``len[r]``) with an online softmax.
    """
    req = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < D
    qh = h * G + g
    qs = tl.load(q_ptr + req * stride_qr + qh[:, None] * stride_qh + d[None, :],
                 mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * qk_scale
    n = tl.load(len_ptr + req)
    ones = tl.full([D_PAD], 1.0, tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for t0 in tl.static_range(0, BS, KT):
        t = t0 + tl.arange(0, KT)
        valid = t < n
        tile = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + req * stride_kr + h * stride_kh + t[:, None] * stride_kt + d[None, :],
                    mask=tile, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + req * stride_vr + h * stride_vh + t[:, None] * stride_vt + d[None, :],
                    mask=tile, other=0.0).to(tl.float32)
        m_i, l_i, acc = _fold(qs, m_i, l_i, acc, k, v, ones, valid)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(out_ptr + req * stride_or + qh[:, None] * stride_oh + d[None, :], out,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + req * stride_lr + qh * stride_lh, lse, mask=gmask)


@triton.jit
def prefill_attention_kernel(
    q_ptr, pages_ptr, ids_ptr, out_ptr, lse_ptr, NQ, NB,
    stride_qt, stride_qh, stride_page, stride_ot, stride_oh, stride_lt, stride_lh,
    qk_scale,
    G: tl.constexpr, BLOCK_R: tl.constexpr, HEAD_BYTES: tl.constexpr,
    B: tl.constexpr, D: tl.constexpr, N_HI: tl.constexpr,
    HI_BITS: tl.constexpr, LO_BITS: tl.constexpr,
    OFF_KHI: tl.constexpr, OFF_KLO: tl.constexpr, OFF_VHI: tl.constexpr, OFF_VLO: tl.constexpr,
    OFF_KHIP: tl.constexpr, OFF_KLOP: tl.constexpr, OFF_VC: tl.constexpr, OFF_VTP: tl.constexpr,
    KT: tl.constexpr, D_PAD: tl.constexpr,
):
    """Grid ``(cdiv(NQ * G, BLOCK_R), Hk)``: many queries of one request over all ``NB`` pages.

    Tile rows are (query, head-of-group) pairs, ``row = query * G + g``, so a page is
    dequantized once per KV head and tile for every query head of the group. No mask:
    every packed block is before every query.
    """
    h = tl.program_id(1).to(tl.int64)
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.arange(0, D_PAD)
    rmask = r < NQ * G
    qi = r // G
    qh = h * G + r % G
    tile = rmask[:, None] & (d < D)[None, :]
    qs = tl.load(q_ptr + qi[:, None] * stride_qt + qh[:, None] * stride_qh + d[None, :],
                 mask=tile, other=0.0).to(tl.float32) * qk_scale
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D_PAD], tl.float32)
    for i in range(0, NB):
        bid = tl.load(ids_ptr + i).to(tl.int64)
        page = pages_ptr + bid * stride_page + h * HEAD_BYTES
        m_i, l_i, acc = _attend_page(qs, m_i, l_i, acc, page, d, B, D, N_HI, HI_BITS, LO_BITS,
                                     OFF_KHI, OFF_KLO, OFF_VHI, OFF_VLO, OFF_KHIP, OFF_KLOP,
                                     OFF_VC, OFF_VTP, KT, D_PAD)
    out, lse = _finish(m_i, l_i, acc)
    tl.store(out_ptr + qi[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :], out, mask=tile)
    tl.store(lse_ptr + qi * stride_lt + qh * stride_lh, lse, mask=rmask)
