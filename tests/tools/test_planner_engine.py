"""The planner's CPU capacity equals what vLLM's engine computes and logs ("KV cache size: N
tokens"), for auto, fp8 and a zipcache dtype of every page layout (``QUICK_EVAL_DTYPES``;
the others share those pages).

The engines are the ones of the session's quick engine eval (``engine_quick_eval`` in
conftest.py: one worker process, one engine per dtype, ``VLLM_CPU_KVCACHE_SPACE=1``, a
``--max-model-len`` that is not a multiple of the block size), so capacity is measured
once per session and compared here with the plan of the same settings.
"""
from __future__ import annotations

import pytest

from zipcache_vllm.planner.plan import PlanRequest, make_plan

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def test_planner_equals_engine_capacity_for_each_page_layout(engine_quick_eval, model_dir):
    s = engine_quick_eval["settings"]
    rows = {r["kv_cache_dtype"]: r for r in engine_quick_eval["rows"]}
    plan = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=s["kv_space_gib"],
                                 max_model_len=s["max_model_len"], max_num_seqs=s["max_num_seqs"],
                                 kv_cache_dtypes=list(rows)))
    checked = []
    for row in plan.rows:
        got = rows[row.cache_dtype]
        if got["unsupported"]:  # vLLM's fp8 CPU path needs x86 AVX-512 or AMX
            assert row.cache_dtype == "fp8" and "AVX-512" in got["unsupported"], got
            continue
        assert row.kv_tokens == got["kv_tokens_logged"], (row.cache_dtype, row.kv_tokens, got["kv_tokens_logged"])
        checked.append(row.cache_dtype)
    assert {"auto", "zipcache", "zipcache_hc", "zipcache_kivi2", "zipcache_fastgen"} <= set(checked)
