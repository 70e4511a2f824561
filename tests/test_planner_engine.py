"""The planner's CPU capacity equals what vLLM's engine computes and logs ("KV cache size: N
tokens"), for auto, fp8 and every zipcache dtype.

The engines run one after the other in ONE subprocess (``zipcache_vllm.planner.engine_check``:
``vllm.LLM`` in process, so vLLM is imported once instead of three processes per dtype).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zipcache_vllm.planner.plan import PlanRequest, make_plan
from zipcache_vllm.vllm_plugin.dtypes import cache_dtypes

pytestmark = [pytest.mark.slow, pytest.mark.engine]

KV_SPACE_GIB = 2  # VLLM_CPU_KVCACHE_SPACE of every engine here
MAX_MODEL_LEN = 2000  # not a multiple of the block size: vLLM's token count rounds by whole blocks
TOLERANCE = 0.01  # the acceptance bound; the planner is expected to be exact
TIMEOUT_S = 1800  # a shared 2-core machine; about 2 minutes when it is not shared


def _dtypes() -> list[str]:
    return ["auto", "fp8", *sorted(cache_dtypes())]


@pytest.fixture(scope="module")
def engine_kv(model_dir) -> dict[str, dict]:
    """``{dtype: {"kv_tokens": N} or {"refused": why, "kv_tokens_logged": N?}}`` from the engine."""
    cmd = [sys.executable, "-m", "zipcache_vllm.planner.engine_check", "--model", str(model_dir),
           "--dtypes", ",".join(sorted(_dtypes(), key=lambda d: d == "fp8")),  # fp8 may be refused: last
           "--max-model-len", str(MAX_MODEL_LEN),
           "--kv-cache-space-gib", str(KV_SPACE_GIB)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\nengine KV capacity:", {d: r.get("kv_tokens", r.get("refused")) for d, r in result.items()})
    print("seconds per engine:", {d: r["seconds"] for d, r in result.items()})
    return result


def test_planner_equals_engine_capacity_for_every_cpu_dtype(engine_kv, model_dir):
    plan = make_plan(PlanRequest(model=str(model_dir), hardware="cpu-dev", kv_cache_space_gib=KV_SPACE_GIB,
                                 max_model_len=MAX_MODEL_LEN, kv_cache_dtypes=_dtypes()))
    checked = []
    for row in plan.rows:
        got = engine_kv[row.cache_dtype]
        if "refused" in got:
            # vLLM's fp8 CPU path needs x86 AVX-512 or AMX: the engine refuses it at warm-up, after
            # it has computed and logged the capacity (compared when it was logged).
            assert row.cache_dtype == "fp8" and "AVX-512" in got["refused"], got
            engine = got.get("kv_tokens_logged")
            if engine is None:
                continue
        else:
            engine = got["kv_tokens"]
            # the number vLLM printed is the one it kept (vLLM logs a repeated line once per process)
            assert got["logged"] in (None, engine)
        assert abs(row.kv_tokens - engine) <= TOLERANCE * engine
        assert row.kv_tokens == engine, (row.cache_dtype, row.kv_tokens, got)
        checked.append(row.cache_dtype)
    assert {"auto", "zipcache", "zipcache_hc", "zipcache_kivi2"} <= set(checked)
    assert engine_kv["zipcache"]["kv_tokens"] > 4.5 * engine_kv["auto"]["kv_tokens"]
