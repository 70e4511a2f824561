"""The backend's per-request step (packed pages + staging + chunk) against a dense reference.

No vLLM engine: these drive the same functions the backend's builder and Impl call
(the engine's ``plan.plan_step`` / ``step.apply_step``) on a fake paged cache. The reference
attends explicitly over the *dequantized* packed blocks plus the full-precision
tokens, so the tolerance only covers float32 summation order: quantization error is
not measured here (that is the offline harness's job).
"""
from __future__ import annotations

import pytest
import torch

from zipcache_vllm.config import load_preset
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.quant.block import unpack_dequantize_blocks, unpack_salient_mask
from zipcache_vllm.engine.plan import plan_step
from zipcache_vllm.policies import make_policy
from zipcache_vllm.engine.staging import StagingError, StagingPool
from zipcache_vllm.engine.step import apply_step, rotate_inputs, rotate_values

from _dense import dense_reference

# Chunk schedules (prefill chunks then decode steps): lengths that are not multiples of
# the block size, chunks that end exactly on a boundary, chunks spanning several blocks.
SCHEDULES = {
    "prefill_then_decode": [300] + [1] * 5,
    "chunked_awkward": [130, 3, 250, 1, 1, 100, 1],
    "boundary_exact": [128, 128, 1, 127, 1],
    "decode_across_boundary": [125] + [1] * 6,
}
GQA = [(2, 1), (2, 3), (1, 4)]  # (KV heads, query heads per KV head)
HEAD_SIZES = [64, 128]
# Float32 math on both sides; bf16 inputs are exact in float32.
ATOL, RTOL = 2e-5, 2e-5
PRESETS = ["zipcache", "zipcache_exact", "kivi2", "h2o_mixed", "random_mixed",
           "zipcache+value_rotation"]


def _preset(name: str):
    """A preset by name, each block packed when it fills (the dense reference here reads
    every full block packed; a block packed later is held to the simulator in
    test_sim_matches_engine_flow.py); ``<name>+value_rotation``: the same with
    Hadamard-rotated values."""
    base, _, extra = name.partition("+")
    preset = load_preset(base).model_copy(update={"saliency_delay": 0})
    return preset.model_copy(update={"value_rotation": "hadamard"}) if extra else preset


class FakeRequest:
    """One sequence's tensors and its block table in a fake paged cache."""

    def __init__(self, length: int, H: int, g: int, D: int, block_ids: list[int], seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.k = torch.randn(length, H, D, generator=gen).bfloat16()
        self.v = torch.randn(length, H, D, generator=gen).bfloat16()
        self.q = torch.randn(length, H * g, D, generator=gen).bfloat16()
        self.block_ids = torch.tensor(block_ids, dtype=torch.int32)
        self.pos = 0


def _setup(preset_name: str, H: int, D: int, num_blocks: int = 64, slots: int = 4):
    preset = _preset(preset_name)
    layout = BlockLayout.from_preset(preset, D, H)
    pool = StagingPool(["layer0"], slots, preset.block_size, H, D, torch.bfloat16)
    pages = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8)
    return layout, make_policy(preset), pool, pages


def _step(reqs: list[FakeRequest], chunks: list[int], pool, pages, layout, policy, scale):
    """One engine step over several requests; returns each request's float32 output."""
    qsl, seq_lens, q, k, v = [0], [], [], [], []
    width = max(len(r.block_ids) for r in reqs)
    table = torch.zeros(len(reqs), width, dtype=torch.int32)
    for i, (r, c) in enumerate(zip(reqs, chunks)):
        sl = slice(r.pos, r.pos + c)
        q.append(r.q[sl]), k.append(r.k[sl]), v.append(r.v[sl])
        qsl.append(qsl[-1] + c)
        seq_lens.append(r.pos + c)
        table[i, :len(r.block_ids)] = r.block_ids
    plans = plan_step(pool, layout.block_size, qsl, seq_lens, table)
    q, k, v = torch.cat(q), torch.cat(k), torch.cat(v)
    out = torch.zeros(q.shape, dtype=torch.float32)
    apply_step(pool, 0, plans, q, k, v, pages, layout, policy, scale, out)
    return [out[qsl[i]:qsl[i + 1]] for i in range(len(reqs))]


def _reference(r: FakeRequest, chunk: int, pages, layout, scale, ctx_packed: int):
    """Dense attention of the chunk's queries: each query sees the blocks before its own
    block dequantized from their pages and its own block in full precision (the engine
    processes a chunk block by block, so the chunking never changes a result)."""
    B = layout.block_size
    parts, pos, end = [], r.pos, r.pos + chunk
    while pos < end:
        n = min(end - pos, B - pos % B)
        parts.append(_reference_part(r, pos, n, pages, layout, scale, (pos // B) * B))
        pos += n
    return torch.cat(parts)


def _reference_part(r: FakeRequest, start: int, n: int, pages, layout, scale, ctx_packed: int):
    """Queries ``start .. start+n-1`` over the dequantized pages of the first
    ``ctx_packed`` tokens and the full-precision tokens after them."""
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    nb = ctx_packed // B
    end = start + n
    if nb:
        kd, vd = unpack_dequantize_blocks(pages[r.block_ids[:nb].long()], layout)
        kc = kd.permute(0, 2, 1, 3).reshape(nb * B, H, D)
        vc = vd.permute(0, 2, 1, 3).reshape(nb * B, H, D)
    else:
        kc = vc = torch.zeros(0, H, D)
    # Rotated-key presets: the pages hold k R; the step rotates q and k (in their dtype) first.
    # Rotated-value presets: the pages hold v R, and the output is rotated back.
    q, k = rotate_inputs(layout, r.q, r.k)
    kc = torch.cat([kc, k[nb * B:end].float()])
    vc = torch.cat([vc, rotate_values(layout, r.v)[nb * B:end].float()])
    return rotate_values(layout, dense_reference(q[start:end], kc, vc, scale))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("H,g", GQA)
@pytest.mark.parametrize("D", HEAD_SIZES)
def test_step_matches_dense_reference(schedule, H, g, D):
    layout, policy, pool, pages = _setup("zipcache", H, D)
    chunks = SCHEDULES[schedule]
    length = sum(chunks)
    nblocks = -(-length // layout.block_size)
    # Scattered, non-monotonic block ids (like a real block table).
    ids = torch.randperm(pages.shape[0], generator=torch.Generator().manual_seed(1))[:nblocks]
    req = FakeRequest(length, H, g, D, ids.tolist(), seed=hash((schedule, H, g, D)) % 1000)
    scale = D ** -0.5
    for c in chunks:
        ctx = req.pos
        (out,) = _step([req], [c], pool, pages, layout, policy, scale)
        ref = _reference(req, c, pages, layout, scale, ctx)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        req.pos += c
        staged = req.pos % layout.block_size
        if staged:  # the partial block's tokens wait in its staging slot
            slot = pool.slot_of(int(req.block_ids[req.pos // layout.block_size]))
            assert pool.fill[slot] == staged
    # Every full block was packed with exactly n_hi salient tokens per head.
    full = req.pos // layout.block_size
    mask = unpack_salient_mask(pages[req.block_ids[:full].long()], layout)
    assert (mask.sum(-1) == layout.n_hi).all()
    pool.release_request(_state(req))  # what the runner's hook does when the request ends
    assert pool.in_use == 0


def _state(req: FakeRequest):
    class S:  # the runner's CachedRequestState carries block_ids per KV cache group
        block_ids = (req.block_ids.tolist(),)
    return S()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_pack_and_attend(preset):
    """Every quantizing preset runs the same flow (uniform, accumulated, random saliency)."""
    layout, policy, pool, pages = _setup(preset, 2, 64)
    req = FakeRequest(400, 2, 3, 64, list(range(4)), seed=7)
    for c in [200, 60, 1, 139]:
        ctx = req.pos
        (out,) = _step([req], [c], pool, pages, layout, policy, 64 ** -0.5)
        torch.testing.assert_close(out, _reference(req, c, pages, layout, 64 ** -0.5, ctx),
                                   atol=ATOL, rtol=RTOL)
        req.pos += c
    mask = unpack_salient_mask(pages[:3], layout)
    assert (mask.sum(-1) == layout.n_hi).all()


def test_batched_requests_share_the_step():
    """Several rows per step: independent staging slots, slots released after planning."""
    H, g, D = 2, 3, 64
    layout, policy, pool, pages = _setup("zipcache", H, D, slots=3)
    a = FakeRequest(300, H, g, D, [5, 9, 2], seed=1)
    b = FakeRequest(300, H, g, D, [7, 1, 30], seed=2)
    c = FakeRequest(300, H, g, D, [11, 12, 13], seed=3)
    scale = D ** -0.5
    for chunks in ([128, 100, 50], [1, 28, 78], [1, 1, 1], [170, 171, 171]):
        reqs, cs = zip(*[(r, n) for r, n in zip((a, b, c), chunks) if r.pos + n <= 300])
        ctxs = [r.pos for r in reqs]
        outs = _step(list(reqs), list(cs), pool, pages, layout, policy, scale)
        for r, n, ctx, out in zip(reqs, cs, ctxs, outs):
            torch.testing.assert_close(out, _reference(r, n, pages, layout, scale, ctx),
                                       atol=ATOL, rtol=RTOL)
            r.pos += n
    for r in (a, b, c):
        pool.release_blocks(r.block_ids.tolist())
    assert pool.in_use == 0


def test_prefix_cache_hit_starts_with_empty_staging():
    """A request that reuses another's full pages starts at a block boundary, fresh slot,
    and computes exactly what the original request computed after that boundary."""
    H, g, D = 2, 3, 64
    layout, policy, pool, pages = _setup("zipcache", H, D)
    B, scale = layout.block_size, D ** -0.5
    a = FakeRequest(300, H, g, D, [3, 4, 5], seed=11)
    outs_a = []
    for c in [2 * B, 300 - 2 * B]:
        outs_a.append(_step([a], [c], pool, pages, layout, policy, scale)[0])
        a.pos += c
    pool.release_blocks(a.block_ids.tolist())
    pages_before = pages[[3, 4]].clone()
    # b shares a's first two pages (prefix hit) and owns a new third block.
    b = FakeRequest(300, H, g, D, [3, 4, 6], seed=11)
    b.pos = 2 * B
    (out_b,) = _step([b], [300 - 2 * B], pool, pages, layout, policy, scale)
    torch.testing.assert_close(out_b, outs_a[1], atol=0, rtol=0)
    assert torch.equal(pages[[3, 4]], pages_before)  # shared pages never rewritten
    assert pool.fill[pool.slot_of(6)] == 300 - 2 * B


def test_recompute_after_preemption_resets_staging():
    """A request restarting from 0 (recompute) or reusing a stale slot's block id gets
    an empty slot; a continuation with the wrong staged count is refused loudly."""
    H, g, D = 1, 4, 64
    layout, policy, pool, pages = _setup("zipcache", H, D, slots=2)
    r = FakeRequest(200, H, g, D, [0, 1], seed=5)
    _step([r], [150], pool, pages, layout, policy, D ** -0.5)
    assert pool.in_use == 1 and pool.fill[pool.slot_of(1)] == 22
    # Preempted without notice; its blocks are reallocated to a new request from 0.
    r2 = FakeRequest(200, H, g, D, [1, 0], seed=6)
    _step([r2], [100], pool, pages, layout, policy, D ** -0.5)
    assert pool.in_use == 1 and pool.fill[pool.slot_of(1)] == 100
    # A continuation that disagrees with the pool is a bug: fail loudly.
    r2.pos = 90
    with pytest.raises(StagingError):
        _step([r2], [5], pool, pages, layout, policy, D ** -0.5)
    pool.release_blocks([0, 1])
    assert pool.in_use == 0


def _saliency_reference(req: FakeRequest, pages, layout, preset_name: str, scale: float,
                        packed_context: bool):
    """Block-local saliency and top-k from explicit attention rows.

    packed_context: the queries of block c saw blocks < c dequantized (what the
    engine does for any schedule); otherwise everything in full precision.
    """
    from zipcache_vllm.quant.block import topk_salient_mask
    from zipcache_vllm.saliency.scores import probe_rows

    preset = load_preset(preset_name)
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    g = req.q.shape[1] // H
    q, k = rotate_inputs(layout, req.q, req.k)  # the pages' basis (rotated-key presets)
    masks = []
    for c in range(req.pos // B):
        if packed_context and c:
            kd, vd = unpack_dequantize_blocks(pages[req.block_ids[:c].long()], layout)
            prior = kd.permute(0, 2, 1, 3).reshape(c * B, H, D)
        else:
            prior = k[:c * B].float()
        rows = torch.arange(B)
        if preset.probes.strategy != "exact":
            rows = probe_rows(B, preset.probes, seed=c * B)
        acc = torch.zeros(H, B)
        cnt = torch.zeros(B)
        for i in rows.tolist():
            p = c * B + i
            keys = torch.cat([prior, k[c * B:p + 1].float()])  # [T, H, D]
            logits = torch.einsum("hd,thd->ht", q[p].float(),
                                  keys.repeat_interleave(g, dim=1)) * scale
            probs = torch.softmax(logits, -1)[:, -(i + 1):]  # the block's tokens <= p
            acc[:, :i + 1] += probs.reshape(H, g, i + 1).sum(1)
            cnt[:i + 1] += 1
        score = acc if preset.saliency_source == "accumulated" else acc / cnt.clamp_min(1)
        masks.append(topk_salient_mask(score, layout.n_hi))
    return torch.stack(masks)


@pytest.mark.parametrize("preset", ["zipcache_exact", "zipcache", "h2o_mixed"])
@pytest.mark.parametrize("schedule", ["decode", "one_chunk"])
def test_salient_tokens_match_explicit_attention(preset, schedule):
    """The precision mask stored in each page is the block-local top-k of the saliency
    computed from explicit attention rows of the block's own (probe) queries."""
    H, g, D = 2, 2, 64
    layout, policy, pool, pages = _setup(preset, H, D)
    B, scale = layout.block_size, D ** -0.5
    length = 2 * B + 5
    req = FakeRequest(length, H, g, D, [8, 3, 6], seed=21)
    chunks = [1] * length if schedule == "decode" else [length]
    for c in chunks:
        _step([req], [c], pool, pages, layout, policy, scale)
        req.pos += c
    stored = unpack_salient_mask(pages[req.block_ids[:2].long()], layout)
    # Both schedules: the engine runs a chunk block by block, so the queries of block c
    # saw blocks < c packed in one chunk too.
    ref = _saliency_reference(req, pages, layout, preset, scale, packed_context=True)
    assert torch.equal(stored, ref)


def test_decode_rows_batched_across_requests_and_block_groups():
    """Decode rows run together: rows with no packed page, with more packed pages than one
    dequantization group, and one whose block fills in this very step."""
    GROUP_BLOCKS = 16  # the reference fallback's dequantization group
    H, g, D = 2, 2, 64
    layout, policy, pool, pages = _setup("zipcache", H, D, num_blocks=40)
    B, scale = layout.block_size, D ** -0.5
    long_len = (GROUP_BLOCKS + 1) * B + 3
    a = FakeRequest(long_len + 4, H, g, D, list(range(GROUP_BLOCKS + 2)), seed=31)
    b = FakeRequest(8, H, g, D, [GROUP_BLOCKS + 3], seed=32)
    c = FakeRequest(B + 4, H, g, D, [GROUP_BLOCKS + 4, GROUP_BLOCKS + 5], seed=33)
    _step([a, b, c], [long_len, 3, B - 2], pool, pages, layout, policy, scale)
    for r, n in zip((a, b, c), (long_len, 3, B - 2)):
        r.pos += n
    for _ in range(4):  # c's first block fills on the second decode step
        ctxs = [r.pos for r in (a, b, c)]
        outs = _step([a, b, c], [1, 1, 1], pool, pages, layout, policy, scale)
        for r, ctx, out in zip((a, b, c), ctxs, outs):
            torch.testing.assert_close(out, _reference(r, 1, pages, layout, scale, ctx),
                                       atol=ATOL, rtol=RTOL)
            r.pos += 1
    assert (unpack_salient_mask(pages[[GROUP_BLOCKS + 4]], layout).sum(-1) == layout.n_hi).all()


class _RunnerState:
    """A runner request state as the lifecycle hooks read it: block ids per KV cache group."""

    def __init__(self, ids):
        self.block_ids = (list(ids),)


def test_lifecycle_never_frees_a_reallocated_block_twice():
    """A preempted request's slots are freed at preemption; when it resumes or is
    aborted later, its old block ids (now another request's) are left alone."""
    H, g, D = 1, 2, 64
    layout, policy, pool, pages = _setup("zipcache", H, D, slots=2)
    a = FakeRequest(100, H, g, D, [4], seed=41)
    _step([a], [50], pool, pages, layout, policy, D ** -0.5)
    pool.on_request_preempted("a", _RunnerState([4]))  # vLLM frees block 4 ...
    assert pool.in_use == 0 and pool.preempted_pending == 1
    b = FakeRequest(100, H, g, D, [4], seed=42)  # ... and gives it to b
    _step([b], [30], pool, pages, layout, policy, D ** -0.5)
    pool.on_request_resumed("a", _RunnerState([4]))  # a's state still lists block 4
    assert pool.fill[pool.slot_of(4)] == 30  # b's slot survives
    pool.on_request_preempted("c", _RunnerState([7]))
    pool.on_request_removed("c", _RunnerState([4]))  # aborted while waiting
    assert pool.slot_of(4) is not None
    pool.on_request_removed("b", _RunnerState([4]))  # b finishes: its slot goes
    assert pool.in_use == 0 and pool.preempted_pending == 0
    # Forced preemption (no preempted notice): released when resumed.
    _step([FakeRequest(10, H, g, D, [9], seed=43)], [5], pool, pages, layout, policy, 0.1)
    pool.on_request_resumed("d", _RunnerState([9]))
    assert pool.in_use == 0


def test_two_engines_keep_their_own_preemption_bookkeeping():
    """Two engines in one process (two pools): a request id preempted in one engine is
    another request in the other, whose end releases its own slot there."""
    H, g, D = 1, 2, 64
    layout, policy, pool_a, pages_a = _setup("zipcache", H, D, slots=2)
    pool_b, pages_b = _setup("zipcache", H, D, slots=2)[2:]
    _step([FakeRequest(100, H, g, D, [4], seed=51)], [50], pool_a, pages_a, layout, policy, D ** -0.5)
    _step([FakeRequest(100, H, g, D, [4], seed=52)], [50], pool_b, pages_b, layout, policy, D ** -0.5)
    pool_a.on_request_preempted("r", _RunnerState([4]))
    assert (pool_a.in_use, pool_a.preempted_pending) == (0, 1)
    assert (pool_b.in_use, pool_b.preempted_pending) == (1, 0)
    pool_b.on_request_removed("r", _RunnerState([4]))  # engine B's "r" finishes
    assert pool_b.in_use == 0 and pool_a.preempted_pending == 1
    pool_a.on_request_removed("r", _RunnerState([4]))  # engine A's "r", aborted while waiting
    assert pool_a.preempted_pending == 0
