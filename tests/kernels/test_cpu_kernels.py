"""C++ CPU kernels (csrc/, zipcache_vllm/kernels/) and the portable PyTorch path against
PyTorch references, and the routing between them.

Attention is compared with explicit softmax attention over the *dequantized*
pages (quant.block.unpack_dequantize_blocks, token order), so only kernel error
is measured; quantize_pack must produce quant.block's bytes exactly. The
extension is built on first use; a failed build FAILS these tests (no skip).
"""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

from zipcache_vllm import kernels
from zipcache_vllm.engine.attention import merge_lse
from zipcache_vllm.kernels import build, ops, reference
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.quant.block import quantize_pack_blocks, topk_salient_mask, unpack_dequantize_blocks

# Awkward values on purpose: GQA 9:3, block counts that are no multiple of anything.
HEAD_SIZES = (64, 128)
GQA = ((2, 2), (9, 3), (8, 2), (8, 1))  # (Hq, Hk): ratios 1, 3, 4, 8
BLOCK_SIZES = (64, 128)
BITS = ((4, 2, 0.45), (3, 3, 0.0), (2, 2, 0.0), (4, 4, 0.0), (8, 2, 0.1), (4, 2, 1.0))
PRESET_BITS = BITS[:4]  # the (hi, lo) combos the presets use
NUM_PAGES = 11

# Kernel vs reference on the same dequantized data; both accumulate in float32.
# The kernel factors the dequantization (q.(c*s+m) = (q*s).c + q.m, p.(c*step+min)*ch)
# and sums in another order, so results differ by float32 rounding only:
# observed <= 3e-6 relative to max|out| for D = 128; 1e-5 leaves a 3x margin.
OUT_RTOL = 1e-5
# lse = m + log(l): absolute error ~ ulp(|m|) + relative error of l; scores are O(10).
LSE_ATOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load the cached) extension; a failed build fails every test here."""
    return build.load()


def make_pages(layout: BlockLayout, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    k = torch.randn(n, B, H, D, generator=g) * 2 + torch.randn(1, 1, H, D, generator=g)  # channel offsets
    v = torch.randn(n, B, H, D, generator=g)
    sal = topk_salient_mask(torch.rand(n, H, B, generator=g), layout.n_hi)
    # the C++ packer (fast; byte-identical to the reference, see test_quantize_pack_bit_exact)
    return kernels.quantize_pack(k, v, sal, layout)


def dense_attention(q, pages, ids, layout, scale, dequantized=None):
    """Explicit attention over the dequantized blocks ``ids``: out [nq, Hq, D], lse [Hq, nq].

    ``dequantized``: optional ``unpack_dequantize_blocks(pages, layout)`` of all pages.
    """
    nq, Hq, D = q.shape
    H = layout.num_kv_heads
    if dequantized is None:
        kd, vd = unpack_dequantize_blocks(pages.index_select(0, ids.long()), layout)  # [n, H, B, D]
    else:
        kd, vd = (t.index_select(0, ids.long()) for t in dequantized)
    k = kd.permute(1, 0, 2, 3).reshape(H, -1, D).repeat_interleave(Hq // H, 0)
    v = vd.permute(1, 0, 2, 3).reshape(H, -1, D).repeat_interleave(Hq // H, 0)
    s = torch.einsum("qhd,htd->hqt", q.float() * scale, k)
    return torch.einsum("hqt,htd->qhd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)


def assert_attention_close(out, lse, ref_out, ref_lse):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    tol = OUT_RTOL * float(ref_out.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=OUT_RTOL)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=0)


def layout_for(B, D, H, bits):
    hi, lo, ratio = bits
    return BlockLayout(B, D, H, hi, lo, int(round(ratio * B)))


# --------------------------------------------------------------------------- attention
# Every (head size, GQA, block size) combination, with the preset bit combos cycled.
ATTN_CASES = [(D, heads, B, PRESET_BITS[i % len(PRESET_BITS)])
              for i, (D, heads, B) in enumerate((D, h, B) for D in HEAD_SIZES for h in GQA for B in BLOCK_SIZES)]


@pytest.mark.parametrize("D,heads,B,bits", ATTN_CASES)
def test_attend_packed_matches_dense(D, heads, B, bits):
    Hq, Hk = heads
    layout = layout_for(B, D, Hk, bits)
    pages = make_pages(layout, NUM_PAGES, seed=D + B + Hq)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, Hq, D, generator=g)
    ids = torch.randperm(NUM_PAGES, generator=g)[:7]
    out, lse = kernels.attend_packed(q, pages, ids, layout, scale=D ** -0.5)
    assert_attention_close(out, lse, *dense_attention(q, pages, ids, layout, D ** -0.5))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("isa", ["scalar", "auto"])
def test_all_bit_widths_and_isas(bits, isa, monkeypatch):
    """Every bit width (incl. 3 and 8) through both the portable and the best ISA path."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNEL_ISA", "" if isa == "auto" else isa)
    layout = layout_for(64, 64, 3, bits)
    pages = make_pages(layout, 11, seed=3)
    q = torch.randn(3, 9, 64)
    ids = torch.tensor([10, 2, 5, 0, 7], dtype=torch.int32)
    out, lse = kernels.attend_packed(q, pages, ids, layout, scale=0.125)
    assert_attention_close(out, lse, *dense_attention(q, pages, ids, layout, 0.125))


def test_head_size_256_bf16_queries():
    layout = layout_for(64, 256, 2, BITS[0])
    pages = make_pages(layout, 6, seed=4)
    q = torch.randn(2, 4, 256).to(torch.bfloat16)
    ids = torch.tensor([5, 1, 3])
    out, lse = kernels.attend_packed(q, pages, ids, layout, scale=1 / 16)
    assert_attention_close(out, lse, *dense_attention(q.float(), pages, ids, layout, 1 / 16))


def test_pages_view_with_row_stride():
    """Pages as a view into a wider buffer (row stride > page_bytes), as a layer's slice may be."""
    layout = layout_for(64, 64, 2, BITS[0])
    pages = make_pages(layout, 5, seed=6)
    wide = torch.zeros(5, layout.page_bytes + 48, dtype=torch.uint8)
    wide[:, 16:16 + layout.page_bytes] = pages
    view = wide[:, 16:16 + layout.page_bytes]
    q = torch.randn(2, 8, 64)
    ids = torch.tensor([4, 0, 2])
    out, lse = kernels.attend_packed(q, view, ids, layout, 0.125)
    assert_attention_close(out, lse, *dense_attention(q, pages, ids, layout, 0.125))


@pytest.mark.parametrize("nq", [1, 2, 8, 37])
def test_many_queries_one_request(nq):
    """Row chunks of 8 (query x group head) that straddle queries."""
    layout = layout_for(128, 64, 3, BITS[0])
    pages = make_pages(layout, 9, seed=nq)
    q = torch.randn(nq, 9, 64)
    ids = torch.tensor([8, 0, 3])
    out, lse = kernels.attend_packed(q, pages, ids, layout, scale=0.125)
    assert_attention_close(out, lse, *dense_attention(q, pages, ids, layout, 0.125))


@pytest.mark.parametrize("threads,nreq,heads", [(2, 1, (16, 2)), (2, 8, (9, 3)), (1, 8, (9, 3)),
                                                (2, 3, (32, 8)), (2, 8, (32, 8))])
def test_attend_packed_batch_decode(threads, nreq, heads):
    """Batched decode with uneven lengths, an empty request, int32 tables, split-K.

    (2, 1, (16, 2)): 2 (request, KV head) units for 2 threads and enough work to
    thread, so the 26 blocks are split and merged by log-sum-exp.
    """
    Hq, Hk = heads
    layout = layout_for(64, 64, Hk, BITS[0])
    pages = make_pages(layout, 27, seed=nreq)  # up to 26 blocks a request: split-K kicks in
    g = torch.Generator().manual_seed(nreq)
    max_blocks = 26
    table = torch.stack([torch.randperm(27, generator=g)[:max_blocks] for _ in range(nreq)]).to(torch.int32)
    nb = torch.tensor([26, 0, 13, 1, 7, 23, 2, 17][:nreq])
    q = torch.randn(nreq, Hq, 64, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = kernels.attend_packed_batch(q, pages, table, nb, layout, scale=0.125)
    finally:
        torch.set_num_threads(old)
    deq = unpack_dequantize_blocks(pages, layout)
    for r in range(nreq):
        if nb[r] == 0:
            assert torch.equal(out[r], torch.zeros(Hq, 64))
            assert bool(torch.isneginf(lse[:, r]).all())
            continue
        ro, rl = dense_attention(q[r:r + 1], pages, table[r, :nb[r]], layout, 0.125, deq)
        assert_attention_close(out[r:r + 1], lse[:, r:r + 1], ro, rl)


@pytest.mark.parametrize("route", ["", "torch"])  # the C++ op, the portable PyTorch path
def test_varlen_matches_the_oracle(route, monkeypatch):
    """Several requests with several queries each (one with none, one without blocks,
    more than GROUP_BLOCKS blocks) against the float64 oracle."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", route)
    layout = layout_for(64, 64, 2, BITS[0])
    pages = make_pages(layout, 19, seed=9)
    q = torch.randn(12, 8, 64)
    qsl = torch.tensor([0, 3, 3, 10, 12])
    table = torch.stack([torch.arange(18), torch.arange(18).flip(0), torch.arange(1, 19),
                         torch.arange(18)])
    table[1, 2:] = 0
    nb = torch.tensor([5, 2, 18, 0])
    out, lse = kernels.attend_packed_varlen(q, pages, table, nb, qsl, layout, 0.125)
    ref_out, ref_lse = reference.attend_packed_varlen_ref(q, pages, table, nb, qsl, layout, 0.125)
    assert_attention_close(out, lse, ref_out, ref_lse)
    assert bool(torch.isneginf(lse[:, 10:]).all()) and not bool(out[10:].any())


def test_merge_with_staging_equals_full_attention():
    """packed part + staging part merged by log-sum-exp == attention over both."""
    layout = layout_for(64, 64, 3, BITS[0])
    pages = make_pages(layout, 5, seed=2)
    q = torch.randn(1, 9, 64)
    ids = torch.tensor([4, 2])
    out_p, lse_p = kernels.attend_packed(q, pages, ids, layout, 0.125)
    ks, vs = torch.randn(3, 20, 64), torch.randn(3, 20, 64)  # staged tokens [H, s, D]
    s = torch.einsum("qhd,htd->hqt", q * 0.125, ks.repeat_interleave(3, 0))
    out_s = torch.einsum("hqt,htd->qhd", torch.softmax(s, -1), vs.repeat_interleave(3, 0))
    # flat [n, Hq, D] parts, lse [Hq, n]: merged through transposed views, as the FastGen step does
    out, lse = merge_lse(out_p, lse_p.t(), out_s.clone(), torch.logsumexp(s, -1).t())
    lse = lse.t()
    kd, vd = unpack_dequantize_blocks(pages.index_select(0, ids), layout)
    k = torch.cat([kd.permute(1, 0, 2, 3).reshape(3, -1, 64), ks], 1).repeat_interleave(3, 0)
    v = torch.cat([vd.permute(1, 0, 2, 3).reshape(3, -1, 64), vs], 1).repeat_interleave(3, 0)
    sf = torch.einsum("qhd,htd->hqt", q * 0.125, k)
    assert_attention_close(out, lse, torch.einsum("hqt,htd->qhd", torch.softmax(sf, -1), v),
                           torch.logsumexp(sf, -1))
    # an empty packed part (lse = -inf) leaves the staging part unchanged
    out2, lse2 = merge_lse(torch.zeros_like(out_s), torch.full_like(lse_p, float("-inf")).t(),
                           out_s.clone(), torch.logsumexp(s, -1).t())
    torch.testing.assert_close(out2, out_s)
    torch.testing.assert_close(lse2.t(), torch.logsumexp(s, -1))


def test_merge_of_two_empty_parts_is_empty():
    """Rows where neither part saw a key: out 0, lse -inf (not NaN); the other rows as usual."""
    g = torch.Generator().manual_seed(4)
    oa, ob = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 64, generator=g)
    la, lb = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    la[1], lb[1], oa[1], ob[1] = float("-inf"), float("-inf"), 0.0, 0.0
    expect_lse = torch.logaddexp(la, lb)
    expect = oa * torch.exp(la - expect_lse).unsqueeze(-1) + ob * torch.exp(lb - expect_lse).unsqueeze(-1)
    out, lse = merge_lse(oa.clone(), la, ob.clone(), lb)
    assert not bool(out[1].any()) and bool(torch.isneginf(lse[1]).all())
    assert torch.equal(out[[0, 2]], expect[[0, 2]]) and torch.equal(lse, expect_lse)


# --------------------------------------------------------------------------- quantize / pack
def _adversarial(k: torch.Tensor) -> torch.Tensor:
    k = k.clone()
    k[0, :, 0, 0] = 3.25  # constant channel (step = EPS)
    k[0, 5, 0, :] = 0.0
    k[-1, 1, -1, 3] = float("nan")
    k[-1, 2, -1, 4] = float("inf")
    k[-1, 3, -1, 5] = -1e6  # saturates to -65504
    k[-1, :, -1, 6] = 1e-7  # float16 subnormal range
    return k


PACK_CASES = [(B, D, bits, torch.float32) for B in BLOCK_SIZES for D in HEAD_SIZES for bits in BITS]
PACK_CASES += [(64, 128, BITS[0], torch.bfloat16), (128, 64, BITS[1], torch.float16)]


@pytest.mark.parametrize("B,D,bits,dtype", PACK_CASES)
def test_quantize_pack_bit_exact(B, D, bits, dtype):
    layout = layout_for(B, D, 3, bits)
    g = torch.Generator().manual_seed(B * D)
    k = _adversarial(torch.randn(3, B, 3, D, generator=g) * 5).to(dtype)
    v = _adversarial(torch.randn(3, B, 3, D, generator=g)).to(dtype)
    sal = topk_salient_mask(torch.rand(3, 3, B, generator=g), layout.n_hi)
    got = kernels.quantize_pack(k, v, sal, layout)
    assert got.dtype == torch.uint8 and got.shape == (3, layout.page_bytes)
    assert torch.equal(got, quantize_pack_blocks(k, v, sal, layout))


@pytest.mark.parametrize("bits", [(2, 2, 0.0), (4, 2, 0.45), (3, 3, 0.0)])
def test_quantize_pack_rounds_ties_to_even_like_the_reference(bits):
    """Channels whose values sit exactly half a step between two codes (min 0, step 1
    for 2 bits): the C++ rounding must pick the even code, as torch.round does."""
    layout = layout_for(64, 64, 2, bits)
    levels = (1 << bits[1]) - 1
    ties = torch.tensor([0.0, float(levels)] + [i + 0.5 for i in range(levels)])
    k = torch.randn(2, 64, 2, 64, generator=torch.Generator().manual_seed(5))
    k[:, :, :, :8] = ties.repeat(64)[:64].view(1, 64, 1, 1)
    v = k.flip(-1).clone()
    sal = topk_salient_mask(torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(6)), layout.n_hi)
    assert torch.equal(kernels.quantize_pack(k, v, sal, layout), quantize_pack_blocks(k, v, sal, layout))


def test_quantize_pack_reads_strided_views():
    """A transposed view of the staging pool ([S, H, B, D] -> [S, B, H, D]) packs to the
    bytes of its contiguous copy."""
    layout = layout_for(64, 64, 3, BITS[0])
    g = torch.Generator().manual_seed(7)
    pool_k = torch.randn(4, 3, 64, 64, generator=g).to(torch.bfloat16)
    pool_v = torch.randn(4, 3, 64, 64, generator=g).to(torch.bfloat16)
    sal = topk_salient_mask(torch.rand(2, 3, 64, generator=g), layout.n_hi)
    kv = pool_k[1:3].transpose(1, 2), pool_v[[3, 0]].transpose(1, 2)
    assert not kv[0].is_contiguous()
    assert torch.equal(kernels.quantize_pack(*kv, sal, layout),
                       kernels.quantize_pack(kv[0].contiguous(), kv[1].contiguous(), sal, layout))


def test_quantize_pack_empty_batch():
    layout = layout_for(64, 64, 2, BITS[0])
    k = torch.zeros(0, 64, 2, 64)
    got = kernels.quantize_pack(k, k, torch.zeros(0, 2, 64, dtype=torch.bool), layout)
    assert got.shape == (0, layout.page_bytes)


@pytest.mark.parametrize("B,D,bits", [(B, D, bits) for B in BLOCK_SIZES for D in HEAD_SIZES for bits in BITS])
def test_dequantize_pages_is_bit_exact(B, D, bits):
    """The prefill's dense prefix: the same float32 bits as the reference's storage order,
    for every bit width (3-bit codes straddle bytes), all-salient and no-salient pages."""
    layout = layout_for(B, D, 3, bits)
    pages = make_pages(layout, 5, seed=B + D)
    k, v = kernels.dequantize_pages(pages, layout)
    rk, rv = unpack_dequantize_blocks(pages, layout, order="storage")
    assert k.shape == v.shape == (5, 3, B, D) and k.dtype == v.dtype == torch.float32
    assert torch.equal(k, rk) and torch.equal(v, rv)


def test_dequantize_pages_of_a_gathered_slice_and_none():
    layout = layout_for(64, 64, 2, BITS[0])
    pages = make_pages(layout, 6, seed=3)
    picked = pages[[4, 1, 1]]
    assert torch.equal(kernels.dequantize_pages(picked, layout)[1],
                       unpack_dequantize_blocks(picked, layout, order="storage")[1])
    k, v = kernels.dequantize_pages(pages[:0], layout)
    assert k.shape == v.shape == (0, 2, 64, 64)


def test_dequantize_pages_rejects_bad_arguments():
    pages = torch.zeros(2, LAYOUT.page_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError):
        kernels.dequantize_pages(pages[:, 1:], LAYOUT)
    with pytest.raises(ValueError):
        kernels.dequantize_pages(pages.int(), LAYOUT)
    with pytest.raises(ValueError):
        kernels.dequantize_pages(pages[0], LAYOUT)
    with pytest.raises(ValueError):
        kernels.dequantize_pages(pages, "layout")


# --------------------------------------------------------------------------- errors
LAYOUT = BlockLayout(64, 64, 2, 4, 2, 29)


def _valid():
    pages = torch.zeros(4, LAYOUT.page_bytes, dtype=torch.uint8)
    return torch.randn(1, 4, 64), pages, torch.tensor([0, 1])


# -- hadamard_rotate: the C++ butterfly must give the float64 reference's bits -----------
# "scalar": the portable loop; "auto": the best ISA of this CPU (AVX-512 registers where present)
ROTATE_ISAS = ["scalar", "auto"]


@pytest.mark.parametrize("isa", ROTATE_ISAS)
@pytest.mark.parametrize("D", [1, 2, 8, 64, 128, 256])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dst", [torch.float32, torch.bfloat16, torch.float16])
def test_hadamard_rotate_is_bit_exact(D, src, dst, isa, monkeypatch):
    from zipcache_vllm.quant.rotation import hadamard_rotate as rotate_ref

    monkeypatch.setenv("ZIPCACHE_VLLM_KERNEL_ISA", isa)
    g = torch.Generator().manual_seed(D)
    # rows that mix magnitudes 10^-3..10^3 (activations with outlier channels)
    x = (torch.randn(37, 3, D, generator=g) * torch.logspace(-3, 3, D)).to(src)
    y = kernels.hadamard_rotate(x, dst)
    assert y.dtype == dst and y.shape == x.shape
    assert torch.equal(y, rotate_ref(x).to(dst))
    # a row's bits do not depend on the rows beside it, nor on strides
    assert torch.equal(kernels.hadamard_rotate(x[5:6, 1:2], dst), y[5:6, 1:2])
    assert torch.equal(kernels.hadamard_rotate(x.transpose(0, 1), dst), y.transpose(0, 1))


@pytest.mark.parametrize("dst", [torch.float32, torch.bfloat16, torch.float16])
def test_hadamard_rotate_non_finite_rows_agree_across_isas(dst, monkeypatch):
    """A NaN or inf spreads over its row as in the reference; the vector path's bits are
    the portable loop's (a NaN into half output takes the portable conversion)."""
    from zipcache_vllm.quant.rotation import hadamard_rotate as rotate_ref

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    x[1, 5], x[3, 0], x[4, 9] = float("nan"), float("inf"), float("-inf")
    ys = {}
    for isa in ROTATE_ISAS:
        monkeypatch.setenv("ZIPCACHE_VLLM_KERNEL_ISA", isa)
        ys[isa] = kernels.hadamard_rotate(x, dst)
    ref = rotate_ref(x).to(dst)
    for y in ys.values():
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        assert torch.equal(y[[0, 2, 5]], ref[[0, 2, 5]])
    bits = torch.int32 if dst == torch.float32 else torch.int16
    assert len({tuple(y.view(bits).flatten().tolist()) for y in ys.values()}) == 1


def test_hadamard_rotate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="power-of-two"):
        kernels.hadamard_rotate(torch.zeros(2, 80))
    with pytest.raises(ValueError, match="dtype"):
        kernels.hadamard_rotate(torch.zeros(2, 64), torch.int32)
    with pytest.raises(ValueError, match="last dimension"):
        kernels.hadamard_rotate(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [
    lambda q, p, i: (q.double(), p, i),  # q dtype
    lambda q, p, i: (q[0], p, i),  # q rank
    lambda q, p, i: (torch.randn(1, 3, 64), p, i),  # Hq not a multiple of Hk
    lambda q, p, i: (torch.randn(1, 4, 32), p, i),  # head size
    lambda q, p, i: (q, p.to(torch.int8), i),  # pages dtype
    lambda q, p, i: (q, p[:, :-1], i),  # page bytes
    lambda q, p, i: (q, p.t().contiguous().t(), i),  # page rows not contiguous
    lambda q, p, i: (q, p, i.float()),  # id dtype
    lambda q, p, i: (q, p, torch.tensor([0, 4])),  # id out of range
    lambda q, p, i: (q, p, torch.tensor([-1])),  # negative id
])
def test_attend_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        kernels.attend_packed(*bad(*_valid()), LAYOUT, 0.125)


def test_batch_rejects_bad_arguments():
    q, pages, _ = _valid()
    table = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError):
        kernels.attend_packed_batch(q, pages, table, torch.tensor([4]), LAYOUT, 0.1)  # > max_blocks
    with pytest.raises(ValueError):
        kernels.attend_packed_batch(q, pages, table.repeat(2, 1), torch.tensor([1, 1]), LAYOUT, 0.1)
    with pytest.raises(ValueError):
        kernels.attend_packed_batch(q, pages, table, torch.tensor([1, 1]), LAYOUT, 0.1)


def test_quantize_pack_rejects_bad_arguments():
    k = torch.randn(2, 64, 2, 64)
    sal = topk_salient_mask(torch.rand(2, 2, 64), LAYOUT.n_hi)
    with pytest.raises(ValueError):
        kernels.quantize_pack(k[:, :32], k[:, :32], sal, LAYOUT)
    with pytest.raises(ValueError):
        kernels.quantize_pack(k, k[:1], sal, LAYOUT)
    with pytest.raises(ValueError):
        kernels.quantize_pack(k, k, sal.int(), LAYOUT)
    with pytest.raises(ValueError):
        kernels.quantize_pack(k, k, torch.zeros_like(sal), LAYOUT)  # wrong salient count
    with pytest.raises(ValueError):
        kernels.quantize_pack(k.double(), k.double(), sal, LAYOUT)


# --------------------------------------------------------------------------- fallback
def test_fallback_warns_once_and_matches(monkeypatch):
    def fail(verbose=False):
        raise build.KernelBuildError("no compiler (simulated)")

    layout = layout_for(64, 64, 3, BITS[0])
    pages = make_pages(layout, 4, seed=5)
    monkeypatch.setattr(build, "load", fail)
    monkeypatch.setattr(ops, "_fallback_warned", False)
    q = torch.randn(2, 9, 64)
    ids = torch.tensor([3, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = kernels.attend_packed(q, pages, ids, layout, 0.125)
        kernels.attend_packed(q, pages, ids, layout, 0.125)
        k = torch.randn(1, 64, 3, 64)
        sal = topk_salient_mask(torch.rand(1, 3, 64), layout.n_hi)
        assert torch.equal(kernels.quantize_pack(k, k, sal, layout), quantize_pack_blocks(k, k, sal, layout))
        assert torch.equal(kernels.dequantize_pages(pages, layout)[0],
                           unpack_dequantize_blocks(pages, layout, order="storage")[0])
    msgs = [w for w in caught if "portable PyTorch path" in str(w.message)]
    assert len(msgs) == 1 and issubclass(msgs[0].category, RuntimeWarning)
    assert kernels.cpu_isa() == "torch"
    assert kernels.kernel_path(q) == "torch"
    assert_attention_close(out, lse, *dense_attention(q, pages, ids, layout, 0.125))


def test_isa_report_and_forced_isa(monkeypatch):
    assert kernels.cpu_isa() in ("avx512", "avx2", "scalar")
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNEL_ISA", "bogus")
    with pytest.raises(RuntimeError, match="unknown isa"):
        kernels.attend_packed(*_valid(), LAYOUT, 0.125)


def test_install_time_extension_is_the_one_loaded():
    """scripts/setup.sh builds zipcache_vllm._C through setup.py; with current sources it
    is what build.load() uses (no compile on first use)."""
    prebuilt = build.installed_extension()
    assert prebuilt is not None, "setup.py did not build zipcache_vllm._C (see scripts/setup.sh)"
    assert build.load() == str(prebuilt)


def test_stale_install_time_extension_is_ignored(monkeypatch):
    monkeypatch.setattr(build, "build_key", lambda: "sources-changed-since-install")
    assert build.installed_extension() is None


def test_jit_can_be_forced(monkeypatch):
    monkeypatch.setenv("ZIPCACHE_VLLM_EXT", "jit")
    assert build.installed_extension() is None


# --------------------------------------------------------------------------- routing
@pytest.mark.parametrize("route,path", [("", "cpp"), ("torch", "torch"), ("reference", "torch"),
                                        ("triton", "triton")])
def test_kernel_path_routes_cpu_tensors(route, path, monkeypatch):
    """ZIPCACHE_VLLM_KERNELS picks the path of CPU tensors (``reference``: the portable
    path's older name); tensors on other non-CUDA devices take the portable path."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", route)
    assert kernels.kernel_path(torch.zeros(1)) == path
    assert kernels.uses_triton(torch.zeros(1)) == (path == "triton")
    if path != "triton":
        assert kernels.kernel_path(torch.zeros(1, device="meta")) == "torch"


def test_no_production_module_imports_the_oracles():
    """kernels/reference.py holds the tests' oracles: nothing in the package imports it."""
    package = Path(kernels.__file__).resolve().parents[1]
    importers = []
    for path in package.rglob("*.py"):
        if path == package / "kernels" / "reference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.endswith("kernels.reference") or (n == "reference" and path.parent.name == "kernels")
                   for n in names):
                importers.append(str(path.relative_to(package)))
    assert not importers, importers
