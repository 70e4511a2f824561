"""Reference quantizers: the uniform quantizer and whole-page pack/unpack.

What is checked, and against what:
* the uniform quantizer against its analytic bound (every element within half
  the *stored* float16 step) and the tightness of its float16 parameters;
* the packed page against an independent per-(block, head) packer written here
  from the layout's docstring, section by section, so a size, offset, order or
  endianness mistake in either ``layout.py`` or ``block.py`` shows up as a
  mismatch of named bytes, and padding must be zero;
* the round trip against the half-step bound using the parameters read back
  from the page itself;
* adversarial inputs (zeros, constants, +-1e6, NaN, +-inf) against the module
  docstring's definition: NaN -> 0, magnitudes saturate to +-65504, and never
  a NaN or inf in the output.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tolerances import HALF_STEP_SLACK, SALIENT_ERROR_RATIO, VALUE_SLACK, rel_step_bound
from zipcache_vllm.layout import SUPPORTED_BITS, BlockLayout
from zipcache_vllm.quant import (
    dequantize,
    pack_bits,
    quant_params,
    quantize,
    quantize_pack_blocks,
    topk_salient_mask,
    unpack_dequantize_blocks,
)
from zipcache_vllm.quant.block import storage_order, unpack_salient_mask
from zipcache_vllm.quant.uniform import EPS, FP16_MAX, fp16_round, sanitize

NAN, INF = float("nan"), float("inf")
SLACK32 = HALF_STEP_SLACK[torch.float32]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# ---------------------------------------------------------------------------------------
# Independent helpers (numpy / plain Python; they do not call the code under test)
# ---------------------------------------------------------------------------------------


def ref_sanitize(x: torch.Tensor) -> torch.Tensor:
    """The documented input definition: NaN -> 0, everything clamped to +-65504, float32."""
    y = x.float().clone()
    y[torch.isnan(y)] = 0.0
    return y.clamp(-FP16_MAX, FP16_MAX)


def fp16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest float16 >= x (float32 in, float16 out), for |x| <= 65504."""
    x = np.asarray(x, dtype=np.float32)
    y = x.astype(np.float16)
    low = y.astype(np.float32) < x
    y[low] = np.nextafter(y[low], np.float16(np.inf))
    return y


def fp16_floor(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    y = x.astype(np.float16)
    high = y.astype(np.float32) > x
    y[high] = np.nextafter(y[high], np.float16(-np.inf))
    return y


def fp16_bytes(*arrays: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.to(torch.float16).reshape(-1) for a in arrays]).view(torch.uint8)


# ---------------------------------------------------------------------------------------
# Uniform quantizer
# ---------------------------------------------------------------------------------------

SCALES = (1e-6, 1e-3, 1.0, 300.0, 5e3)  # 1e-6: step clamped to EPS; 5e3: ranges near 6e4


def groups(scale: float, seed: int, g: int = 64, n: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, n, generator=gen) * scale
    x += torch.randn(g, 1, generator=gen) * scale  # per-group offsets, some groups all > 0
    return ref_sanitize(x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("scale", SCALES)
def test_params_are_float16_and_tight(bits, scale):
    x = groups(scale, seed=bits)
    xmin, xmax = x.amin(-1), x.amax(-1)
    m, s = quant_params(xmin, xmax, bits)
    assert m.dtype == torch.float16 and s.dtype == torch.float16
    assert m.shape == s.shape == xmin.shape
    # zero point: the largest float16 <= min (rounded down, never past it)
    assert torch.equal(m, torch.from_numpy(fp16_floor(xmin.numpy())))
    # step: at least EPS, the grid reaches max, and not wastefully large
    sf, mf = s.float(), m.float()
    assert (sf >= EPS).all()
    top = mf.double() + ((1 << bits) - 1) * sf.double()
    assert (top >= xmax.double() - 4 * SLACK32.rtol * xmax.abs().double() - SLACK32.atol).all()
    assert (sf <= torch.clamp(rel_step_bound(bits) * (xmax - mf), min=EPS) * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("scale", SCALES)
def test_every_element_within_half_stored_step(bits, scale):
    x = groups(scale, seed=100 + bits)
    m, s = quant_params(x.amin(-1), x.amax(-1), bits)
    q = quantize(x, m.unsqueeze(-1), s.unsqueeze(-1), bits)
    assert q.dtype == torch.uint8 and int(q.max()) <= (1 << bits) - 1
    xr = dequantize(q, m.unsqueeze(-1), s.unsqueeze(-1))
    assert xr.dtype == torch.float32
    bound = s.float().unsqueeze(-1) / 2 + SLACK32.atol + SLACK32.rtol * x.abs().amax(-1, keepdim=True)
    assert ((xr - x).abs() <= bound).all(), float(((xr - x).abs() - bound).max())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_full_fp16_range_within_half_stored_step(bits):
    """After sanitizing, a group may span [-65504, 65504]; the bound must still hold.

    At 1 bit the needed step (131008) does not fit in float16, so the stored
    step saturates to 65504 and +65504 decodes to 0 (error 65504 > s/2).
    """
    x = torch.tensor([[-FP16_MAX, -1000.0, 0.0, 1000.0, FP16_MAX, 12345.0, -3.0, 7.0]])
    m, s = quant_params(x.amin(-1), x.amax(-1), bits)
    xr = dequantize(quantize(x, m.unsqueeze(-1), s.unsqueeze(-1), bits), m.unsqueeze(-1), s.unsqueeze(-1))
    assert torch.isfinite(xr).all()
    bound = s.float().unsqueeze(-1) / 2 + SLACK32.rtol * FP16_MAX
    assert ((xr - x).abs() <= bound).all(), f"bits={bits} step={s.item()} decoded={xr.tolist()}"


# float16-representable constants, including subnormal, EPS and the float16 limits
FP16_CONSTANTS = (0.0, -0.0, 1.0, -3.75, 2.0 ** -24, -(2.0 ** -20), EPS, 0.0999755859375, 12344.0,
                  FP16_MAX, -FP16_MAX)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("c", FP16_CONSTANTS)
def test_constant_group_reconstructs_exactly(bits, c):
    assert float(torch.tensor(c).half()) == c  # the constant is float16-representable
    x = torch.full((3, 16), c)
    m, s = quant_params(x.amin(-1), x.amax(-1), bits)
    assert torch.isfinite(s.float()).all() and (s.float() == EPS).all()
    q = quantize(x, m.unsqueeze(-1), s.unsqueeze(-1), bits)
    assert torch.equal(dequantize(q, m.unsqueeze(-1), s.unsqueeze(-1)), x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("c", (0.1, -1e-9, 12345.678, 3.0e-5, -65503.9))
def test_constant_group_not_in_fp16_is_within_half_step(bits, c):
    """A constant that float16 cannot hold is off by its float16 rounding, within s/2."""
    x = torch.full((2, 8), c)
    m, s = quant_params(x.amin(-1), x.amax(-1), bits)
    xr = dequantize(quantize(x, m.unsqueeze(-1), s.unsqueeze(-1), bits), m.unsqueeze(-1), s.unsqueeze(-1))
    assert torch.isfinite(xr).all()
    assert ((xr - x).abs() <= s.float().unsqueeze(-1) / 2 + SLACK32.rtol * abs(c)).all()


def test_zeros():
    x = torch.zeros(4, 8)
    for bits in SUPPORTED_BITS:
        m, s = quant_params(x.amin(-1), x.amax(-1), bits)
        assert (m == 0).all() and (s.float() == EPS).all()
        q = quantize(x, m.unsqueeze(-1), s.unsqueeze(-1), bits)
        assert (q == 0).all()
        assert torch.equal(dequantize(q, m.unsqueeze(-1), s.unsqueeze(-1)), x)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_quantize_clamps_values_outside_the_grid(bits):
    m, s = torch.tensor(1.0).half(), torch.tensor(0.5).half()
    q = quantize(torch.tensor([-100.0, 0.9, 1.0, 1e4]), m, s, bits)
    assert q.tolist() == [0, 0, 0, (1 << bits) - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sanitize_defines_adversarial_values(dtype):
    x = torch.tensor([NAN, INF, -INF, 1e6, -1e6, FP16_MAX, -FP16_MAX, 1.5, -0.0, 0.0], dtype=dtype)
    y = sanitize(x)
    assert y.dtype == torch.float32
    expected = torch.tensor([0.0, FP16_MAX, -FP16_MAX, FP16_MAX, -FP16_MAX, FP16_MAX, -FP16_MAX, 1.5, 0.0, 0.0])
    # (float16 cannot hold 1e6: it arrives as inf and saturates the same way)
    assert torch.equal(y, expected)
    assert torch.isnan(x[0])  # the input is not modified in place


def test_fp16_round_directions_match_numpy():
    gen = torch.Generator().manual_seed(0)
    mags = torch.exp(torch.empty(4000).uniform_(-25, 11, generator=gen))  # 1e-11 .. 6e4
    x = (mags * torch.randn(4000, generator=gen).sign()).clamp(-FP16_MAX, FP16_MAX)
    x = torch.cat([x, torch.tensor([0.0, EPS, 2.0 ** -24, 1.0, FP16_MAX, -FP16_MAX, 65500.5, -1e-30])])
    up, down = fp16_round(x, up=True), fp16_round(x, up=False)
    assert up.dtype == down.dtype == torch.float16
    assert torch.equal(up, torch.from_numpy(fp16_ceil(x.numpy())))
    assert torch.equal(down, torch.from_numpy(fp16_floor(x.numpy())))


def test_fp16_round_saturates():
    x = torch.tensor([1e6, -1e6, 65519.0, 70000.0])
    assert fp16_round(x, up=True).tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX]
    assert fp16_round(x, up=False).tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX]


# ---------------------------------------------------------------------------------------
# topk_salient_mask
# ---------------------------------------------------------------------------------------


def ref_topk(row: list[float], n_hi: int) -> set[int]:
    """Largest first, ties to the earlier index, NaN after everything (even -inf)."""
    key = sorted(range(len(row)), key=lambda i: (np.isnan(row[i]), -row[i] if not np.isnan(row[i]) else 0, i))
    return set(key[:n_hi])


@pytest.mark.parametrize("n_hi", [0, 1, 7, 31, 32])
def test_topk_exact_count_and_largest(n_hi):
    gen = torch.Generator().manual_seed(n_hi)
    scores = torch.randn(3, 4, 32, generator=gen)
    mask = topk_salient_mask(scores, n_hi)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert (mask.sum(-1) == n_hi).all()
    for row, mrow in zip(scores.reshape(-1, 32).tolist(), mask.reshape(-1, 32).tolist()):
        assert {i for i, b in enumerate(mrow) if b} == ref_topk(row, n_hi)


def test_topk_ties_go_to_earlier_tokens():
    assert topk_salient_mask(torch.ones(16), 5).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    s = torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 0.0])
    assert topk_salient_mask(s, 4).nonzero().flatten().tolist() == [1, 2, 3, 5]


def test_topk_nan_ranks_last():
    s = torch.tensor([NAN, -INF, NAN, 0.5, -1e30, NAN, 0.0, 3.0])
    assert topk_salient_mask(s, 5).nonzero().flatten().tolist() == [1, 3, 4, 6, 7]
    assert topk_salient_mask(s, 6).nonzero().flatten().tolist() == [0, 1, 3, 4, 6, 7]
    assert topk_salient_mask(torch.full((8,), NAN), 3).nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_accepts_low_precision_scores(dtype):
    s = torch.tensor([0.1, 0.5, 0.3, 0.9], dtype=dtype)
    assert topk_salient_mask(s, 2).tolist() == [False, True, False, True]


@pytest.mark.parametrize("n_hi", [-1, 9])
def test_topk_rejects_impossible_counts(n_hi):
    """Promised: exactly n_hi per row. n_hi outside [0, B] cannot be honoured and must raise
    (today -1 silently marks B-1 tokens, B+1 silently marks B)."""
    with pytest.raises(ValueError, match="n_hi"):
        topk_salient_mask(torch.randn(2, 8), n_hi)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.5, NAN, INF, -INF, 2.0, -1e30]), min_size=8, max_size=24),
       st.data())
def test_topk_fuzz_against_brute_force(row, data):
    n_hi = data.draw(st.integers(0, len(row)))
    mask = topk_salient_mask(torch.tensor(row), n_hi)
    assert {i for i, b in enumerate(mask.tolist()) if b} == ref_topk(row, n_hi)


# ---------------------------------------------------------------------------------------
# Whole pages: quantize_pack_blocks / unpack_dequantize_blocks
# ---------------------------------------------------------------------------------------

HEAD_SIZES = (64, 128)
NUM_KV_HEADS = (1, 3, 8)
BLOCK_SIZES = (32, 64, 128)
# (hi_bits, lo_bits, n_hi as a function of B): mixed 4/2 with an odd count at B=32
# (19 = round(0.6 * 32)), uniform 3-bit stored as all-regular and as all-salient,
# mixed 8/4 and 8/2.
BIT_CONFIGS = {
    "4/2": (4, 2, lambda B: round(0.6 * B)),
    "3/3-none": (3, 3, lambda B: 0),
    "3/3-all": (3, 3, lambda B: B),
    "8/4": (8, 4, lambda B: B // 4 + 1),
    "8/2": (8, 2, lambda B: B // 2 - 3),
}
NUM_BLOCKS = 2


def make_layout(B, H, D, cfg) -> BlockLayout:
    hi, lo, n_hi = BIT_CONFIGS[cfg]
    return BlockLayout(block_size=B, head_size=D, num_kv_heads=H, hi_bits=hi, lo_bits=lo, n_hi=n_hi(B))


def make_kv(n, B, H, D, seed):
    """Keys with per-channel outlier scales and offsets (as after RoPE); values Gaussian."""
    g = torch.Generator().manual_seed(seed)
    chan = torch.exp(torch.randn(1, 1, H, D, generator=g))
    k = torch.randn(n, B, H, D, generator=g) * chan + 2 * torch.randn(1, 1, H, D, generator=g)
    v = torch.randn(n, B, H, D, generator=g) * 0.5
    return k, v


def random_mask(n, H, B, n_hi, seed):
    g = torch.Generator().manual_seed(seed)
    return topk_salient_mask(torch.rand(n, H, B, generator=g), n_hi)


@functools.lru_cache(maxsize=None)
def packed_case(B, H, D, cfg):
    """(layout, k, v, salient, pages); shared by several tests, never mutated."""
    L = make_layout(B, H, D, cfg)
    seed = B * 7 + H * 131 + D + len(cfg)
    k, v = make_kv(NUM_BLOCKS, B, H, D, seed)
    sal = random_mask(NUM_BLOCKS, H, B, L.n_hi, seed)
    return L, k, v, sal, quantize_pack_blocks(k, v, sal, L)


def ref_head_sections(k: torch.Tensor, v: torch.Tensor, sal: torch.Tensor, L: BlockLayout) -> dict:
    """Independent packer for ONE (block, head), from the layout docstring.

    k, v: float32 ``[B, D]`` (already sanitized), sal: bool ``[B]``.
    Returns section name -> uint8 bytes (every section, empty ones included);
    parameters computed with quant_params, codes with quantize + pack_bits,
    storage order, channel scale, byte order and mask here.
    """
    B = L.block_size
    flags = sal.tolist()
    order = [t for t in range(B) if flags[t]] + [t for t in range(B) if not flags[t]]
    ks, vs = k[order], v[order]
    c = fp16_ceil(np.sqrt(vs.abs().amax(0).numpy()))
    c[c.astype(np.float32) < EPS] = 1.0
    c = torch.from_numpy(c)
    vn = vs / c.float()
    out = {name: torch.zeros(0, dtype=torch.uint8) for name in
           ("k_hi_codes", "k_lo_codes", "v_hi_codes", "v_lo_codes", "k_hi_params", "k_lo_params")}
    vmins, vsteps = [], []
    for tag, rows, bits in (("hi", slice(0, L.n_hi), L.hi_bits), ("lo", slice(L.n_hi, B), L.lo_bits)):
        kg, vg = ks[rows], vn[rows]
        if kg.shape[0] == 0:
            continue
        km, kst = quant_params(kg.amin(0), kg.amax(0), bits)
        out[f"k_{tag}_codes"] = pack_bits(quantize(kg, km, kst, bits), bits).reshape(-1)
        out[f"k_{tag}_params"] = fp16_bytes(km, kst)  # all mins, then all scales
        vm, vst = quant_params(vg.amin(1), vg.amax(1), bits)
        out[f"v_{tag}_codes"] = pack_bits(quantize(vg, vm[:, None], vst[:, None], bits), bits).reshape(-1)
        vmins.append(vm)
        vsteps.append(vst)
    out["v_channel_scale"] = fp16_bytes(c)
    out["v_token_params"] = fp16_bytes(*vmins, *vsteps)  # B mins then B steps, storage order
    mask = [0] * ((B + 7) // 8) if L.mixed else []
    for t in range(B):
        if flags[t] and L.mixed:
            mask[t // 8] |= 1 << (t % 8)
    out["mask"] = torch.tensor(mask, dtype=torch.uint8)
    return out


def head_bytes_of(pages, L, n, h):
    return pages[n, h * L.head_bytes:(h + 1) * L.head_bytes]


def check_page_against_reference(k, v, sal, pages, L):
    ks, vs = ref_sanitize(k), ref_sanitize(v)
    assert pages.dtype == torch.uint8 and pages.shape == (k.shape[0], L.page_bytes)
    for n in range(k.shape[0]):
        for h in range(L.num_kv_heads):
            ref = ref_head_sections(ks[n, :, h], vs[n, :, h], sal[n, h], L)
            head = head_bytes_of(pages, L, n, h)
            # the layout's sizes are exactly the bytes the packer produces ...
            assert sum(t.numel() for t in ref.values()) + L.padding_bytes == L.head_bytes
            for sec in L.sections:
                assert ref[sec.name].numel() == sec.nbytes, (sec.name, n, h)
                # ... and sit at the layout's offsets
                assert torch.equal(head[sec.offset:sec.end], ref[sec.name]), (sec.name, n, h)
            assert (head[L.content_bytes:] == 0).all(), "padding must be zero"


def read_params(pages, L, name):
    n = pages.shape[0]
    sec = L.section(name)
    p = pages.reshape(n, L.num_kv_heads, L.head_bytes)[..., sec.offset:sec.end]
    return p.contiguous().view(torch.float16).float()


def error_bounds(pages, L, sal, k, v):
    """Per-element bounds on |k^ - k| and |v^ - v| from the parameters stored in the pages.

    Returns float32 ``[N, H, B, D]`` bounds in token order.
    """
    n, H, B, D = pages.shape[0], L.num_kv_heads, L.block_size, L.head_size
    ks = ref_sanitize(k).permute(0, 2, 1, 3)  # [N, H, B, D]
    vs = ref_sanitize(v).permute(0, 2, 1, 3)
    k_step = torch.zeros(n, H, B, D)
    for tag, members in (("hi", sal), ("lo", ~sal)):
        if L.section(f"k_{tag}_params").nbytes:
            step = read_params(pages, L, f"k_{tag}_params").reshape(n, H, 2, D)[:, :, 1]
            k_step = torch.where(members.unsqueeze(-1), step.unsqueeze(2), k_step)
    kmag = ks.abs().amax(2, keepdim=True)
    k_bound = k_step / 2 + SLACK32.atol + SLACK32.rtol * kmag

    c = read_params(pages, L, "v_channel_scale")  # [N, H, D]
    v_step_storage = read_params(pages, L, "v_token_params")[..., B:]  # [N, H, B] storage order
    order = storage_order(sal)
    v_step = torch.empty_like(v_step_storage).scatter_(-1, order, v_step_storage)
    cc = c.unsqueeze(2)
    v_bound = v_step.unsqueeze(-1) / 2 * cc + VALUE_SLACK.atol + VALUE_SLACK.rtol * (cc * cc + vs.abs())
    return ks, vs, k_bound, v_bound


CASES = [(B, H, D, cfg) for cfg in BIT_CONFIGS for B in BLOCK_SIZES for H in NUM_KV_HEADS for D in HEAD_SIZES]


def case_id(case):
    B, H, D, cfg = case
    return f"B{B}-H{H}-D{D}-{cfg}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_page_bytes_match_independent_packer(case):
    L, k, v, sal, pages = packed_case(*case)
    assert pages.shape == (NUM_BLOCKS, L.page_bytes)
    check_page_against_reference(k, v, sal, pages, L)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_round_trip_within_half_stored_step(case):
    L, k, v, sal, pages = packed_case(*case)
    kd, vd = unpack_dequantize_blocks(pages, L)
    assert kd.dtype == vd.dtype == torch.float32
    assert kd.shape == vd.shape == (NUM_BLOCKS, L.num_kv_heads, L.block_size, L.head_size)
    ks, vs, k_bound, v_bound = error_bounds(pages, L, sal, k, v)
    k_err, v_err = (kd - ks).abs(), (vd - vs).abs()
    assert (k_err <= k_bound).all(), f"key error exceeds s/2 by {float((k_err - k_bound).max())}"
    assert (v_err <= v_bound).all(), f"value error exceeds c*s/2 by {float((v_err - v_bound).max())}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_storage_order_is_the_token_order_permuted(case):
    L, k, v, sal, pages = packed_case(*case)
    kt, vt = unpack_dequantize_blocks(pages, L, order="token")
    kst, vst = unpack_dequantize_blocks(pages, L, order="storage")
    idx = storage_order(sal).unsqueeze(-1).expand_as(kt)
    assert torch.equal(kt.gather(2, idx), kst)
    assert torch.equal(vt.gather(2, idx), vst)
    # storage order is the salient tokens ascending, then the regular ones ascending
    for n in range(NUM_BLOCKS):
        for h in range(L.num_kv_heads):
            flags = sal[n, h].tolist()
            expected = [t for t, f in enumerate(flags) if f] + [t for t, f in enumerate(flags) if not f]
            assert storage_order(sal[n, h]).tolist() == expected
    assert torch.equal(unpack_salient_mask(pages, L), sal)


@pytest.mark.parametrize("B", BLOCK_SIZES)
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_salient_tokens_have_smaller_error(B, D):
    L, k, v, sal, pages = packed_case(B, 3, D, "4/2")
    kd, vd = unpack_dequantize_blocks(pages, L)
    bound = SALIENT_ERROR_RATIO[(4, 2)]
    for dec, ref in ((kd, k), (vd, v)):
        err = (dec - ref.permute(0, 2, 1, 3)).abs().mean(-1)  # [N, H, B]
        ratio = err[sal].mean() / err[~sal].mean()
        assert ratio <= bound.max, f"salient/regular error ratio {float(ratio):.3f}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_equal_their_float32_upcast(dtype):
    L = make_layout(64, 3, 64, "4/2")
    k, v = make_kv(2, 64, 3, 64, seed=5)
    k, v = k.to(dtype), v.to(dtype)
    sal = random_mask(2, 3, 64, L.n_hi, seed=5)
    assert torch.equal(quantize_pack_blocks(k, v, sal, L), quantize_pack_blocks(k.float(), v.float(), sal, L))


def test_blocks_and_heads_are_self_contained():
    """A page depends only on its own block; a head section only on its own head."""
    L = make_layout(32, 3, 64, "4/2")
    k, v = make_kv(3, 32, 3, 64, seed=9)
    sal = random_mask(3, 3, 32, L.n_hi, seed=9)
    pages = quantize_pack_blocks(k, v, sal, L)
    for n in range(3):
        assert torch.equal(pages[n:n + 1], quantize_pack_blocks(k[n:n + 1], v[n:n + 1], sal[n:n + 1], L))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0] *= 100.0
    v2[:, :, 0] += 7.0
    pages2 = quantize_pack_blocks(k2, v2, sal, L)
    hb = L.head_bytes
    assert not torch.equal(pages2[:, :hb], pages[:, :hb])
    assert torch.equal(pages2[:, hb:], pages[:, hb:])


# --- adversarial values at the block level ---------------------------------------------


def roundtrip(k, v, sal, L):
    return unpack_dequantize_blocks(quantize_pack_blocks(k, v, sal, L), L)


@pytest.mark.parametrize("cfg", list(BIT_CONFIGS))
def test_all_zero_block_is_exact(cfg):
    L = make_layout(32, 2, 64, cfg)
    z = torch.zeros(1, 32, 2, 64)
    sal = random_mask(1, 2, 32, L.n_hi, seed=0)
    kd, vd = roundtrip(z, z, sal, L)
    assert (kd == 0).all() and (vd == 0).all()


@pytest.mark.parametrize("cfg", list(BIT_CONFIGS))
@pytest.mark.parametrize("c", [1.0, -3.75, 2.0 ** -20, FP16_MAX, -FP16_MAX])
def test_constant_keys_are_exact_and_constant_values_bounded(cfg, c):
    L = make_layout(32, 2, 64, cfg)
    x = torch.full((1, 32, 2, 64), c)
    sal = random_mask(1, 2, 32, L.n_hi, seed=1)
    pages = quantize_pack_blocks(x, x, sal, L)
    kd, vd = unpack_dequantize_blocks(pages, L)
    assert torch.isfinite(kd).all() and torch.isfinite(vd).all()
    assert (kd == c).all()
    _, vs, _, v_bound = error_bounds(pages, L, sal, x, x)
    assert ((vd - vs).abs() <= v_bound).all()


@pytest.mark.parametrize("cfg", list(BIT_CONFIGS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_magnitudes_saturate_to_fp16_max(cfg, sign):
    """+-1e6 and +-inf are defined as +-65504 (the float16 limit the parameters live in)."""
    L = make_layout(32, 2, 64, cfg)
    sal = random_mask(1, 2, 32, L.n_hi, seed=2)
    for big in (1e6, INF):
        x = torch.full((1, 32, 2, 64), sign * big)
        kd, vd = roundtrip(x, x, sal, L)
        assert (kd == sign * FP16_MAX).all()
        assert (vd == sign * FP16_MAX).all()


@pytest.mark.parametrize("cfg", list(BIT_CONFIGS))
def test_nan_inputs_decode_as_zero(cfg):
    L = make_layout(32, 2, 64, cfg)
    sal = random_mask(1, 2, 32, L.n_hi, seed=3)
    x = torch.full((1, 32, 2, 64), NAN)
    kd, vd = roundtrip(x, x, sal, L)
    assert (kd == 0).all() and (vd == 0).all()


@pytest.mark.parametrize("cfg", list(BIT_CONFIGS))
def test_adversarial_values_are_packed_as_their_sanitized_version(cfg):
    L = make_layout(32, 2, 64, cfg)
    k, v = make_kv(1, 32, 2, 64, seed=4)
    sal = random_mask(1, 2, 32, L.n_hi, seed=4)
    for t, special in enumerate([NAN, INF, -INF, 1e6, -1e6, 1e-30]):
        k[0, t, 0, t] = special
        v[0, 2 * t + 1, 1, 3 * t] = special
    pages = quantize_pack_blocks(k, v, sal, L)
    assert torch.equal(pages, quantize_pack_blocks(ref_sanitize(k), ref_sanitize(v), sal, L))
    kd, vd = unpack_dequantize_blocks(pages, L)
    assert torch.isfinite(kd).all() and torch.isfinite(vd).all()


# --- errors ------------------------------------------------------------------------------


@pytest.fixture
def small():
    L = make_layout(32, 2, 64, "4/2")
    k, v = make_kv(2, 32, 2, 64, seed=6)
    sal = random_mask(2, 2, 32, L.n_hi, seed=6)
    return L, k, v, sal


@pytest.mark.parametrize("shape", [(2, 64, 2, 64), (2, 32, 3, 64), (2, 32, 2, 128), (32, 2, 64),
                                   (2, 2, 32, 64), (1, 2, 32, 2, 64)])
def test_wrong_kv_shapes_raise(small, shape):
    L, k, v, sal = small
    bad = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"k and v must be \[N, 32, 2, 64\]"):
        quantize_pack_blocks(bad, bad, sal, L)
    with pytest.raises(ValueError, match="k and v must be"):
        quantize_pack_blocks(k, bad, sal, L)


def test_wrong_mask_dtype_shape_or_count_raises(small):
    L, k, v, sal = small
    with pytest.raises(ValueError, match="salient must be bool"):
        quantize_pack_blocks(k, v, sal.to(torch.uint8), L)
    with pytest.raises(ValueError, match=r"salient must be bool \[2, 2, 32\]"):
        quantize_pack_blocks(k, v, sal.transpose(1, 2), L)
    with pytest.raises(ValueError, match="salient must be bool"):
        quantize_pack_blocks(k, v, sal[:1], L)
    wrong = sal.clone()
    wrong[1, 0] = False  # one (block, head) with no salient token
    with pytest.raises(ValueError, match=f"exactly n_hi={L.n_hi}"):
        quantize_pack_blocks(k, v, wrong, L)
    with pytest.raises(ValueError, match="exactly n_hi"):
        quantize_pack_blocks(k, v, torch.ones_like(sal), L)


def test_wrong_pages_raise(small):
    L, k, v, sal = small
    pages = quantize_pack_blocks(k, v, sal, L)
    with pytest.raises(ValueError, match=f"pages must be uint8 \\[N, {L.page_bytes}\\]"):
        unpack_dequantize_blocks(pages.float(), L)
    with pytest.raises(ValueError, match="pages must be uint8"):
        unpack_dequantize_blocks(pages[:, :-16], L)
    with pytest.raises(ValueError, match="pages must be uint8"):
        unpack_dequantize_blocks(pages[0], L)
    other = BlockLayout(32, 64, 2, 4, 2, 3)  # a different layout of the same shape
    with pytest.raises(ValueError, match="pages must be uint8"):
        unpack_dequantize_blocks(pages, other)
    with pytest.raises(ValueError, match="order must be 'token' or 'storage'"):
        unpack_dequantize_blocks(pages, L, order="salient")


# --- fuzzing -------------------------------------------------------------------------------

SPECIALS = [NAN, INF, -INF, 1e6, -1e6, FP16_MAX, -FP16_MAX, 0.0, -0.0, 1e-30, 2.0 ** -24, -(2.0 ** -24), 1e-8]


@st.composite
def adversarial_blocks(draw):
    B = draw(st.sampled_from([8, 16, 32]))
    D = draw(st.sampled_from([8, 16]))
    H = draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    L = BlockLayout(B, D, H, draw(st.sampled_from(SUPPORTED_BITS)), draw(st.sampled_from(SUPPORTED_BITS)),
                    draw(st.integers(0, B)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(2):
        base = draw(st.sampled_from(["zeros", "const", "normal", "huge", "tiny", "channel-const"]))
        shape = (n, B, H, D)
        if base == "zeros":
            x = torch.zeros(shape)
        elif base == "const":
            x = torch.full(shape, draw(st.sampled_from(SPECIALS + [1.0, -2.5, 0.1])))
        elif base == "normal":
            x = torch.randn(shape, generator=gen) * 10.0 ** draw(st.integers(-6, 4))
        elif base == "huge":
            x = torch.randn(shape, generator=gen) * 1e6
        elif base == "tiny":
            x = torch.randn(shape, generator=gen) * 1e-7
        else:
            x = torch.randn(1, 1, H, D, generator=gen).expand(shape).clone()
        flat = x.view(-1)
        for _ in range(draw(st.integers(0, 12))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
        tensors.append(x)
    sal = topk_salient_mask(torch.rand(n, H, B, generator=gen), L.n_hi)
    return L, tensors[0], tensors[1], sal


@settings(max_examples=150, deadline=None)
@given(adversarial_blocks())
def test_fuzz_never_nan_and_bytes_match_reference(case):
    L, k, v, sal = case
    pages = quantize_pack_blocks(k, v, sal, L)
    check_page_against_reference(k, v, sal, pages, L)
    for order in ("token", "storage"):
        kd, vd = unpack_dequantize_blocks(pages, L, order=order)
        # float32 outputs are always finite. Note: they may exceed 65504 by up to half a
        # step (the grid's top point lies above the data), so a kernel that emits float16
        # must compute in float32 or clamp; bfloat16 holds them.
        assert torch.isfinite(kd).all() and torch.isfinite(vd).all()
        assert torch.isfinite(kd.bfloat16()).all() and torch.isfinite(vd.bfloat16()).all()


def _full_range_2bit_case():
    """A channel spanning [-1e6, 1e6] (i.e. [-65504, 65504] after saturation) at the lowest width."""
    k = torch.zeros(1, 8, 1, 8)
    k[0, 0], k[0, 1] = -1e6, 1e6
    return BlockLayout(8, 8, 1, hi_bits=4, lo_bits=2, n_hi=0), k, k.clone(), torch.zeros(1, 1, 8, dtype=torch.bool)


@settings(max_examples=150, deadline=None)
@given(adversarial_blocks())
@example(_full_range_2bit_case())
def test_fuzz_round_trip_within_half_stored_step(case):
    L, k, v, sal = case
    pages = quantize_pack_blocks(k, v, sal, L)
    kd, vd = unpack_dequantize_blocks(pages, L)
    ks, vs, k_bound, v_bound = error_bounds(pages, L, sal, k, v)
    assert ((kd - ks).abs() <= k_bound).all(), f"key error exceeds s/2 by {float(((kd - ks).abs() - k_bound).max())}"
    assert ((vd - vs).abs() <= v_bound).all(), f"value error exceeds c*s/2 by {float(((vd - vs).abs() - v_bound).max())}"


# -- key rotation (quant/rotation.py) -------------------------------------------------

@pytest.mark.parametrize("D", [64, 128, 256])
def test_hadamard_rotation_is_the_orthonormal_sylvester_matrix_and_its_own_inverse(D):
    from zipcache_vllm.quant.rotation import hadamard_matrix, hadamard_rotate

    R = hadamard_matrix(D)
    assert torch.allclose(R @ R, torch.eye(D, dtype=torch.float64), atol=1e-12)
    x = torch.randn(7, 3, D, generator=torch.Generator().manual_seed(D)) * 5
    y = hadamard_rotate(x)
    torch.testing.assert_close(y.double(), x.double() @ R, rtol=0, atol=5e-6)
    torch.testing.assert_close(hadamard_rotate(y), x, rtol=0, atol=5e-6)
    # the same bits whatever the leading shape (engine steps vs simulator blocks)
    assert torch.equal(hadamard_rotate(x[4:5, 1:2]), y[4:5, 1:2])
    q = torch.randn(3, D)
    torch.testing.assert_close(hadamard_rotate(q) @ y[0].T, q @ x[0].T, rtol=1e-5, atol=1e-4)


def test_rotation_needs_a_power_of_two_head_size():
    from zipcache_vllm.layout import BlockLayout
    from zipcache_vllm.quant.rotation import hadamard_rotate

    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rotate(torch.zeros(2, 80))
    with pytest.raises(ValueError, match="power-of-two"):
        BlockLayout(128, 80, 1, 4, 2, 58, rotate_keys=True)


def test_key_rotation_only_for_quantized_pages():
    from zipcache_vllm.config import load_preset, parse_preset

    data = load_preset("fastgen_t95").model_dump()
    data["key_rotation"] = "hadamard"
    with pytest.raises(Exception, match="key_rotation applies to quantized pages"):
        parse_preset(data, "test")
    assert load_preset("zipcache").key_rotation == "calibrated"
    assert load_preset("kivi3").key_rotation == "none"  # KIVI as published


def test_rotated_pages_cost_the_same_bytes_and_round_trip_better_with_8_bits():
    from zipcache_vllm.config import load_preset
    from zipcache_vllm.layout import BlockLayout
    from zipcache_vllm.policies import make_policy

    p = load_preset("zipcache")
    plain = p.model_copy(update={"key_rotation": "none"})
    assert BlockLayout.from_preset(p, 64, 3).page_bytes == BlockLayout.from_preset(plain, 64, 3).page_bytes
    eight = p.model_copy(update={"hi_bits": 8, "lo_bits": 8})
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 128, 3, 64, generator=g), torch.randn(2, 128, 3, 64, generator=g)
    salient = torch.zeros(2, 3, 128, dtype=torch.bool)
    salient[..., :eight.n_salient] = True
    k_hat, v_hat = make_policy(eight).compress(k, v, salient)
    assert (k_hat - k).abs().max() < 0.05 and (v_hat - v).abs().max() < 0.05  # rotated back
