"""The fused decode step on every kernel path against its oracle (``reference.decode_staged_ref``).

The C++ op (``zipcache::decode_staged``), the portable PyTorch path
(``ZIPCACHE_VLLM_KERNELS=torch``) and the Triton route (``ZIPCACHE_VLLM_KERNELS=triton``:
``decode_attention`` + ``staging_attention`` + ``merge_lse``, in Triton's interpreter
without a GPU) all start from the same pool and pages and must leave the oracle's
state: staged K/V bit-identical (a copy with one rounding to the pool dtype), output,
saliency scores and probe counts equal up to float32 rounding (the oracle is one float64
softmax per row over the packed and staged tokens together, no merge).
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

# float32 results against the float64 oracle: observed <= 2e-6 relative to max|out|.
OUT_RTOL = 1e-5
SCORE_ATOL = 1e-5  # probabilities in [0, g]: float32 rounding of exp and sums
PATHS = ("cpp", "torch")  # the CPU paths; the Triton route has its own (smaller) cases
ROUTE_ENV = {"cpp": "", "torch": "torch", "triton": "triton"}  # ZIPCACHE_VLLM_KERNELS


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
    """``fn`` on copies of the staging ``pool``: the kernels' wrapper takes its four
    tensors, the oracle the tuple."""
    q = args[0]
    pool = tuple(t.clone() for t in pool)
    out = torch.full(q.shape, 7.0, dtype=out_dtype)
    if fn is reference.decode_staged_ref:
        fn(*args, pool, out, layout, 0.125)
    else:
        fn(*args, *pool, out, layout, 0.125)
    return out, pool


def _route(monkeypatch, path: str) -> torch.device:
    """Route the kernels to ``path``; the device its tensors live on."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
    return torch.device("cuda" if path == "triton" and torch.cuda.is_available() else "cpu")


def _compare(layout, args, pool, out_dtype, path="cpp", monkeypatch=None):
    """``path``'s decode step against the oracle from the same state (the case was built
    on the default route: its pages are the C++ packer's)."""
    device = _route(monkeypatch, path) if monkeypatch is not None else torch.device("cpu")
    on = [t.to(device) for t in args]
    assert kernels.kernel_path(on[0]) == path
    out_c, pool_c = _run(kernels.decode_staged, layout, on, [t.to(device) for t in pool], out_dtype)
    out_c, pool_c = out_c.cpu(), [t.cpu() for t in pool_c]
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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,H", [(2, 2), (9, 3), (8, 2), (8, 1)])  # GQA 1, 3, 4, 8
@pytest.mark.parametrize("B", [16, 128])
def test_decode_matches_reference(D, Hq, H, B, path, monkeypatch):
    layout, args, pool = _case(D, Hq, H, B, R=5, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=D + Hq + B)
    _compare(layout, args, pool, torch.bfloat16, path, monkeypatch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,pool_dtype,out_dtype", [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.float32, torch.bfloat16, torch.float32),
])
def test_dtypes(dtype, pool_dtype, out_dtype, path, monkeypatch):
    layout, args, pool = _case(64, 9, 3, 64, R=3, dtype=dtype, pool_dtype=pool_dtype, seed=3)
    _compare(layout, args, pool, out_dtype, path, monkeypatch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("staged", [[0, 0, 0], [127, 127, 127], [0, 127, 64]])
@pytest.mark.parametrize("num_blocks", [[0, 0, 0], [4, 4, 4], [0, 3, 1]])
def test_block_edges(staged, num_blocks, path, monkeypatch):
    layout, args, pool = _case(64, 9, 3, 128, R=3, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=11, staged=staged, num_blocks=num_blocks)
    _compare(layout, args, pool, torch.float32, path, monkeypatch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("R", [1, 8, 33])
def test_many_rows(R, path, monkeypatch):
    layout, args, pool = _case(64, 9, 3, 128, R=R, dtype=torch.bfloat16, pool_dtype=torch.bfloat16,
                               seed=R)
    _compare(layout, args, pool, torch.bfloat16, path, monkeypatch)


# The Triton route in the interpreter (without a GPU): a few awkward cases, small blocks.
# (D, Hq, H, B, staged, num_blocks, dtype, out_dtype): GQA 3 and 8, both ends of the
# block, rows without packed blocks, head size 128, float16 / float32 in and out.
TRITON_CASES = [
    (64, 9, 3, 16, [0, 15, 7], [0, 3, 1], torch.bfloat16, torch.bfloat16),
    (128, 8, 1, 32, [31, 0], [2, 0], torch.float32, torch.float32),
    (64, 4, 2, 16, [5], [4], torch.float16, torch.float32),
]


@pytest.mark.parametrize("D,Hq,H,B,staged,num_blocks,dtype,out_dtype", TRITON_CASES)
def test_triton_route_matches_reference(D, Hq, H, B, staged, num_blocks, dtype, out_dtype, monkeypatch):
    """The CUDA staging half of decode: Triton ``staging_attention`` + ``merge_lse`` after
    ``decode_attention``, the saliency in torch ops on the device."""
    pytest.importorskip("triton")
    layout, args, pool = _case(D, Hq, H, B, R=len(staged), dtype=dtype, pool_dtype=dtype, seed=D + B,
                               staged=staged, num_blocks=num_blocks)
    _compare(layout, args, pool, out_dtype, "triton", monkeypatch)


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


# Index values the plan checks once per step (args: q, k, v, rows, pages, table,
# num_blocks, slots, staged, probe), on every path.
BAD_STEP_VALUES = {
    "staged >= B": lambda a: a.__setitem__(8, torch.tensor([0, 16])),
    "staged < 0": lambda a: a.__setitem__(8, torch.tensor([-1, 0])),
    "shared slot": lambda a: a.__setitem__(7, torch.tensor([1, 1])),
    "negative slot": lambda a: a.__setitem__(7, torch.tensor([-1, 1])),
    "negative row": lambda a: a.__setitem__(3, torch.tensor([-1, 1])),
    "num_blocks > max_blocks": lambda a: a.__setitem__(6, torch.tensor([2, 5])),
    "negative block id": lambda a: a.__setitem__(5, torch.full((2, 4), -1, dtype=torch.int64)),
}


@pytest.mark.parametrize("path", ("cpp", "torch", "triton"))
@pytest.mark.parametrize("what", sorted(BAD_STEP_VALUES))
def test_plan_checks_the_index_values_once(what, path, monkeypatch):
    """A bad index value is refused when the step is planned, before any layer runs."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
    layout, args, pool = _valid_args()
    BAD_STEP_VALUES[what](args)
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = args
    with pytest.raises(ValueError):
        kernels.DecodePlan.create(rows, table, num_blocks, slots, staged, probe, layout.block_size)


def test_plan_bounds_are_what_the_rows_address():
    layout, args, pool = _valid_args()
    q, k, v, rows, pages, table, num_blocks, slots, staged, probe = args
    plan = kernels.DecodePlan.create(rows, table, num_blocks, slots, staged, probe, layout.block_size)
    used = torch.cat([table[r, :int(num_blocks[r])] for r in range(2)])
    assert plan.bounds == (int(rows.max()) + 1, int(slots.max()) + 1, int(used.max()) + 1)
    empty = kernels.DecodePlan.create(*(t[:0] for t in (rows, table, num_blocks, slots, staged, probe)),
                                      layout.block_size)
    assert empty.bounds == (0, 0, 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("what,fix", [
    ("staged", lambda a, p: a.__setitem__(8, torch.tensor([0, 16]))),
    ("slots", lambda a, p: a.__setitem__(7, torch.tensor([0, 99]))),
    ("slots", lambda a, p: a.__setitem__(7, torch.tensor([1, 1]))),
    ("rows", lambda a, p: a.__setitem__(3, torch.tensor([0, 1], dtype=torch.int32))),
    ("rows", lambda a, p: a.__setitem__(3, torch.tensor([0, 99]))),
    ("probe", lambda a, p: a.__setitem__(9, torch.ones(2, dtype=torch.float64))),
    ("dtype", lambda a, p: a.__setitem__(1, a[1].bfloat16())),
    ("pool", lambda a, p: p.__setitem__(2, p[2][:, :, :8])),
    ("block id", lambda a, p: a.__setitem__(5, torch.full((2, 4), 10_000, dtype=torch.int64))),
])
def test_rejects_bad_arguments(what, fix, path, monkeypatch):
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
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
    # shaped right but smaller than what the plan addresses (its bounds)
    "fewer query rows": lambda t: {n: t[n][:1] for n in ("q", "k", "v", "out")},
    "fewer slots": lambda t: {n: t[n][:1] for n in ("pool_k", "pool_v", "pool_score", "pool_count")},
    "fewer pages": lambda t: dict(pages=t["pages"][:1]),
}


@pytest.mark.parametrize("what", sorted(BAD_LAYER_TENSORS))
@pytest.mark.parametrize("path", PATHS)
def test_run_checks_every_layer_tensor_on_each_path(path, what, monkeypatch):
    """The C++ path leaves the per-layer checks to the op itself: bad layer tensors still
    raise ValueError there, as on the portable path that checks them in Python."""
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", ROUTE_ENV[path])
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
