"""The fused decode op (``zipcache::decode_staged``) against its PyTorch reference.

Both start from the same pool and pages; the C++ op must leave the same state:
staged K/V bit-identical (a copy with one rounding to the pool dtype), output,
saliency scores and probe counts equal up to float32 summation order.
Parametrized over head sizes 64/128, GQA 1/3/4/8, block sizes, staged counts at
both ends of the block (0 and B - 1), requests with no packed block, probe and
non-probe rows, dtypes, and query rows scattered in a mixed prefill/decode batch.
"""
from __future__ import annotations

import pytest
import torch

from zipcache_vllm import kernels
from zipcache_vllm.kernels import build, reference
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.quant.block import topk_salient_mask

# float32 results of two summation orders: observed <= 2e-6 relative to max|out|.
OUT_RTOL = 1e-5
SCORE_ATOL = 1e-5  # probabilities in [0, g]: float32 rounding of exp and sums


@pytest.fixture(scope="module", autouse=True)
def built():
    return build.load()


def _case(D, Hq, H, B, R, dtype, pool_dtype, seed, staged=None, num_blocks=None):
    g = torch.Generator().manual_seed(seed)
    layout = BlockLayout(B, D, H, 4, 2, int(0.45 * B))
    n_pages = 3 * R + 2
    kp = torch.randn(n_pages, B, H, D, generator=g) * 2
    vp = torch.randn(n_pages, B, H, D, generator=g)
    pages = kernels.quantize_pack(kp, vp, topk_salient_mask(torch.rand(n_pages, H, B, generator=g),
                                                            layout.n_hi), layout)
    T = R + 5  # decode rows scattered among other rows of the step
    rows = torch.randperm(T, generator=g)[:R].to(torch.int64)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    S = R + 2
    slots = torch.randperm(S, generator=g)[:R].to(torch.int64)
    if staged is None:
        staged = torch.randint(0, B, (R,), generator=g)
    staged = torch.as_tensor(staged, dtype=torch.int64)
    if num_blocks is None:
        num_blocks = torch.randint(0, 4, (R,), generator=g)
    num_blocks = torch.as_tensor(num_blocks, dtype=torch.int64)
    table = torch.randint(0, n_pages, (R, 4), generator=g).to(torch.int64)
    probe = (torch.rand(R, generator=g) < 0.6).float()
    pool = (torch.randn(S, H, B, D, generator=g).to(pool_dtype),
            torch.randn(S, H, B, D, generator=g).to(pool_dtype),
            torch.rand(S, H, B, generator=g), torch.randint(0, 9, (S, B), generator=g).float())
    return layout, (q, k, v, rows, pages, table, num_blocks, slots, staged, probe), pool


def _run(fn, layout, args, pool, out_dtype):
    q = args[0]
    pool = tuple(t.clone() for t in pool)
    out = torch.full(q.shape, 7.0, dtype=out_dtype)
    fn(*args, *pool, out, layout, 0.125)
    return out, pool


def _compare(layout, args, pool, out_dtype):
    out_c, pool_c = _run(kernels.decode_staged, layout, args, pool, out_dtype)
    out_r, pool_r = _run(reference.decode_staged_ref, layout, args, pool, out_dtype)
    rows = args[3]
    other = torch.ones(out_c.shape[0], dtype=torch.bool)
    other[rows] = False
    assert bool((out_c[other] == 7.0).all()), "rows that are not decode rows were written"
    tol = OUT_RTOL * float(out_r.float().abs().max())
    if out_dtype == torch.float32:
        torch.testing.assert_close(out_c, out_r, atol=tol, rtol=OUT_RTOL)
    else:  # one rounding to the output dtype after float32 math: at most one ulp apart
        torch.testing.assert_close(out_c.float(), out_r.float(), atol=tol, rtol=2 ** -7)
    torch.testing.assert_close(pool_c[0], pool_r[0], atol=0, rtol=0)  # staged keys
    torch.testing.assert_close(pool_c[1], pool_r[1], atol=0, rtol=0)  # staged values
    torch.testing.assert_close(pool_c[2], pool_r[2], atol=SCORE_ATOL, rtol=1e-5)
    torch.testing.assert_close(pool_c[3], pool_r[3], atol=0, rtol=0)  # counts are small integers


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,H", [(2, 2), (9, 3), (8, 2), (8, 1)])  # GQA 1, 3, 4, 8
@pytest.mark.parametrize("B", [16, 128])
def test_decode_matches_reference(D, Hq, H, B):
    layout, args, pool = _case(D, Hq, H, B, R=5, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=D + Hq + B)
    _compare(layout, args, pool, torch.bfloat16)


@pytest.mark.parametrize("dtype,pool_dtype,out_dtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.float32, torch.bfloat16, torch.float32),
])
def test_dtypes(dtype, pool_dtype, out_dtype):
    layout, args, pool = _case(64, 9, 3, 64, R=3, dtype=dtype, pool_dtype=pool_dtype, seed=3)
    _compare(layout, args, pool, out_dtype)


@pytest.mark.parametrize("staged", [[0, 0, 0], [127, 127, 127], [0, 127, 64]])
@pytest.mark.parametrize("num_blocks", [[0, 0, 0], [4, 4, 4], [0, 3, 1]])
def test_block_edges(staged, num_blocks):
    layout, args, pool = _case(64, 9, 3, 128, R=3, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=11, staged=staged, num_blocks=num_blocks)
    _compare(layout, args, pool, torch.float32)


@pytest.mark.parametrize("R", [1, 8, 33])
def test_many_rows(R):
    layout, args, pool = _case(64, 9, 3, 128, R=R, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=R)
    _compare(layout, args, pool, torch.bfloat16)


def test_first_token_equals_plain_attention_over_itself():
    """No packed block, nothing staged: the output is the token's own value."""
    layout, args, pool = _case(64, 4, 2, 16, R=2, dtype=torch.float32, pool_dtype=torch.float32,
                               seed=5, staged=[0, 0], num_blocks=[0, 0])
    out, _ = _run(kernels.decode_staged, layout, args, pool, torch.float32)
    q, k, v, rows = args[:4]
    expect = v.index_select(0, rows).repeat_interleave(2, dim=1)
    torch.testing.assert_close(out.index_select(0, rows), expect, atol=1e-6, rtol=1e-6)


def _valid_args():
    layout, args, pool = _case(64, 9, 3, 16, R=2, dtype=torch.float32, pool_dtype=torch.float32,
                               seed=1, num_blocks=[2, 3])
    return layout, list(args), list(pool)


@pytest.mark.parametrize("what,fix", [
    ("staged", lambda a, p: a.__setitem__(8, torch.tensor([0, 16]))),
    ("slots", lambda a, p: a.__setitem__(7, torch.tensor([0, 99]))),
    ("slots", lambda a, p: a.__setitem__(7, torch.tensor([1, 1]))),
    ("rows", lambda a, p: a.__setitem__(3, torch.tensor([0, 1], dtype=torch.int32))),
    ("probe", lambda a, p: a.__setitem__(9, torch.ones(2, dtype=torch.float64))),
    ("dtype", lambda a, p: a.__setitem__(1, a[1].bfloat16())),
    ("pool", lambda a, p: p.__setitem__(2, p[2][:, :, :8])),
    ("block id", lambda a, p: a.__setitem__(5, torch.full((2, 4), 10_000, dtype=torch.int64))),
])
def test_rejects_bad_arguments(what, fix):
    layout, args, pool = _valid_args()
    fix(args, pool)
    out = torch.zeros(args[0].shape)
    with pytest.raises(ValueError):
        kernels.decode_staged(*args, *pool, out, layout, 0.125)


def test_plan_once_run_per_layer_equals_one_shot_calls():
    """A step's plan (index tensors checked once) run for two layers leaves the same state
    as two one-shot :func:`decode_staged` calls."""
    layout, args, pool = _case(64, 9, 3, 16, R=3, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=11)
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = args
    plan = kernels.DecodePlan.create(rows, table, num_blocks, slots, staged, probe, layout.block_size)
    layers = [tuple(t.clone() for t in pool) for _ in range(2)]
    outs = [torch.full(q.shape, 7.0) for _ in range(2)]  # as _run starts them
    for lp, out in zip(layers, outs):
        plan.run(q, k, v, pages, *lp, out, layout, 0.125)
    for lp, out in zip(layers, outs):
        out_1, pool_1 = _run(kernels.decode_staged, layout, args, pool, torch.float32)
        assert torch.equal(out, out_1)
        assert all(torch.equal(a, b) for a, b in zip(lp, pool_1))


def test_plan_checks_the_step_and_run_checks_the_layer():
    layout, args, pool = _valid_args()
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = args
    with pytest.raises(ValueError, match="rows"):
        kernels.DecodePlan.create(rows.int(), table, num_blocks, slots, staged, probe, 16)
    with pytest.raises(ValueError, match="block_table"):
        kernels.DecodePlan.create(rows, table[0], num_blocks, slots, staged, probe, 16)
    plan = kernels.DecodePlan.create(rows, table, num_blocks, slots, staged, probe, 16)
    with pytest.raises(ValueError, match="pool"):
        plan.run(q, k, v, pages, pool[0], pool[1], pool[2][:, :, :8], pool[3], torch.zeros(q.shape),
                 layout, 0.125)
    with pytest.raises(ValueError, match="pages"):
        plan.run(q, k, v, pages.int(), *pool, torch.zeros(q.shape), layout, 0.125)
    with pytest.raises(ValueError, match="layout"):
        plan.run(q, k, v, pages, *pool, torch.zeros(q.shape), "not a layout", 0.125)


BAD_LAYER_TENSORS = {
    "q dtype": lambda t: dict(q=t["q"].double()),
    "k shape": lambda t: dict(k=t["k"][:, :1]),
    "v dtype": lambda t: dict(v=t["v"].bfloat16()),
    "out shape": lambda t: dict(out=t["out"][:, :1]),
    "pages width": lambda t: dict(pages=t["pages"][:, 1:]),
    "pool_k heads": lambda t: dict(pool_k=t["pool_k"][:, :1]),
    "pool_count dtype": lambda t: dict(pool_count=t["pool_count"].double()),
}


@pytest.mark.parametrize("what", sorted(BAD_LAYER_TENSORS))
@pytest.mark.parametrize("path", ["cpp", "reference"])
def test_run_checks_every_layer_tensor_on_each_path(path, what, monkeypatch):
    """The C++ path leaves the per-layer checks to the op itself: bad layer tensors still
    raise ValueError there, as on the reference path that checks them in Python."""
    if path == "reference":
        monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", "reference")
    layout, args, pool = _valid_args()
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = args
    plan = kernels.DecodePlan.create(rows, table, num_blocks, slots, staged, probe, 16)
    assert plan.path == path
    call = dict(q=q, k=k, v=v, pages=pages, pool_k=pool[0], pool_v=pool[1], pool_score=pool[2],
                pool_count=pool[3], out=torch.zeros(q.shape))
    call.update(BAD_LAYER_TENSORS[what](call))
    with pytest.raises(ValueError):
        plan.run(layout=layout, scale=0.125, **call)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plan_rotate_is_hadamard_rotate(dtype):
    """The plan's rotation (the op called directly) gives the bits of kernels.hadamard_rotate."""
    layout, args, pool = _valid_args()
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = args
    plan = kernels.DecodePlan.create(rows, table, num_blocks, slots, staged, probe, 16)
    x = torch.randn(5, 9, 64).to(dtype)
    assert torch.equal(plan.rotate(x), kernels.hadamard_rotate(x, dtype))
    assert plan.rotate(x).dtype == dtype


def test_pool_layer_views_alias_the_pool():
    """StagingPool.layers[i] are views of layer i: the decode kernel's writes land in the pool."""
    from zipcache_vllm.engine.staging import StagingPool

    pool = StagingPool(["a", "b"], 3, 16, 2, 64, torch.bfloat16)
    for i, views in enumerate(pool.layers):
        for view, whole in zip(views, (pool.k, pool.v, pool.score, pool.count)):
            view.fill_(i + 1)
            assert bool((whole[i] == i + 1).all())
            assert view.data_ptr() == whole[i].data_ptr()
