"""Triton kernels (``triton_kernels``) against the pure-PyTorch references.

On a machine without CUDA the kernels run in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set below before triton is imported): the sizes are tiny
on purpose. On a CUDA machine the same tests run the compiled kernels.

* quantize/pack: byte-identical pages to ``quant.block.quantize_pack_blocks``.
* attention: kernel vs explicit float64 attention over the *dequantized* pages
  (``unpack_dequantize_blocks``), so only kernel error is measured, not
  quantization error; tolerances in ``ATTN_TOL`` below.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from zipcache_vllm.kernels.triton_loader import load  # noqa: E402

# Our kernels by path: an installed `triton_kernels` (vLLM's MoE package) would shadow
# the repository folder on a CUDA machine.
_ops = load("ops")
decode_attention, merge_lse, prefill_attention = _ops.decode_attention, _ops.merge_lse, _ops.prefill_attention
quantize_pack, staging_attention = _ops.quantize_pack, _ops.staging_attention
from zipcache_vllm.engine.attention import merge_lse as engine_merge_lse  # noqa: E402
from zipcache_vllm.layout import BlockLayout  # noqa: E402
from zipcache_vllm.quant.block import (quantize_pack_blocks, topk_salient_mask,  # noqa: E402
                                       unpack_dequantize_blocks)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Awkward values, kept as constants (see STYLE.md).
HEAD_SIZES = (64, 128)
GQA_RATIOS = (1, 3, 4)
BLOCK_SIZES = (32, 64)
# Not powers of two: the kernels pad tiles to 128 and mask (Phi-2 style head size 80).
ODD_SHAPES = [(96, 80, 3, 3, 0.3), (96, 80, 4, 2, 0.45)]  # (B, D, hi, lo, frac)
# Gemma 2/3's head size (one KV head, GQA 4:1): two 128-wide channel tiles.
HEAD_256 = [(64, 256, 4, 2, 0.45), (32, 256, 3, 3, 0.0)]  # (B, D, hi, lo, frac)
NUM_BLOCKS = (1, 3, 5)  # per request
# (hi_bits, lo_bits, n_hi as a fraction of B: 0 = all low, 1 = all high, else mixed)
BIT_MIXES = [(4, 2, 0.0), (4, 2, 0.41), (4, 2, 1.0),
             (3, 3, 0.0), (3, 3, 0.3), (3, 3, 1.0),
             (2, 2, 0.0), (2, 2, 0.5), (2, 2, 1.0),
             (8, 4, 0.25)]

# Kernel vs float64 reference over the same dequantized K/V: float32 accumulation
# over <= 5 * 64 keys of O(1) values; the errors are a few float32 ulps of the
# output magnitude, scaled by the logit magnitude (|scale * q.k| up to ~10 here).
ATTN_TOL = dict(atol=2e-5, rtol=2e-5)
LSE_TOL = dict(atol=2e-5, rtol=2e-6)


def _layout(B: int, D: int, H: int, hi: int, lo: int, frac: float) -> BlockLayout:
    return BlockLayout(block_size=B, head_size=D, num_kv_heads=H, hi_bits=hi, lo_bits=lo,
                       n_hi=int(round(frac * B)))


def _pages(layout: BlockLayout, n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``n`` reference-packed pages of random K/V with random saliency."""
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    k = torch.randn(n, B, H, D, generator=gen) * 2.0 + torch.randn(1, 1, H, D, generator=gen)
    v = torch.randn(n, B, H, D, generator=gen)
    salient = topk_salient_mask(torch.rand(n, H, B, generator=gen), layout.n_hi)
    return quantize_pack_blocks(k.to(dtype), v.to(dtype), salient, layout).to(DEVICE)


def _ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """float64 attention of q ``[n, Hq, D]`` over k/v ``[T, Hk, D]`` (all visible)."""
    n, Hq, D = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)
    vv = v.double().repeat_interleave(G, dim=1)
    logits = torch.einsum("qhd,thd->qht", q.double(), kk) * scale
    return torch.einsum("qht,thd->qhd", torch.softmax(logits, -1), vv), torch.logsumexp(logits, -1)


def _dequant_tokens(pages: torch.Tensor, ids: list[int], layout: BlockLayout):
    """Dequantized K/V ``[len(ids) * B, Hk, D]`` of pages ``ids`` in order (float32)."""
    D, H = layout.head_size, layout.num_kv_heads
    if not ids:
        return torch.zeros(0, H, D), torch.zeros(0, H, D)
    kd, vd = unpack_dequantize_blocks(pages[ids].cpu(), layout)  # [n, Hk, B, D]
    return (kd.permute(0, 2, 1, 3).reshape(-1, H, D), vd.permute(0, 2, 1, 3).reshape(-1, H, D))


# --------------------------------------------------------------------------- quantize_pack


@pytest.mark.parametrize("hi,lo,frac", BIT_MIXES)
@pytest.mark.parametrize("B", BLOCK_SIZES)
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_quantize_pack_bytes_match_reference(hi, lo, frac, B, D):
    layout = _layout(B, D, 2, hi, lo, frac)
    gen = torch.Generator().manual_seed(B * 1000 + D + hi * 10 + lo + int(frac * 100))
    n = 3
    k = torch.randn(n, B, 2, D, generator=gen) * 3.0
    v = torch.randn(n, B, 2, D, generator=gen)
    v[0, :, 1, :5] = 0.0  # all-zero value channels: c = 1
    k[1, :, 0, 7] = 1.25  # constant key channel: step = EPS
    salient = topk_salient_mask(torch.rand(n, 2, B, generator=gen), layout.n_hi)
    ref = quantize_pack_blocks(k, v, salient, layout)
    out = torch.full((6, layout.page_bytes), 0xA5, dtype=torch.uint8, device=DEVICE)
    ids = torch.tensor([4, 0, 2], device=DEVICE)
    quantize_pack(k.to(DEVICE), v.to(DEVICE), salient.to(DEVICE), layout, out, ids)
    assert torch.equal(out[ids].cpu(), ref)
    assert bool((out[[1, 3, 5]] == 0xA5).all()), "pages not in page_ids were written"


@pytest.mark.parametrize("B,D,hi,lo,frac", ODD_SHAPES + HEAD_256)
def test_quantize_pack_padded_tiles(B, D, hi, lo, frac):
    layout = _layout(B, D, 1, hi, lo, frac)
    gen = torch.Generator().manual_seed(B + D + hi)
    k = torch.randn(2, B, 1, D, generator=gen)
    v = torch.randn(2, B, 1, D, generator=gen)
    salient = topk_salient_mask(torch.rand(2, 1, B, generator=gen), layout.n_hi)
    out = torch.zeros(2, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    quantize_pack(k.to(DEVICE), v.to(DEVICE), salient.to(DEVICE), layout, out,
                  torch.arange(2, device=DEVICE))
    assert torch.equal(out.cpu(), quantize_pack_blocks(k, v, salient, layout))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_pack_low_precision_inputs_and_strides(dtype):
    """bf16/fp16 inputs, k/v as non-contiguous views of a fused [N, B, 2, H, D] tensor."""
    layout = _layout(32, 64, 3, 4, 2, 0.41)
    gen = torch.Generator().manual_seed(7)
    kv = (torch.randn(2, 32, 2, 3, 64, generator=gen) * 4).to(dtype)
    kv[1, 3, 0, 1, 9] = float("nan")  # sanitized to 0 like the reference
    kv[0, 5, 1, 2, 2] = 1e30 if dtype == torch.bfloat16 else float("inf")  # saturates
    k, v = kv[:, :, 0], kv[:, :, 1]
    salient = topk_salient_mask(torch.rand(2, 3, 32, generator=gen), layout.n_hi)
    ref = quantize_pack_blocks(k, v, salient, layout)
    out = torch.zeros(2, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    quantize_pack(k.to(DEVICE), v.to(DEVICE), salient.to(DEVICE), layout, out,
                  torch.tensor([1, 0], dtype=torch.int32, device=DEVICE))
    assert torch.equal(out[[1, 0]].cpu(), ref)


def test_quantize_pack_rejects_bad_inputs():
    layout = _layout(32, 64, 1, 4, 2, 0.5)
    k = torch.zeros(1, 32, 1, 64, device=DEVICE)
    out = torch.zeros(1, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    ids = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    bad_count = torch.zeros(1, 1, 32, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="n_hi"):
        quantize_pack(k, k, bad_count, layout, out, ids)
    good = topk_salient_mask(torch.rand(1, 1, 32), 16).to(DEVICE)
    with pytest.raises(ValueError, match="k and v"):
        quantize_pack(k[:, :16], k[:, :16], good, layout, out, ids)
    with pytest.raises(ValueError, match="pages"):
        quantize_pack(k, k, good, layout, out[:, :-1], ids)
    with pytest.raises(ValueError, match="page_ids"):
        quantize_pack(k, k, good, layout, out, ids.float())


# --------------------------------------------------------------------------- decode


DECODE_CASES = [
    # (D, G, B, hi, lo, frac, Hk, split_kv)
    (64, 1, 32, 4, 2, 0.41, 2, 1),
    (64, 3, 32, 3, 3, 0.0, 1, 2),
    (64, 4, 64, 2, 2, 1.0, 1, 3),
    (128, 1, 32, 2, 2, 0.5, 1, 4),
    (128, 3, 32, 4, 2, 1.0, 2, 1),
    (128, 4, 32, 3, 3, 0.3, 1, 2),
    (64, 4, 32, 8, 4, 0.25, 1, 8),
    (64, 3, 64, 4, 2, 0.0, 1, 5),
    (80, 3, 96, 4, 2, 0.45, 1, 2),  # padded tiles (ODD_SHAPES)
    (128, 4, 128, 4, 2, 0.6, 1, 2),  # two 64-row sub-tiles, salient rows spill into the second
    (256, 4, 64, 4, 2, 0.45, 1, 2),  # Gemma 3: head size 256, one KV head
]


@pytest.mark.parametrize("D,G,B,hi,lo,frac,Hk,split_kv", DECODE_CASES)
def test_decode_attention_matches_reference(D, G, B, hi, lo, frac, Hk, split_kv):
    layout = _layout(B, D, Hk, hi, lo, frac)
    gen = torch.Generator().manual_seed(D + G * 7 + B + hi + split_kv)
    pages = _pages(layout, 12, gen)
    lens = list(NUM_BLOCKS)
    max_blocks = max(lens) + 2  # unused tail columns hold garbage ids
    table = torch.randint(0, 12, (len(lens), max_blocks), generator=gen, dtype=torch.int32)
    table[:, max(lens):] = 9999  # never read
    q = torch.randn(len(lens), Hk * G, D, generator=gen)
    scale = D ** -0.5
    out, lse = decode_attention(q.to(DEVICE), pages, table.to(DEVICE),
                                torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                                layout, scale, split_kv=split_kv)
    for r, n in enumerate(lens):
        kd, vd = _dequant_tokens(pages, table[r, :n].tolist(), layout)
        ro, rl = _ref_attention(q[r:r + 1], kd, vd, scale)
        torch.testing.assert_close(out[r].cpu().double(), ro[0], **ATTN_TOL)
        torch.testing.assert_close(lse[r].cpu().double(), rl[0], **LSE_TOL)


def test_decode_attention_empty_request_and_bf16_query():
    """num_blocks = 0 gives output 0 and lse -inf (the identity of merge_lse)."""
    layout = _layout(32, 64, 1, 4, 2, 0.41)
    gen = torch.Generator().manual_seed(3)
    pages = _pages(layout, 4, gen)
    q = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    table = torch.tensor([[2, 1, 3], [0, 0, 0]], dtype=torch.int32)
    nb = torch.tensor([3, 0], dtype=torch.int32)
    for split in (1, 2):
        out, lse = decode_attention(q.to(DEVICE), pages, table.to(DEVICE), nb.to(DEVICE), layout,
                                    0.125, split_kv=split)
        kd, vd = _dequant_tokens(pages, [2, 1, 3], layout)
        ro, rl = _ref_attention(q[:1].float(), kd, vd, 0.125)
        torch.testing.assert_close(out[0].cpu().double(), ro[0], **ATTN_TOL)
        torch.testing.assert_close(lse[0].cpu().double(), rl[0], **LSE_TOL)
        assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())


def test_decode_attention_rejects_bad_inputs():
    layout = _layout(32, 64, 2, 4, 2, 0.5)
    pages = torch.zeros(2, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    nb = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(torch.zeros(1, 3, 64, device=DEVICE), pages, table, nb, layout, 1.0)
    with pytest.raises(ValueError, match="head size"):
        decode_attention(torch.zeros(1, 2, 128, device=DEVICE), pages, table, nb, layout, 1.0)
    with pytest.raises(ValueError, match="block_table"):
        decode_attention(torch.zeros(1, 2, 64, device=DEVICE), pages, table.long(), nb, layout, 1.0)
    with pytest.raises(ValueError, match="contiguous in the head dim"):
        q = torch.zeros(1, 64, 2, device=DEVICE).transpose(1, 2)
        decode_attention(q, pages, table, nb, layout, 1.0)


# --------------------------------------------------------------------------- staging + merge


@pytest.mark.parametrize("G", GQA_RATIOS)
def test_staging_attention_and_merge_match_full_attention(G):
    """Packed pages + staging block merged by LSE == attention over both (one request each)."""
    Hk, D, B = 2, 64, 32
    layout = _layout(B, D, Hk, 4, 2, 0.41)
    gen = torch.Generator().manual_seed(11 + G)
    pages = _pages(layout, 6, gen)
    nreq = 3
    lens = [2, 0, 3]
    table = torch.tensor([[5, 1, 0], [0, 0, 0], [3, 2, 4]], dtype=torch.int32)
    stage_len = torch.tensor([1, 7, B], dtype=torch.int32)
    k_st = torch.randn(nreq, Hk, B, D, generator=gen).to(torch.bfloat16)
    v_st = torch.randn(nreq, Hk, B, D, generator=gen).to(torch.bfloat16)
    q = torch.randn(nreq, Hk * G, D, generator=gen)
    scale = 0.15
    po, pl = decode_attention(q.to(DEVICE), pages, table.to(DEVICE),
                              torch.tensor(lens, dtype=torch.int32, device=DEVICE), layout, scale,
                              split_kv=2)
    so, sl = staging_attention(q.to(DEVICE), k_st.to(DEVICE), v_st.to(DEVICE),
                               stage_len.to(DEVICE), scale)
    out, lse = merge_lse(po, pl, so, sl)
    for r in range(nreq):
        kd, vd = _dequant_tokens(pages, table[r, :lens[r]].tolist(), layout)
        n = int(stage_len[r])
        ks = k_st[r, :, :n].float().transpose(0, 1)  # [n, Hk, D]
        vs = v_st[r, :, :n].float().transpose(0, 1)
        ro, rl = _ref_attention(q[r:r + 1], torch.cat([kd, ks]), torch.cat([vd, vs]), scale)
        torch.testing.assert_close(out[r].cpu().double(), ro[0], **ATTN_TOL)
        torch.testing.assert_close(lse[r].cpu().double(), rl[0], **LSE_TOL)
        so_ref, sl_ref = _ref_attention(q[r:r + 1], ks, vs, scale)
        torch.testing.assert_close(so[r].cpu().double(), so_ref[0], **ATTN_TOL)
        torch.testing.assert_close(sl[r].cpu().double(), sl_ref[0], **LSE_TOL)


def test_staging_attention_two_subtiles():
    """A 128-slot staging block at D = 128 is read in two 64-token sub-tiles."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(3, 4, 128, generator=gen)
    k = torch.randn(3, 1, 128, 128, generator=gen).to(torch.bfloat16)
    v = torch.randn(3, 1, 128, 128, generator=gen).to(torch.bfloat16)
    lens = [65, 128, 64]
    out, lse = staging_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                 torch.tensor(lens, dtype=torch.int32, device=DEVICE), 0.09)
    for r, n in enumerate(lens):
        ro, rl = _ref_attention(q[r:r + 1], k[r, :, :n].float().transpose(0, 1),
                                v[r, :, :n].float().transpose(0, 1), 0.09)
        torch.testing.assert_close(out[r].cpu().double(), ro[0], **ATTN_TOL)
        torch.testing.assert_close(lse[r].cpu().double(), rl[0], **LSE_TOL)


def test_staging_attention_empty_rows():
    q = torch.randn(2, 2, 64, device=DEVICE)
    kv = torch.randn(2, 1, 16, 64, device=DEVICE)
    out, lse = staging_attention(q, kv, kv, torch.tensor([0, 16], dtype=torch.int32, device=DEVICE), 0.1)
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())
    assert bool(torch.isfinite(lse[1]).all())


def test_merge_lse_identities():
    gen = torch.Generator().manual_seed(5)
    oa, ob = torch.randn(3, 4, 64, generator=gen), torch.randn(3, 4, 64, generator=gen)
    la, lb = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    la[0] = float("-inf")  # a side without keys contributes nothing
    lb[1] = float("-inf")
    la[2, 0] = lb[2, 0] = float("-inf")  # neither side: 0 / -inf
    out, lse = merge_lse(*(t.to(DEVICE) for t in (oa, la, ob, lb)))
    out, lse = out.cpu(), lse.cpu()
    ref_lse = torch.logaddexp(la, lb)
    wa = torch.exp(la - ref_lse).nan_to_num(0.0).unsqueeze(-1)  # -inf - -inf: no keys at all
    wb = torch.exp(lb - ref_lse).nan_to_num(0.0).unsqueeze(-1)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, wa * oa + wb * ob, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0], ob[0])
    torch.testing.assert_close(out[1], oa[1])
    assert bool((out[2, 0] == 0).all()) and bool(torch.isneginf(lse[2, 0]))
    # the step engine's merge (engine/attention.py, every Python caller's): the same result
    oa[2, 0] = ob[2, 0] = 0.0  # a part without keys has out = 0
    eng_out, eng_lse = engine_merge_lse(oa.clone(), la, ob.clone(), lb)
    torch.testing.assert_close(out, eng_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, eng_lse, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- prefill


PREFILL_CASES = [
    # (D, G, B, hi, lo, frac, Hk, nq, nb)
    (64, 1, 32, 4, 2, 0.41, 2, 5, 1),
    (64, 3, 32, 3, 3, 0.3, 1, 7, 3),
    (128, 4, 32, 2, 2, 0.0, 1, 9, 5),
    (128, 3, 64, 4, 2, 1.0, 1, 3, 3),
    (256, 4, 64, 4, 2, 0.45, 1, 5, 2),  # Gemma 3: head size 256, one KV head
]


@pytest.mark.parametrize("D,G,B,hi,lo,frac,Hk,nq,nb", PREFILL_CASES)
def test_prefill_attention_matches_reference(D, G, B, hi, lo, frac, Hk, nq, nb):
    layout = _layout(B, D, Hk, hi, lo, frac)
    gen = torch.Generator().manual_seed(nq * 100 + nb + D)
    pages = _pages(layout, nb + 2, gen)
    ids = torch.randperm(nb + 2, generator=gen)[:nb]
    q = torch.randn(nq, Hk * G, D, generator=gen)
    scale = D ** -0.5
    out, lse = prefill_attention(q.to(DEVICE), pages, ids.to(DEVICE), layout, scale, block_rows=16)
    kd, vd = _dequant_tokens(pages, ids.tolist(), layout)
    ro, rl = _ref_attention(q, kd, vd, scale)
    torch.testing.assert_close(out.cpu().double(), ro, **ATTN_TOL)
    torch.testing.assert_close(lse.cpu().double(), rl, **LSE_TOL)


def test_kernels_roundtrip_own_pages():
    """Pages written by quantize_pack are read back by decode_attention (kernel to kernel)."""
    layout = _layout(32, 64, 2, 4, 2, 0.41)
    gen = torch.Generator().manual_seed(21)
    k = torch.randn(3, 32, 2, 64, generator=gen)
    v = torch.randn(3, 32, 2, 64, generator=gen)
    salient = topk_salient_mask(torch.rand(3, 2, 32, generator=gen), layout.n_hi)
    pages = torch.zeros(4, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    quantize_pack(k.to(DEVICE), v.to(DEVICE), salient.to(DEVICE), layout, pages,
                  torch.tensor([3, 1, 2], device=DEVICE))
    q = torch.randn(1, 8, 64, generator=gen)
    out, lse = decode_attention(q.to(DEVICE), pages, torch.tensor([[3, 1, 2]], dtype=torch.int32,
                                                                  device=DEVICE),
                                torch.tensor([3], dtype=torch.int32, device=DEVICE), layout, 0.125)
    kd, vd = _dequant_tokens(pages, [3, 1, 2], layout)
    ro, rl = _ref_attention(q, kd, vd, 0.125)
    torch.testing.assert_close(out.cpu().double(), ro, **ATTN_TOL)
    torch.testing.assert_close(lse.cpu().double(), rl, **LSE_TOL)


def test_kernels_compile_for_sm90():
    """The interpreter misses compiler-only errors: build every kernel for sm_90 (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; quantize_pack disables it
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-m", "triton_kernels.compile_check", "--quick"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "all kernels compiled for sm_90" in res.stdout
