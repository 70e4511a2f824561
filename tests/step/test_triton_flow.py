"""The backend step flow on the Triton kernels (the CUDA path) equals the flow on the C++ kernels.

``ZIPCACHE_VLLM_KERNELS=triton`` routes ``zipcache_vllm.kernels`` to the Triton kernels
(``kernels/gpu.py``); with a GPU the Triton route runs on CUDA tensors (compiled), without
one on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported, by tests/conftest.py), so sizes are tiny. The same
requests (prefill chunks crossing block boundaries, then decode steps filling blocks)
go through the engine's ``plan.plan_step`` / ``step.apply_step`` on both routes: outputs
must agree to float32 summation order and the pages must be the same bytes.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from zipcache_vllm.config import ProbeConfig  # noqa: E402
from zipcache_vllm.kernels.triton_loader import load  # noqa: E402
from zipcache_vllm.layout import BlockLayout  # noqa: E402
from zipcache_vllm.engine.plan import plan_step  # noqa: E402
from zipcache_vllm.policies import make_policy  # noqa: E402
from zipcache_vllm.config import load_preset  # noqa: E402
from zipcache_vllm.engine.staging import StagingPool  # noqa: E402
from zipcache_vllm.engine.step import apply_step  # noqa: E402

B = 16
CHUNKS = [[21, 11], [1, 1], [1, 1], [1, 1], [12, 1], [1, 1]]  # per step, two requests
OUT_TOL = 2e-5  # float32 math in both, different summation order
# the Triton host wrappers the CUDA route must run (decode: the packed part, the staged
# tokens and their merge; chunks: the packed prefix; filled blocks: packing)
TRITON_WRAPPERS = ("decode_attention", "staging_attention", "merge_lse", "prefill_attention",
                   "quantize_pack")
triton_ops = load("ops")


def _run(route: str, monkeypatch, H: int, g: int, D: int, calls: list | None = None):
    monkeypatch.setenv("ZIPCACHE_VLLM_KERNELS", route)
    dev = torch.device("cuda" if route == "triton" and torch.cuda.is_available() else "cpu")
    if calls is not None:  # record which Triton host wrappers ran
        for name in TRITON_WRAPPERS:
            fn = getattr(triton_ops, name)
            monkeypatch.setattr(triton_ops, name,
                                lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    gen = torch.Generator().manual_seed(7)
    layout = BlockLayout(B, D, H, 4, 2, 7)
    policy = make_policy(load_preset("zipcache").model_copy(update={
        "block_size": B, "salient_ratio": 7 / B, "key_rotation": "none",
        "probes": ProbeConfig(strategy="recent_random", recent_frac=0.25, random_frac=0.25, seed=3)}))
    pool = StagingPool(["layer0"], 4, B, H, D, torch.bfloat16, dev, blocks=policy.staged_blocks)
    pages = torch.zeros(12, layout.page_bytes, dtype=torch.uint8, device=dev)
    length = [sum(c[i] for c in CHUNKS) for i in range(2)]
    k = [torch.randn(n, H, D, generator=gen).bfloat16().to(dev) for n in length]
    v = [torch.randn(n, H, D, generator=gen).bfloat16().to(dev) for n in length]
    q = [torch.randn(n, H * g, D, generator=gen).bfloat16().to(dev) for n in length]
    table = torch.tensor([[3, 7, 1, 9, 0, 0], [5, 2, 11, 4, 0, 0]], dtype=torch.int32, device=dev)
    pos, outs = [0, 0], []
    for chunk in CHUNKS:
        qsl = [0, chunk[0], chunk[0] + chunk[1]]
        seq = [pos[i] + chunk[i] for i in range(2)]
        plans = plan_step(pool, B, qsl, seq, table)
        sl = [slice(pos[i], seq[i]) for i in range(2)]
        qq = torch.cat([q[i][sl[i]] for i in range(2)])
        out = torch.zeros(qq.shape, dtype=torch.float32, device=dev)
        apply_step(pool, 0, plans, qq, torch.cat([k[i][sl[i]] for i in range(2)]),
                   torch.cat([v[i][sl[i]] for i in range(2)]), pages, layout, policy, D ** -0.5, out)
        outs.append(out.cpu())
        pos = seq
    return outs, pages.cpu()


@pytest.mark.parametrize("H,g,D", [(2, 2, 64), (1, 3, 128)])
def test_flow_on_triton_equals_flow_on_cpu_kernels(monkeypatch, H, g, D):
    outs_c, pages_c = _run("", monkeypatch, H, g, D)
    calls: list[str] = []
    outs_t, pages_t = _run("triton", monkeypatch, H, g, D, calls)
    assert set(TRITON_WRAPPERS) <= set(calls)
    for a, b in zip(outs_c, outs_t):
        torch.testing.assert_close(b, a, atol=OUT_TOL * float(a.abs().max()), rtol=OUT_TOL)
    assert torch.equal(pages_c, pages_t)
    # blocks filled: 2 of request 0, 1 of request 1; packed: those with a block filled after
    # them (the default waits one block: saliency_delay)
    assert int((pages_c != 0).any(dim=1).sum()) == 1
