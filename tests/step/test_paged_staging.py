"""Paged staging: the partial block staged in vLLM's own pages (``layout.StagingLayout``).

The staged tokens live in the pages of the partial block and of the blocks allocated
ahead of it, instead of a pool of their own. The same step over the same requests must
give bit-identical outputs and packed pages whichever storage holds the staged tokens,
on the C++ path (``zipcache::decode_paged`` reads the pages in place) and on the
portable path (gather into slots, the slot kernel, scatter back).

8-bit staging (``kv_bits`` 8, the presets' ``staging_bits``): a token's rows are
quantized once, when staged, with ``quant.uniform``; both paths store the same bits and
read back the same float32 values (``kernels.portable.fake_quantize_rows8``).
"""
from __future__ import annotations

import pytest
import torch

from zipcache_vllm.config import load_preset
from zipcache_vllm.engine.plan import DecodeBatch, plan_step
from zipcache_vllm.engine.staging import StagingError, StagingPool
from zipcache_vllm.engine.step import apply_step
from zipcache_vllm.kernels import build, gather_staged, scatter_staged
from zipcache_vllm.kernels.portable import fake_quantize_rows8, quantize_rows8, store_token
from zipcache_vllm.layout import BlockLayout, FastGenLayout, StagingLayout
from zipcache_vllm.policies import make_policy

SCHEDULES = {
    "prefill_then_decode": [300] + [1] * 5,
    "chunked_awkward": [130, 3, 250, 1, 1, 100, 1],
    "decode_across_boundary": [125] + [1] * 6,
    "boundary_exact": [128, 128, 1, 127, 1],
}


@pytest.fixture(scope="module", autouse=True)
def built():
    return build.load()


@pytest.mark.parametrize("P,B,H,D,dtype", [
    (21360, 128, 3, 64, torch.bfloat16),  # SmolLM2's default preset
    (26896, 128, 1, 256, torch.float32),  # head size 256, float32 model: 13 tokens a page
    (4096, 16, 2, 8, torch.float16),  # one page holds the whole block
    (800, 24, 1, 8, torch.bfloat16),  # 11 tokens a page, 3 pages, the last one partly used
])
def test_gather_scatter_roundtrip(P, B, H, D, dtype):
    st = StagingLayout(P, B, H, D, torch.empty((), dtype=dtype).element_size())
    assert st.tokens_per_page * st.pages >= B > st.tokens_per_page * (st.pages - 1)
    assert st.used_bytes <= P and st.used_bytes % 4 == 0
    g = torch.Generator().manual_seed(B)
    pages = torch.randint(0, 256, (40, P), dtype=torch.uint8, generator=g)
    n = 3
    ids = torch.randperm(40, generator=g)[:n * st.pages].reshape(n, st.pages)
    for t in sorted({1, min(B, st.tokens_per_page), min(B, st.tokens_per_page + 1), B}):
        k, v = (torch.randn(n, H, t, D, generator=g).to(dtype) for _ in range(2))
        score, count = torch.rand(n, H, t, generator=g), torch.rand(n, t, generator=g)
        before = pages.clone()
        scatter_staged(pages, ids, st, k, v, score, count)
        K, V, S, C = gather_staged(pages, ids, st, dtype)
        assert K.shape == (n, H, B, D) and S.shape == (n, H, B) and C.shape == (n, B)
        for got, want in ((K, k), (V, v), (S, score)):
            assert torch.equal(got[:, :, :t], want)
        assert torch.equal(C[:, :t], count)
        others = torch.ones(40, dtype=torch.bool)
        others[ids.flatten()] = False  # pages of no run, and the unused end of every page
        assert torch.equal(pages[others], before[others])
        assert torch.equal(pages[:, st.used_bytes:], before[:, st.used_bytes:])


def test_page_too_small_to_stage_a_token():
    with pytest.raises(ValueError, match="cannot stage one token"):
        StagingLayout(100, 16, 2, 64)


def _run(preset_name: str, H: int, g: int, D: int, schedules: list[list[int]], paged: bool,
         seed: int = 0, kv_bits: int | None = None):
    """Steps of several requests (one schedule each, run side by side); returns the
    outputs of every step and the packed pages of every full block."""
    preset = load_preset(preset_name)
    layout = (FastGenLayout if preset.paged_fastgen else BlockLayout).from_preset(preset, D, H)
    policy = make_policy(preset)
    B = layout.block_size
    st = StagingLayout.of(layout, kv_bits=kv_bits, blocks=preset.staged_blocks) if paged else None
    ahead = st.lookahead_blocks if paged else 0
    lengths = [sum(s) for s in schedules]
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // B) + ahead for n in lengths) + 3
    ids = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, like vLLM's
    tables, start = [], 0
    for n in lengths:
        need = -(-n // B) + ahead
        tables.append(ids[start:start + need])
        start += need
    gen = torch.Generator().manual_seed(seed + 1)  # the same tokens whatever the table
    data = [(torch.randn(n, H * g, D, generator=gen).bfloat16(),
             torch.randn(n, H, D, generator=gen).bfloat16(),
             torch.randn(n, H, D, generator=gen).bfloat16()) for n in lengths]
    pool = StagingPool(["layer0"], len(schedules) + 1, B, H, D, torch.bfloat16, paged=st,
                       blocks=preset.staged_blocks)
    state = policy.engine_state(1, pool.num_slots, H, B, None)
    pages = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8)
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t)
    pos, outs = [0] * len(schedules), []
    for step in range(max(len(s) for s in schedules)):
        rows = [i for i, s in enumerate(schedules) if step < len(s)]
        qsl, seq, q, k, v = [0], [], [], [], []
        for i in rows:
            c = schedules[i][step]
            sl = slice(pos[i], pos[i] + c)
            q.append(data[i][0][sl]), k.append(data[i][1][sl]), v.append(data[i][2][sl])
            qsl.append(qsl[-1] + c)
            seq.append(pos[i] + c)
            pos[i] += c
        plans = plan_step(pool, B, qsl, seq, table[rows])
        q, k, v = torch.cat(q), torch.cat(k), torch.cat(v)
        out = torch.zeros(q.shape, dtype=torch.float32)
        prepared = state.prepare(plans, None) if state is not None else None
        apply_step(pool, 0, plans, q, k, v, pages, layout, policy, D ** -0.5, out, None, state,
                   prepared)
        outs.append(out)
    # the packed pages (with a saliency delay the last full blocks still wait in staging)
    full = [pages[torch.tensor(t[:max(n // B - preset.saliency_delay, 0)], dtype=torch.long)]
            for t, n in zip(tables, lengths)]
    return outs, full


@pytest.mark.parametrize("route", ["cpp", "torch"])
@pytest.mark.parametrize("preset", ["zipcache", "kivi2", "zipcache_exact", "zipcache_fastgen"])
@pytest.mark.parametrize("H,g,D", [(3, 3, 64), (1, 4, 128), (2, 2, 256)])
def test_paged_equals_slots(route, preset, H, g, D, monkeypatch):
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", {"cpp": "", "torch": "torch"}[route])
    schedules = list(SCHEDULES.values())
    slots_out, slots_pages = _run(preset, H, g, D, schedules, paged=False)
    paged_out, paged_pages = _run(preset, H, g, D, schedules, paged=True)
    for a, b in zip(slots_out, paged_out):
        assert torch.equal(a, b)
    for a, b in zip(slots_pages, paged_pages):
        assert torch.equal(a, b)


def test_decode_batch_carries_page_runs():
    layout = BlockLayout.from_preset(load_preset("zipcache_nodelay"), 64, 3)
    st = StagingLayout.of(layout)
    pool = StagingPool(["l"], 3, 128, 3, 64, torch.bfloat16, paged=st)
    table = torch.arange(2 * 12).reshape(2, 12)
    plans = plan_step(pool, 128, [0, 127, 127 + 255], [127, 255], table)
    plans = plan_step(pool, 128, [0, 1, 2], [128, 256], table)
    assert [p.stage_ids.tolist() for p in plans] == [list(range(0, 5)), list(range(13, 18))]
    batch = DecodeBatch.from_plans(plans, 128, make_policy(load_preset("zipcache_nodelay")), "cpu", st)
    assert batch.kernel.stage_ids.tolist() == [list(range(0, 5)), list(range(13, 18))]
    assert batch.full_stage_ids.tolist() == batch.kernel.stage_ids.tolist()  # both rows fill


def test_block_table_without_staging_blocks_is_refused():
    st = StagingLayout.of(BlockLayout.from_preset(load_preset("zipcache_nodelay"), 64, 3))
    pool = StagingPool(["l"], 2, 128, 3, 64, torch.bfloat16, paged=st)
    with pytest.raises(StagingError, match="did not allocate the staging blocks"):
        plan_step(pool, 128, [0, 200], [200], torch.arange(2).reshape(1, 2))


def test_decode_plan_checks_the_page_runs():
    """DecodePlan.create checks the runs once (shape, ids >= 0, both or neither of stage_ids
    and the layout); the C++ op checks the layout against the page layout and q's dtype."""
    from zipcache_vllm.kernels import DecodePlan

    layout = BlockLayout.from_preset(load_preset("zipcache_nodelay"), 64, 3)
    st = StagingLayout.of(layout)
    one = torch.zeros(1, dtype=torch.int64)
    args = (one, torch.zeros(1, 1, dtype=torch.int64), one, one, one, torch.zeros(1), 128)
    with pytest.raises(ValueError, match=r"stage_ids must be int64 \[1, 5\]"):
        DecodePlan.create(*args, torch.zeros(1, 4, dtype=torch.int64), st)
    with pytest.raises(ValueError, match="stage_ids must be >= 0"):
        DecodePlan.create(*args, torch.tensor([[0, 1, 2, 3, -1]]), st)
    with pytest.raises(ValueError, match="needs both"):
        DecodePlan.create(*args, torch.zeros(1, 5, dtype=torch.int64), None)
    plan = DecodePlan.create(*args, torch.arange(5).reshape(1, 5), st)
    assert plan.bounds[2] == 5  # the runs' pages are within the plan's bounds
    pages = torch.zeros(5, layout.page_bytes, dtype=torch.uint8)
    q = torch.zeros(1, 9, 64, dtype=torch.float32)  # float32: 4-byte elements, the run holds 2
    kv = torch.zeros(1, 3, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="elt|staging layout"):
        plan.run(q, kv, kv, pages, None, None, None, None, torch.zeros_like(q), layout, 0.125)


@pytest.mark.parametrize("P,B,H,D", [
    (21360, 128, 3, 64),  # SmolLM2's default preset: 50 tokens a page, 3 pages
    (26896, 128, 1, 256),
    (700, 24, 1, 10),  # awkward: D = 10, 20 tokens a page, the second page partly used
])
def test_gather_scatter_roundtrip_8bit(P, B, H, D):
    st = StagingLayout(P, B, H, D, 2, kv_bits=8)
    assert st.token_bytes == 2 * H * D + 12 * H + 4 and st.used_bytes <= P
    assert st.score_offset % 4 == 0 and st.params_offset % 2 == 0
    g = torch.Generator().manual_seed(D)
    pages = torch.randint(0, 256, (30, P), dtype=torch.uint8, generator=g)
    n = 2
    ids = torch.randperm(30, generator=g)[:n * st.pages].reshape(n, st.pages)
    k, v = (torch.randn(n, H, B, D, generator=g).bfloat16() * 3 for _ in range(2))
    score, count = torch.rand(n, H, B, generator=g), torch.rand(n, B, generator=g)
    before = pages.clone()
    t0 = B // 2 + 1
    scatter_staged(pages, ids, st, k[:, :, :t0], v[:, :, :t0], score[:, :, :t0], count[:, :t0])
    K, V, S, C = gather_staged(pages, ids, st, torch.float32)
    assert torch.equal(K[:, :, :t0], fake_quantize_rows8(k[:, :, :t0]))
    assert torch.equal(V[:, :, :t0], fake_quantize_rows8(v[:, :, :t0]))
    assert torch.equal(S[:, :, :t0], score[:, :, :t0]) and torch.equal(C[:, :t0], count[:, :t0])
    assert (K[:, :, :t0].float() - k[:, :, :t0].float()).abs().max() <= 6 * 3 * 2 / 255
    # kv_from: tokens already staged keep their bits (fed different values here on purpose)
    scatter_staged(pages, ids, st, -k, -v, score, count, kv_from=t0)
    K2, V2, S2, C2 = gather_staged(pages, ids, st, torch.float32)
    assert torch.equal(K2[:, :, :t0], K[:, :, :t0])
    assert torch.equal(K2[:, :, t0:], fake_quantize_rows8(-k[:, :, t0:]))
    assert torch.equal(S2, score) and torch.equal(C2, count)
    # one token a block, as the decode step stages it
    at = torch.tensor([3, B - 1])
    store_token(pages, ids, st, at, k[:, :, 0], v[:, :, 0])
    K3, _, _, _ = gather_staged(pages, ids, st, torch.float32)
    for r in range(n):
        assert torch.equal(K3[r, :, at[r]], fake_quantize_rows8(k[r, :, 0]))
    others = torch.ones(30, dtype=torch.bool)
    others[ids.flatten()] = False
    assert torch.equal(pages[others], before[others])
    assert torch.equal(pages[:, st.used_bytes:], before[:, st.used_bytes:])


def test_quantize_rows8_is_quant_uniform():
    """The staging codes are ``quant.uniform`` at 8 bits over each row, NaN/inf sanitized,
    a constant row exact."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [float("nan"), float("inf"), -1.0, 0.0]])
    codes, params = quantize_rows8(x)
    assert codes.dtype == torch.uint8 and params.dtype == torch.float16 and params.shape == (3, 2)
    back = fake_quantize_rows8(x)
    assert torch.equal(back[1], x[1]) and torch.isfinite(back).all()
    assert (back[0] - x[0]).abs().max() <= params[0, 1].float() / 2


@pytest.mark.parametrize("preset", ["zipcache", "kivi2"])
@pytest.mark.parametrize("H,g,D", [(3, 3, 64), (1, 4, 128), (2, 2, 256)])
def test_paged_8bit_cpp_equals_portable(preset, H, g, D, monkeypatch):
    """The C++ op (quantizing in place) and the portable path (gather, the slot kernel over
    the new tokens read back from their bits, scatter) agree, and differ from staging in
    the model dtype (what that costs in fidelity: eval --offline, abl:staging=model)."""
    schedules = list(SCHEDULES.values())
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", "")
    cpp_out, cpp_pages = _run(preset, H, g, D, schedules, paged=True, kv_bits=8)
    full_out, _ = _run(preset, H, g, D, schedules, paged=True)
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", "torch")
    pt_out, pt_pages = _run(preset, H, g, D, schedules, paged=True, kv_bits=8)
    for a, b, c in zip(cpp_out, pt_out, full_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    assert any((a - c).abs().max() > 0 for a, c in zip(cpp_out, full_out))
    same = sum(int((a == b).sum()) for a, b in zip(cpp_pages, pt_pages))
    total = sum(a.numel() for a in cpp_pages)
    assert same >= 0.999 * total  # saliency sums differ in the last bits only


def test_paged_8bit_triton_route_equals_cpp(monkeypatch):
    """The Triton route (CUDA; here Triton's interpreter) runs 8-bit staging as the portable
    path does (gather, the slot kernels on the new tokens' 8 bits read back, scatter): same
    outputs as the C++ op, one small schedule."""
    schedules = [[70, 1, 1], [127, 1, 1]]  # a block fills in a decode step
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", "")
    cpp_out, cpp_pages = _run("zipcache", 2, 2, 64, schedules, paged=True, kv_bits=8)
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", "triton")
    tr_out, tr_pages = _run("zipcache", 2, 2, 64, schedules, paged=True, kv_bits=8)
    for a, b in zip(cpp_out, tr_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    assert sum(int((a != b).sum()) for a, b in zip(cpp_pages, tr_pages)) <= 0.001 * sum(a.numel() for a in cpp_pages)
