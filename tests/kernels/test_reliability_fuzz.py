"""Adversarial values through the attention path (C++ kernels and the step flow).

Already covered elsewhere and not repeated: the quantizer and packer under zeros,
constants, +-1e6, NaN and +-inf (test_quant.py, hypothesis), bit packing
(test_packing.py), the C++ packer's bytes with NaN/inf keys (test_cpu_kernels.py).
Added here, with the behaviour defined:

* Packed pages are always finite (NaN -> 0, +-inf -> +-65504 when packed), so
  attention over them with finite queries is finite and equals softmax attention over
  the dequantized pages, for queries of any magnitude (the kernels subtract the max).
* A non-finite query poisons only its own (row, head) output; every other row of the
  same batched kernel call is bit-identical to a call without it.
* A non-finite key or value of a request that is still in full precision (staging)
  reaches only that request's outputs, as it would with bf16 attention; the other
  requests of the same step are bit-identical. Once its block is packed the value is
  sanitized and the request's later outputs are finite again.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zipcache_vllm import kernels
from zipcache_vllm.config import load_preset
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.quant.block import topk_salient_mask, unpack_dequantize_blocks
from zipcache_vllm.engine.plan import plan_step
from zipcache_vllm.policies import make_policy
from zipcache_vllm.engine.staging import StagingPool
from zipcache_vllm.engine.step import apply_step

NAN, INF = float("nan"), float("inf")
SPECIALS = [NAN, INF, -INF, 1e6, -1e6, 65504.0, 0.0, -0.0, 1e-30, 2.0 ** -24]
# Kernel (float32) vs explicit softmax in float64 over the same dequantized pages. The
# kernel's logits carry float32 rounding of about eps32 * sum_d |q_d k_d| * scale, which
# for a saturated channel (+-65504) is far above the usual relative error; the output
# moves by at most about that logit error times max|v|. Observed well inside both.
RTOL = 1e-4
EPS32 = 2.0 ** -23
LOGIT_SLACK = 8.0


@pytest.fixture(scope="module", autouse=True)
def _threads(one_intra_op_thread):
    yield


@st.composite
def packed_case(draw):
    B = draw(st.sampled_from([16, 32]))
    D = draw(st.sampled_from([64, 128]))
    H = draw(st.sampled_from([1, 3]))
    g = draw(st.sampled_from([1, 3]))
    n = draw(st.integers(1, 3))
    hi, lo = draw(st.sampled_from([(4, 2), (3, 3), (2, 2), (8, 4)]))
    layout = BlockLayout(B, D, H, hi, lo, draw(st.integers(0, B)) if hi != lo else 0)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    kv = []
    for _ in range(2):
        base = draw(st.sampled_from(["zeros", "const", "normal", "huge", "tiny"]))
        x = {"zeros": lambda: torch.zeros(n, B, H, D),
             "const": lambda: torch.full((n, B, H, D), draw(st.sampled_from([1.0, -3.0, 7e4]))),
             "normal": lambda: torch.randn(n, B, H, D, generator=gen),
             "huge": lambda: torch.randn(n, B, H, D, generator=gen) * 1e6,
             "tiny": lambda: torch.randn(n, B, H, D, generator=gen) * 1e-7}[base]()
        flat = x.view(-1)
        for _ in range(draw(st.integers(0, 8))):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
        kv.append(x)
    sal = topk_salient_mask(torch.rand(n, H, B, generator=gen), layout.n_hi)
    q_scale = 10.0 ** draw(st.integers(-3, 4))  # up to 1e4: logits far beyond exp's range
    q = torch.randn(draw(st.integers(1, 5)), H * g, D, generator=gen) * q_scale
    return layout, kv[0], kv[1], sal, q


def _dense(q, pages, layout, scale):
    kd, vd = unpack_dequantize_blocks(pages, layout)  # [n, H, B, D] float32
    H, D = layout.num_kv_heads, layout.head_size
    g = q.shape[1] // H
    k = kd.permute(1, 0, 2, 3).reshape(H, -1, D).repeat_interleave(g, 0).double()
    v = vd.permute(1, 0, 2, 3).reshape(H, -1, D).repeat_interleave(g, 0).double()
    s = torch.einsum("qhd,htd->hqt", q.double() * scale, k)
    logit_abs = torch.einsum("qhd,htd->hqt", q.double().abs() * scale, k.abs()).max()
    out = torch.einsum("hqt,htd->qhd", torch.softmax(s, -1), v)
    return out, float(logit_abs), float(v.abs().max())


@settings(max_examples=60, deadline=None)
@given(packed_case())
def test_attention_over_adversarial_pages_is_finite_and_exact(case):
    layout, k, v, sal, q = case
    pages = kernels.quantize_pack(k, v, sal, layout)
    scale = layout.head_size ** -0.5
    out, lse = kernels.attend_packed(q, pages, torch.arange(pages.shape[0]), layout, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, logit_abs, v_max = _dense(q, pages, layout, scale)
    tol = RTOL * float(ref.abs().max()) + LOGIT_SLACK * EPS32 * logit_abs * v_max + 1e-6
    assert float((out.double() - ref).abs().max()) <= tol


@settings(max_examples=30, deadline=None)
@given(packed_case(), st.sampled_from([NAN, INF, -INF]), st.data())
def test_non_finite_query_poisons_only_its_own_row(case, bad, data):
    layout, k, v, sal, q = case
    pages = kernels.quantize_pack(k, v, sal, layout)
    R = q.shape[0]
    table = torch.zeros(R, pages.shape[0], dtype=torch.int64)
    table[:] = torch.arange(pages.shape[0])
    nblocks = torch.full((R,), pages.shape[0], dtype=torch.int64)
    scale = layout.head_size ** -0.5
    clean, _ = kernels.attend_packed_batch(q, pages, table, nblocks, layout, scale)
    r = data.draw(st.integers(0, R - 1))
    h = data.draw(st.integers(0, q.shape[1] - 1))
    qb = q.clone()
    qb[r, h, data.draw(st.integers(0, layout.head_size - 1))] = bad
    out, _ = kernels.attend_packed_batch(qb, pages, table, nblocks, layout, scale)
    others = torch.ones(R, q.shape[1], dtype=torch.bool)
    others[r, h] = False
    assert torch.equal(out[others], clean[others])


# -- the step flow: two requests in one step --------------------------------------------

H, G, D = 3, 3, 64


def _two_requests(poison: str | None, steps: int = 20, B_fill: int = 120):
    """Two requests: a 120-token prompt each, then ``steps`` decode steps together.

    ``poison``: None, or where request 0 gets a NaN: "prompt_key" (a staged key of
    its prompt) or "decode_value" (the value of its first decoded token).
    Returns the outputs ``[2, steps, Hq, D]`` of the decode steps.
    """
    preset = load_preset("zipcache_nodelay")  # a block packed when it fills (step 7 below)
    layout = BlockLayout.from_preset(preset, D, H)
    policy = make_policy(preset)
    B = layout.block_size
    pool = StagingPool(["l0"], 3, B, H, D, torch.bfloat16)
    pages = torch.zeros(6, layout.page_bytes, dtype=torch.uint8)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    L = B_fill + steps
    q = torch.randn(2, L, H * G, D, generator=gen).bfloat16()
    k = torch.randn(2, L, H, D, generator=gen).bfloat16()
    v = torch.randn(2, L, H, D, generator=gen).bfloat16()
    if poison == "prompt_key":
        k[0, 5, 1, 7] = NAN
    elif poison == "decode_value":
        v[0, B_fill, 0, 3] = NAN
    scale = D ** -0.5
    outs = torch.zeros(2, steps, H * G, D)
    for r in range(2):  # prefills, one request per step
        plans = plan_step(pool, B, [0, B_fill], [B_fill], table[r:r + 1])
        apply_step(pool, 0, plans, q[r, :B_fill], k[r, :B_fill], v[r, :B_fill], pages, layout,
                   policy, scale, torch.zeros(B_fill, H * G, D))
    for t in range(steps):  # decode steps, both requests in each
        pos = B_fill + t
        plans = plan_step(pool, B, [0, 1, 2], [pos + 1, pos + 1], table)
        o = torch.zeros(2, H * G, D)
        apply_step(pool, 0, plans, q[:, pos], k[:, pos], v[:, pos], pages, layout, policy, scale, o)
        outs[:, t] = o
    return outs


@pytest.fixture(scope="module")
def clean_run():
    return _two_requests(None)


@pytest.mark.parametrize("poison", ["prompt_key", "decode_value"])
def test_non_finite_kv_stays_in_its_request_and_is_sanitized_when_packed(poison, clean_run):
    out = _two_requests(poison)
    assert torch.equal(out[1], clean_run[1])  # the other request: bit-identical
    finite = torch.isfinite(out[0]).flatten(1).all(1)  # per decode step of request 0
    assert not finite[:8].all()  # while the NaN is staged in full precision, it shows
    # Block 0 fills at step 7 (positions 120..127) and is packed: NaN -> 0 in the page.
    assert finite[8:].all(), finite.tolist()
    assert not math.isnan(float(out[0, -1].sum()))
