"""A staging capacity of several blocks: every decode path against the oracle at ``C = 2B, 3B``.

A saliency delay keeps a filled block staged until the next block's queries have scored
it, so a request stages up to ``C = blocks * B`` tokens (``staged < C``). The dense pool
(``[S, H, C, D]``) on the C++ op, the portable path and the Triton route (Triton's
interpreter without a GPU), and paged staging (``StagingLayout.blocks``, the runs of
``stage_ids``) on the C++ op (in place) and the portable / Triton fallback (gather, the
slot kernel, scatter), in the model dtype and in 8 bits, must leave the state of
``reference.decode_staged_ref`` run on the same tokens as a dense pool. Awkward sizes
(B = 16, H = 3, GQA 2, D = 64; 5 bf16 or 10 8-bit tokens a staging page, so a run's
tokens cross pages mid-block), staged counts at 0, around B, at C - 1, mixed rows.
Also: the bounds (``staged == C`` refused, a pool whose C is not a multiple of B
refused, a layer with fewer staged tokens than the plan addresses refused) and
``move_staged``, bit-exact over runs that share pages.
"""
from __future__ import annotations

import pytest
import torch

from zipcache_vllm import kernels
from zipcache_vllm.kernels import DecodePlan, build, gather_staged, move_staged, reference, scatter_staged
from zipcache_vllm.kernels.portable import fake_quantize_rows8, store_token
from zipcache_vllm.layout import BlockLayout, StagingLayout
from zipcache_vllm.quant.block import topk_salient_mask

B, H, G, D = 16, 3, 2, 64  # block size, KV heads, GQA group, head size
N_HI = 7
SCALE = 0.125
OUT_RTOL = 1e-5  # float32 results against the float64 oracle (as tests/kernels/test_decode_kernel.py)
SCORE_ATOL = 1e-5
CPU_PATHS = ("cpp", "torch")
ROUTE_ENV = {"cpp": "", "torch": "torch", "triton": "triton"}  # ZIPCACHE_VLLM_KERNELS


def _staged_cases(blocks: int) -> dict[str, list[int]]:
    """Staged counts of three to five rows for a capacity of ``blocks * B`` tokens."""
    C = blocks * B
    return {
        "start": [0, 1, 0],
        "block edge": [B - 1, B, B + 1],
        "end": [C - 1, C - 2, C - 1],
        "mixed": [0, B, C - 1, B - 1, C // 2 + 3],
    }


@pytest.fixture(scope="module", autouse=True)
def built():
    return build.load()


@pytest.fixture(autouse=True)
def _threads(one_intra_op_thread):
    """Tiny tensors: one intra-op thread."""


def _layout() -> BlockLayout:
    return BlockLayout(B, D, H, 4, 2, N_HI)


def _step(staged, dtype, seed, num_blocks=None):
    """A decode step of ``len(staged)`` rows scattered among other query rows, over packed
    pages built on the default route: ``(q, k, v, rows, pages, table, num_blocks, staged,
    probe)`` (the slots are the caller's)."""
    g = torch.Generator().manual_seed(seed)
    layout = _layout()
    R = len(staged)
    n_pages = 3 * R + 2
    kp = torch.randn(n_pages, B, H, D, generator=g) * 2
    vp = torch.randn(n_pages, B, H, D, generator=g)
    pages = kernels.quantize_pack(kp, vp, topk_salient_mask(torch.rand(n_pages, H, B, generator=g), N_HI),
                                  layout)
    T = R + 4
    rows = torch.randperm(T, generator=g)[:R].to(torch.int64)
    q, k, v = (torch.randn(T, n, D, generator=g).to(dtype) for n in (H * G, H, H))
    if num_blocks is None:
        num_blocks = torch.randint(0, 4, (R,), generator=g)
    num_blocks = torch.as_tensor(num_blocks, dtype=torch.int64)
    table = torch.randint(0, n_pages, (R, 4), generator=g).to(torch.int64)
    probe = (torch.arange(R) % 3 != 1).float()  # probe and non-probe rows
    return layout, dict(q=q, k=k, v=v, rows=rows, pages=pages, table=table, num_blocks=num_blocks,
                        staged=torch.as_tensor(staged, dtype=torch.int64), probe=probe)


def _dense_case(blocks, staged, dtype, pool_dtype, seed, num_blocks=None):
    layout, s = _step(staged, dtype, seed, num_blocks)
    g = torch.Generator().manual_seed(seed + 1)
    R, C = len(staged), blocks * B
    S = R + 2
    s["slots"] = torch.randperm(S, generator=g)[:R].to(torch.int64)
    pool = (torch.randn(S, H, C, D, generator=g).to(pool_dtype),
            torch.randn(S, H, C, D, generator=g).to(pool_dtype),
            torch.rand(S, H, C, generator=g), torch.randint(0, 9, (S, C), generator=g).float())
    return layout, s, pool


def _args(s: dict) -> tuple:
    """The arguments of ``kernels.decode_staged`` before the pool."""
    return (s["q"], s["k"], s["v"], s["rows"], s["pages"], s["table"], s["num_blocks"], s["slots"],
            s["staged"], s["probe"])


def _index(args) -> tuple:
    """The index tensors :meth:`DecodePlan.create` takes, of :func:`_args`' tuple."""
    return (args[3], *args[5:])


def _reference(layout, s: dict, pool, out_dtype):
    """The oracle from copies of ``pool``: its out (7.0 in rows that are not decode rows) and pool."""
    pool = tuple(t.clone() for t in pool)
    out = torch.full(s["q"].shape, 7.0, dtype=out_dtype)
    reference.decode_staged_ref(*_args(s), pool, out, layout, SCALE)
    return out, pool


def _assert_out(out, want, rows):
    other = torch.ones(out.shape[0], dtype=torch.bool)
    other[rows] = False
    assert bool((out[other] == 7.0).all()), "rows that are not decode rows were written"
    tol = OUT_RTOL * float(want.float().abs().max())
    rtol = OUT_RTOL if out.dtype == torch.float32 else 2 ** -7  # one rounding to the output dtype
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=rtol)


def _route(monkeypatch, path: str) -> torch.device:
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
    return torch.device("cuda" if path == "triton" and torch.cuda.is_available() else "cpu")


def _dense_compare(path, monkeypatch, blocks, staged, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                   out_dtype=torch.bfloat16, seed=0, num_blocks=None):
    layout, s, pool = _dense_case(blocks, staged, dtype, pool_dtype, seed, num_blocks)
    want_out, want_pool = _reference(layout, s, pool, out_dtype)
    device = _route(monkeypatch, path)
    on = [t.to(device) for t in _args(s)]
    got_pool = [t.clone().to(device) for t in pool]
    out = torch.full(s["q"].shape, 7.0, dtype=out_dtype, device=device)
    plan = DecodePlan.create(*_index(on), layout.block_size, capacity=blocks * B)
    assert plan.path == path and plan.capacity == blocks * B
    plan.run(*on[:3], on[4], *got_pool, out, layout, SCALE)
    got_pool = [t.cpu() for t in got_pool]
    _assert_out(out.cpu(), want_out, s["rows"])
    assert torch.equal(got_pool[0], want_pool[0]) and torch.equal(got_pool[1], want_pool[1])
    torch.testing.assert_close(got_pool[2], want_pool[2], atol=SCORE_ATOL, rtol=1e-5)
    assert torch.equal(got_pool[3], want_pool[3])  # counts are small integers


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("case", ["start", "block edge", "end", "mixed"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float32)])
def test_dense_pool_matches_reference(path, blocks, case, dtype, out_dtype, monkeypatch):
    staged = _staged_cases(blocks)[case]
    _dense_compare(path, monkeypatch, blocks, staged, dtype, dtype, out_dtype, seed=blocks + len(case))


@pytest.mark.parametrize("path", CPU_PATHS)
def test_dense_pool_rows_without_packed_blocks_and_mixed_dtypes(path, monkeypatch):
    """No packed block (the staged tokens alone) next to rows with four, a float32 model
    with a bfloat16 pool, float16 into a float32 output."""
    _dense_compare(path, monkeypatch, 3, [2 * B + 5, 0, B], torch.float32, torch.bfloat16, torch.float32,
                   seed=4, num_blocks=[0, 0, 4])
    _dense_compare(path, monkeypatch, 2, [2 * B - 1, B + 3], torch.float16, torch.float16, torch.float32,
                   seed=5, num_blocks=[4, 0])


# The Triton route in the interpreter: (blocks, staged, num_blocks, dtype, out_dtype).
TRITON_CASES = [
    (2, [0, B, 2 * B - 1], [0, 3, 1], torch.bfloat16, torch.bfloat16),
    (3, [3 * B - 1, B - 1, 2 * B + 7], [2, 0, 4], torch.float32, torch.float32),
]


@pytest.mark.parametrize("blocks,staged,num_blocks,dtype,out_dtype", TRITON_CASES)
def test_triton_route_dense_pool_matches_reference(blocks, staged, num_blocks, dtype, out_dtype, monkeypatch):
    pytest.importorskip("triton")
    _dense_compare("triton", monkeypatch, blocks, staged, dtype, dtype, out_dtype, seed=blocks,
                   num_blocks=num_blocks)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_capacity_of_one_block_is_todays_step(path, monkeypatch):
    """Rows staging less than a block: a pool of 3B tokens gives the outputs and the first B
    tokens of a pool of B (today's staging), bit for bit; past them K/V are untouched and
    scores / counts cleared."""
    layout, s, pool = _dense_case(3, [0, B - 1, 5], torch.bfloat16, torch.bfloat16, seed=9)
    _route(monkeypatch, path)
    outs, pools = [], []
    for C in (B, 3 * B):
        p = [t[..., :C, :].clone() if t.dim() == 4 else t[..., :C].clone() for t in pool]
        out = torch.full(s["q"].shape, 7.0)
        kernels.decode_staged(*_args(s), *p, out, layout, SCALE)
        outs.append(out)
        pools.append(p)
    assert torch.equal(outs[0], outs[1])
    for small, big in zip(pools[0], pools[1]):
        assert torch.equal(big[..., :B, :] if big.dim() == 4 else big[..., :B], small)
    slots = s["slots"]
    assert torch.equal(pools[1][0][:, :, B:], pool[0][:, :, B:])  # K past the staged tokens: untouched
    assert bool((pools[1][2][slots, :, B:] == 0).all()) and bool((pools[1][3][slots, B:] == 0).all())


# ---------------------------------------------------------------------------
# Paged staging
# ---------------------------------------------------------------------------


def _paged_case(blocks, staged, dtype, kv_bits, seed, num_blocks=None):
    """A step over paged staging: the rows' runs filled with ``C`` valid staged tokens (by
    ``scatter_staged``) in pages past the packed ones; the staging layout and the runs."""
    layout, s = _step(staged, dtype, seed, num_blocks)
    st = StagingLayout.of(layout, dtype.itemsize, kv_bits, blocks)
    assert st.capacity == blocks * B and st.tokens_per_page < B  # runs cross pages mid-block
    g = torch.Generator().manual_seed(seed + 2)
    R, C = len(staged), st.capacity
    packed = s["pages"].shape[0]
    extra = R * st.pages + 3
    pages = torch.cat([s["pages"], torch.zeros(extra, layout.page_bytes, dtype=torch.uint8)])
    ids = (packed + torch.randperm(extra, generator=g)[:R * st.pages]).reshape(R, st.pages)
    k0, v0 = (torch.randn(R, H, C, D, generator=g).to(dtype) for _ in range(2))
    scatter_staged(pages, ids, st, k0, v0, torch.rand(R, H, C, generator=g),
                   torch.randint(0, 9, (R, C), generator=g).float())
    s["pages"], s["packed"] = pages, packed
    s["slots"] = torch.arange(R, dtype=torch.int64)
    return layout, s, st, ids


def _paged_compare(path, monkeypatch, blocks, staged, dtype, kv_bits, seed, num_blocks=None):
    layout, s, st, ids = _paged_case(blocks, staged, dtype, kv_bits, seed, num_blocks)
    q8 = kv_bits == 8
    # the oracle on the runs as a dense pool; with 8 bits in float32, the new tokens as
    # they read back from their 8 bits
    ref = dict(s)
    pool = gather_staged(s["pages"], ids, st, torch.float32 if q8 else dtype)
    if q8:
        ref["q"] = s["q"].float()
        ref["k"], ref["v"] = fake_quantize_rows8(s["k"]), fake_quantize_rows8(s["v"])
    want_out, want_pool = _reference(layout, ref, pool, torch.float32)
    device = _route(monkeypatch, path)
    pages = s["pages"].clone().to(device)
    on = [t.to(device) for t in _args(s)]
    plan = DecodePlan.create(*_index(on), layout.block_size, ids.to(device), st)
    assert plan.path == path and plan.capacity == st.capacity
    out = torch.full(s["q"].shape, 7.0, dtype=torch.float32, device=device)
    plan.run(*on[:3], pages, None, None, None, None, out, layout, SCALE)
    pages = pages.cpu()
    _assert_out(out.cpu(), want_out, s["rows"])
    got = gather_staged(pages, ids, st, torch.float32 if q8 else dtype)
    for r, n in enumerate((s["staged"] + 1).tolist()):  # past the staged tokens K/V may be cleared
        assert torch.equal(got[0][r, :, :n], want_pool[0][r, :, :n])
        assert torch.equal(got[1][r, :, :n], want_pool[1][r, :, :n])
        torch.testing.assert_close(got[2][r, :, :n], want_pool[2][r, :, :n], atol=SCORE_ATOL, rtol=1e-5)
        assert torch.equal(got[3][r, :n], want_pool[3][r, :n])
        # the run's pages after the new token's are not written: they may not be allocated
        # yet (StagingLayout.lookahead_blocks)
        later = ids[r, (n - 1) // st.tokens_per_page + 1:]
        assert torch.equal(pages[later], s["pages"][later])
    assert torch.equal(pages[:s["packed"]], s["pages"][:s["packed"]])  # the packed pages


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("case", ["block edge", "end", "mixed"])
@pytest.mark.parametrize("dtype,kv_bits", [(torch.bfloat16, None), (torch.float32, None),
                                           (torch.bfloat16, 8)])
def test_paged_staging_matches_reference(path, blocks, case, dtype, kv_bits, monkeypatch):
    staged = _staged_cases(blocks)[case]
    _paged_compare(path, monkeypatch, blocks, staged, dtype, kv_bits, seed=3 * blocks + len(case))


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_triton_route_paged_staging_matches_reference(kv_bits, monkeypatch):
    pytest.importorskip("triton")
    _paged_compare("triton", monkeypatch, 2, [2 * B - 1, B, 3], torch.bfloat16, kv_bits, seed=6,
                   num_blocks=[1, 0, 3])


@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_gather_scatter_store_over_the_capacity(blocks, kv_bits):
    """Dense copies are ``C`` tokens long; a token staged at any index below ``C`` reads back."""
    layout = _layout()
    st = StagingLayout.of(layout, 2, kv_bits, blocks)
    C = st.capacity
    g = torch.Generator().manual_seed(blocks)
    pages = torch.zeros(4 * st.pages, layout.page_bytes, dtype=torch.uint8)
    ids = torch.randperm(4 * st.pages, generator=g)[:2 * st.pages].reshape(2, st.pages)
    k, v = (torch.randn(2, H, C, D, generator=g).bfloat16() for _ in range(2))
    score, count = torch.rand(2, H, C, generator=g), torch.rand(2, C, generator=g)
    scatter_staged(pages, ids, st, k, v, score, count)
    dtype = torch.float32 if kv_bits == 8 else torch.bfloat16  # 8 bits read back in float32
    K, V, S, N = gather_staged(pages, ids, st, dtype)
    assert K.shape == (2, H, C, D) and S.shape == (2, H, C) and N.shape == (2, C)
    read = fake_quantize_rows8 if kv_bits == 8 else (lambda x: x)
    assert torch.equal(K, read(k)) and torch.equal(V, read(v))
    assert torch.equal(S, score) and torch.equal(N, count)
    at = torch.tensor([B + 3, C - 1])
    store_token(pages, ids, st, at, -k[:, :, 0], -v[:, :, 0])
    K2, V2, _, _ = gather_staged(pages, ids, st, dtype)
    for r in range(2):
        assert torch.equal(K2[r, :, at[r]], read(-k[r, :, 0]))
        assert torch.equal(V2[r, :, at[r]], read(-v[r, :, 0]))
    with pytest.raises(ValueError, match="capacity"):
        scatter_staged(pages, ids, st, *(torch.zeros(2, H, C + 1, D).bfloat16() for _ in range(2)),
                       torch.zeros(2, H, C + 1), torch.zeros(2, C + 1))


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ("cpp", "torch", "triton"))
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_staged_equal_to_the_capacity_is_refused(path, blocks, monkeypatch):
    layout, s, pool = _dense_case(blocks, [0, blocks * B - 1], torch.float32, torch.float32, seed=1)
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
    args = list(_args(s))
    DecodePlan.create(*_index(args), B, capacity=blocks * B)
    kernels.decode_staged(*args, *pool, torch.zeros(s["q"].shape), layout, SCALE)
    args[8] = torch.tensor([0, blocks * B])
    with pytest.raises(ValueError, match=rf"staged must be in \[0, {blocks * B}\)"):
        DecodePlan.create(*_index(args), B, capacity=blocks * B)
    with pytest.raises(ValueError, match="staged"):
        kernels.decode_staged(*args, *pool, torch.zeros(s["q"].shape), layout, SCALE)
    if blocks > 1:  # the default capacity is one block
        args[8] = torch.tensor([0, B])
        with pytest.raises(ValueError, match=rf"staged must be in \[0, {B}\)"):
            DecodePlan.create(*_index(args), B)


@pytest.mark.parametrize("capacity", [0, B // 2, B + 8, -B, 2.0 * B])
def test_plan_capacity_must_be_a_multiple_of_the_block(capacity):
    layout, s, pool = _dense_case(1, [0, 1], torch.float32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="capacity must be a positive multiple"):
        DecodePlan.create(*_index(_args(s)), B, capacity=capacity)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_pool_capacity_not_a_multiple_of_the_block_is_refused(path, monkeypatch):
    layout, s, pool = _dense_case(2, [0, 3], torch.float32, torch.float32, seed=2)
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
    odd = [t[..., :B + 8, :].contiguous() if t.dim() == 4 else t[..., :B + 8].contiguous() for t in pool]
    out = torch.zeros(s["q"].shape)
    plan = DecodePlan.create(*_index(_args(s)), B)
    assert plan.path == path
    with pytest.raises(ValueError, match="multiple of B"):
        plan.run(*_args(s)[:3], s["pages"], *odd, out, layout, SCALE)
    with pytest.raises(ValueError, match="capacity must be a positive multiple"):
        kernels.decode_staged(*_args(s), *odd, out, layout, SCALE)
    plan.run(*_args(s)[:3], s["pages"], *pool, out, layout, SCALE)  # a pool of 2B serves a plan of B


@pytest.mark.parametrize("path", CPU_PATHS)
def test_layer_with_fewer_staged_tokens_than_the_plan_addresses_is_refused(path, monkeypatch):
    """The plan checked staged < 3B once and records the largest staged index it addresses
    (``staged_end``); a layer whose pool holds fewer tokens a slot would be written past its
    end: refused (the C++ op compares its capacity with the bounds). A pool that holds the
    staged tokens addressed serves the plan."""
    layout, s, pool = _dense_case(2, [0, 2 * B + 5], torch.float32, torch.float32, seed=3)
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
    plan = DecodePlan.create(*_index(_args(s)), B, capacity=3 * B)
    assert plan.staged_end == 2 * B + 6 and plan.capacity == 3 * B
    with pytest.raises(ValueError, match=f"staged tokens < {2 * B + 6}"):
        plan.run(*_args(s)[:3], s["pages"], *pool, torch.zeros(s["q"].shape), layout, SCALE)
    s["staged"] = torch.tensor([0, B - 1])
    plan = DecodePlan.create(*_index(_args(s)), B, capacity=3 * B)
    plan.run(*_args(s)[:3], s["pages"], *pool, torch.zeros(s["q"].shape), layout, SCALE)


def test_paged_plan_checks_the_staging_capacity():
    layout = _layout()
    st = StagingLayout.of(layout, 4, None, 2)
    one = torch.zeros(1, dtype=torch.int64)
    args = (one, torch.zeros(1, 1, dtype=torch.int64), one, one, torch.tensor([2 * B - 1]), torch.zeros(1), B)
    ids = torch.arange(st.pages).reshape(1, st.pages)
    assert DecodePlan.create(*args, ids, st).capacity == 2 * B
    bad = args[:4] + (torch.tensor([2 * B]),) + args[5:]
    with pytest.raises(ValueError, match=rf"staged must be in \[0, {2 * B}\)"):
        DecodePlan.create(*bad, ids, st)
    with pytest.raises(ValueError, match="exceeds the staging layout"):
        DecodePlan.create(*args, ids, st, capacity=3 * B)
    assert DecodePlan.create(*args[:4], one, *args[5:], ids, st, capacity=B).capacity == B
    with pytest.raises(ValueError, match=rf"stage_ids must be int64 \[1, {st.pages}\]"):
        DecodePlan.create(*args, ids[:, :-1], st)


def test_cpp_paged_op_checks_its_staging_and_bounds():
    """``zipcache::decode_paged`` takes the 9 entries of ``StagingLayout.args()`` and the
    plan's 4 bounds, and refuses a staging capacity below the staged bound."""
    layout, s, st, ids = _paged_case(2, [0, 2 * B - 1], torch.float32, None, seed=8)
    plan = DecodePlan.create(*_index(_args(s)), B, ids, st)
    lay, offs = kernels.layout_args(layout)
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = _args(s)

    def call(staging, bounds):
        torch.ops.zipcache.decode_paged(q, k, v, rows, pages, table, num_blocks, ids, staged, probe,
                                        torch.zeros(q.shape), lay, offs, staging, SCALE, "", bounds)

    bounds = list(plan.bounds) + [2 * B]
    with pytest.raises(ValueError, match="staging must be"):
        call(st.args()[:8], bounds)
    with pytest.raises(ValueError, match="bounds must be"):
        call(st.args(), list(plan.bounds))
    with pytest.raises(ValueError, match="staged tokens < 48"):
        call(st.args(), list(plan.bounds) + [3 * B])
    with pytest.raises(ValueError, match="positive multiple"):
        call(st.args()[:8] + [B + 8], bounds)
    one = StagingLayout.of(layout, 4, None, 1)  # one block: fewer tokens than the run's pages hold
    with pytest.raises(ValueError, match="staged tokens < 32"):
        call(st.args()[:8] + [one.capacity], bounds)
    call(st.args(), bounds)


# ---------------------------------------------------------------------------
# move_staged
# ---------------------------------------------------------------------------


def _token_spans(st: StagingLayout, pos: int) -> list[tuple[int, int]]:
    """``(offset, bytes)`` in its page of every entry of the token at position ``pos`` of a
    page, from the layout's offsets (the format of ``StagingLayout``'s docstring)."""
    Hh, T, Dd = st.num_kv_heads, st.tokens_per_page, st.head_size
    row = Dd * st.kv_elt_bytes
    spans = []
    for h in range(Hh):
        i = h * T + pos
        spans += [(i * row, row), (st.v_offset + i * row, row), (st.score_offset + 4 * i, 4)]
        if st.kv_bits == 8:
            spans += [(st.params_offset + 4 * i, 4), (st.params_offset + 4 * Hh * T + 4 * i, 4)]
    return spans + [(st.count_offset + 4 * pos, 4)]


def _moved(pages, src_ids, dst_ids, st, src_from, n):
    """What ``move_staged`` must leave: every byte of the source tokens (read before any
    write) at the destination tokens, token by token; all other bytes as they were."""
    T = st.tokens_per_page
    want = pages.clone()
    for src, dst in zip(src_ids.tolist(), dst_ids.tolist()):
        for i in range(n):
            a, b = src_from + i, i
            for (off_a, nb), (off_b, _) in zip(_token_spans(st, a % T), _token_spans(st, b % T)):
                want[dst[b // T], off_b:off_b + nb] = pages[src[a // T], off_a:off_a + nb]
    return want


@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("kv_bits,elt", [(None, 2), (None, 4), (8, 2)])
def test_move_staged_is_bit_exact_over_shared_pages(blocks, kv_bits, elt):
    """The run moves one block on (its oldest block packed): the tokens after that block go
    to the start of the new run, which shares all but one page with the old one."""
    layout = _layout()
    st = StagingLayout.of(layout, elt, kv_bits, blocks)
    C = st.capacity
    g = torch.Generator().manual_seed(blocks + elt)
    n_pages = 2 * (st.pages + 1) + 3
    pages = torch.randint(0, 256, (n_pages, layout.page_bytes), dtype=torch.uint8, generator=g)
    tables = torch.randperm(n_pages, generator=g)[:2 * (st.pages + 1)].reshape(2, st.pages + 1)
    src_ids, dst_ids = tables[:, :-1], tables[:, 1:]
    # B tokens per page would shift the bytes within pages; T < B moves them across pages
    assert st.tokens_per_page < B
    for src_from, n in ((B, C - B), (B, 5), (B + 3, C - B - 3), (0, C), (B, 0)):
        before = pages.clone()
        want = _moved(before, src_ids, dst_ids, st, src_from, n)
        move_staged(pages, src_ids, dst_ids, st, src_from, n)
        assert torch.equal(pages, want), (src_from, n)


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_move_staged_reads_back_as_the_moved_tokens(kv_bits):
    """After the move, the destination's first ``n`` tokens read back (K, V, scores, counts)
    as the source's tokens did, here across disjoint runs; tokens past ``n`` are untouched."""
    layout = _layout()
    st = StagingLayout.of(layout, 2, kv_bits, 3)
    C = st.capacity
    g = torch.Generator().manual_seed(11)
    pages = torch.zeros(2 * 2 * st.pages + 1, layout.page_bytes, dtype=torch.uint8)
    ids = torch.randperm(pages.shape[0], generator=g)[:4 * st.pages].reshape(4, st.pages)
    src_ids, dst_ids = ids[:2], ids[2:]
    for run in (src_ids, dst_ids):
        scatter_staged(pages, run, st, *(torch.randn(2, H, C, D, generator=g).bfloat16() for _ in range(2)),
                       torch.rand(2, H, C, generator=g), torch.rand(2, C, generator=g))
    dtype = torch.float32 if kv_bits == 8 else torch.bfloat16
    src = gather_staged(pages, src_ids, st, dtype)
    dst = gather_staged(pages, dst_ids, st, dtype)
    n = C - B - 1
    move_staged(pages, src_ids, dst_ids, st, B + 1, n)
    moved = gather_staged(pages, dst_ids, st, dtype)
    assert torch.equal(gather_staged(pages, src_ids, st, dtype)[0], src[0])  # the source stays
    for got, a, b in zip(moved, src, dst):
        assert torch.equal(got[..., :n, :] if got.dim() == 4 else got[..., :n],
                           a[..., B + 1:, :] if a.dim() == 4 else a[..., B + 1:])
        assert torch.equal(got[..., n:, :] if got.dim() == 4 else got[..., n:],
                           b[..., n:, :] if b.dim() == 4 else b[..., n:])


def test_move_staged_checks_its_arguments():
    st = StagingLayout.of(_layout(), 2, None, 2)
    pages = torch.zeros(2 * st.pages, st.page_bytes, dtype=torch.uint8)
    ids = torch.arange(2 * st.pages).reshape(2, st.pages)
    with pytest.raises(ValueError, match="capacity"):
        move_staged(pages, ids, ids, st, B, B + 1)
    with pytest.raises(ValueError, match="capacity"):
        move_staged(pages, ids, ids, st, -1, 2)
    with pytest.raises(ValueError, match=rf"\[R, {st.pages}\]"):
        move_staged(pages, ids[:, :-1], ids[:, 1:], st, 0, 1)
    with pytest.raises(ValueError, match=rf"\[R, {st.pages}\]"):
        move_staged(pages, ids, ids[:1], st, 0, 1)
    before = pages.clone()
    move_staged(pages, ids[:0], ids[:0], st, 0, B)  # no rows: nothing to do
    assert torch.equal(pages, before)
