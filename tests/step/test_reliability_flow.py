"""Chunking invariance of the backend's step flow (no engine).

What a request computes must not depend on how vLLM splits it into steps: a long
prompt prefilled in one chunk, in several chunks (token budget shared with other
requests), resumed from a prefix-cache hit, or recomputed after preemption (prompt
and generated tokens in one chunk) must give the same attention outputs and write
the same pages as token-by-token decode. Otherwise greedy outputs change under
load (preemption), and the same request twice differs (prefix-cache hit on its
second run). The rule that makes it hold: every query sees the blocks before its
own block as packed pages and its own block in full precision (8-bit staging: as their
8-bit rounding, which every token of a partial block is for every reader), whatever the
chunk.
"""
from __future__ import annotations

import pytest
import torch

from zipcache_vllm.config import load_preset
from zipcache_vllm.layout import BlockLayout
from zipcache_vllm.engine.plan import plan_step
from zipcache_vllm.policies import make_policy
from zipcache_vllm.engine.staging import StagingPool
from zipcache_vllm.engine.step import apply_step
from zipcache_vllm.layout import StagingLayout

H, G, D = 3, 3, 64  # SmolLM2-135M: 3 KV heads, 9 query heads, head size 64
LENGTH = 300  # 2 full blocks of 128 and a partial one
# Chunk schedules of the same 300 tokens. "decode" is the reference (what a request
# generating these tokens one by one computes).
SCHEDULES = {
    "one_chunk": [300],
    "budget_split": [200, 100],
    "awkward": [130, 3, 125, 42],
    "prefix_hit_then_rest": [256, 44],
}
# Both sides run the same float32 math in another grouping (online softmax tiles,
# batched decode kernel vs chunk path): observed <= 2e-6.
ATOL = 1e-4


def _run(chunks: list[int], preset: str = "zipcache", kv_bits: int | None = None):
    """Drive one request through ``plan_step`` / ``apply_step``; outputs and pages.
    ``kv_bits`` 8: paged 8-bit staging (the engine's), else a dense pool in the model dtype."""
    p = load_preset(preset)
    layout = BlockLayout.from_preset(p, D, H)
    policy = make_policy(p)
    paged = StagingLayout.of(layout, kv_bits=8, blocks=p.staged_blocks) if kv_bits == 8 else None
    pool = StagingPool(["layer0"], 2, p.block_size, H, D, torch.bfloat16, paged=paged,
                       blocks=p.staged_blocks)
    pages = torch.zeros(12, layout.page_bytes, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(LENGTH, H * G, D, generator=gen).bfloat16()
    k = (torch.randn(LENGTH, H, D, generator=gen) * 2).bfloat16()
    v = torch.randn(LENGTH, H, D, generator=gen).bfloat16()
    # the blocks ahead for paged staging (5 for the default's delayed block: two blocks in 6 pages)
    table = torch.tensor([[5, 2, 7, 1, 3, 8, 9, 10]], dtype=torch.int32)
    out = torch.zeros(LENGTH, H * G, D)
    pos = 0
    for c in chunks:
        plans = plan_step(pool, layout.block_size, [0, c], [pos + c], table)
        o = torch.zeros(c, H * G, D)
        apply_step(pool, 0, plans, q[pos:pos + c], k[pos:pos + c], v[pos:pos + c], pages,
                   layout, policy, D ** -0.5, o)
        out[pos:pos + c] = o
        pos += c
    # the packed pages: block 0, and block 1 unless it waits for a block after it (delay)
    return out, pages[[5, 2][:2 - p.saliency_delay]].clone()


@pytest.fixture(scope="module")
def decode_reference():
    return _run([128] + [1] * (LENGTH - 128))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_outputs_and_pages_do_not_depend_on_the_chunking(schedule, decode_reference,
                                                         one_intra_op_thread):
    ref_out, ref_pages = decode_reference
    out, pages = _run(SCHEDULES[schedule])
    err = (out - ref_out).abs().max().item()
    assert err < ATOL, f"{schedule}: max |out - decode| = {err:.3g}"
    assert torch.equal(pages, ref_pages), f"{schedule}: pages differ from decode's"


@pytest.fixture(scope="module")
def decode_reference_8bit():
    return _run([128] + [1] * (LENGTH - 128), kv_bits=8)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_8bit_staging_does_not_depend_on_the_chunking(schedule, decode_reference_8bit,
                                                      decode_reference, one_intra_op_thread):
    """8-bit staging keeps the invariance: a chunk's queries read the tokens of its partial
    block rounded, as decode reads them from staging, and the tail's codes come from the
    exact rows, so a token is rounded once whatever the split."""
    ref_out, ref_pages = decode_reference_8bit
    out, pages = _run(SCHEDULES[schedule], kv_bits=8)
    err = (out - ref_out).abs().max().item()
    assert err < ATOL, f"{schedule}: max |out - decode| = {err:.3g}"
    assert torch.equal(pages, ref_pages), f"{schedule}: pages differ from decode's"
    assert (out - decode_reference[0]).abs().max() > ATOL  # and 8 bits did round something
