"""vLLM's own KV capacity for several ``--kv-cache-dtype`` values, measured in one process.

    python -m zipcache_vllm.planner.engine_check --model DIR --kv-cache-dtype auto,fp8,zipcache \
        --max-model-len 2000 --kv-cache-memory-bytes 2G

Builds ``vllm.LLM`` once per dtype, in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
engine core and the CPU worker run here, so vLLM is imported once, not three times per
dtype), with the budget as vLLM's ``--kv-cache-memory-bytes`` (``VLLM_CPU_KVCACHE_SPACE`` is
removed from the environment: vLLM would use it instead), reads the capacity vLLM computed
and logged ("KV cache size: N tokens", ``cache_config.kv_cache_size_tokens``), and tears the
engine down. A dtype the engine refuses
(vLLM's fp8 CPU path needs AVX-512 or AMX) is reported with vLLM's message and, when it came
after the capacity was computed, with the logged capacity too. Prints one JSON object.
Used by ``tests/test_planner_engine.py``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time

KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def measure(model: str, dtypes: list[str], max_model_len: int, kv_cache_memory_bytes: int) -> dict[str, dict]:
    """``{dtype: {"kv_tokens": N, "seconds": s} | {"refused": why, ...}}``."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    capture = _Capture()
    logging.getLogger("vllm").addHandler(capture)
    out = {}
    for dtype in dtypes:
        capture.lines.clear()
        start = time.time()
        llm = None
        try:
            llm = LLM(model=model, kv_cache_dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
                      kv_cache_memory_bytes=kv_cache_memory_bytes)
            tokens = getattr(llm.llm_engine.vllm_config.cache_config, "kv_cache_size_tokens", None)
            logged = [int(m.group(1).replace(",", "")) for m in map(KV_TOKENS.search, capture.lines) if m]
            if tokens is None and not logged:
                raise RuntimeError("the engine started but reported no KV cache size")
            out[dtype] = {"kv_tokens": int(tokens if tokens is not None else logged[-1])}
        except Exception as exc:  # vLLM refused the dtype on this machine
            logged = [int(m.group(1).replace(",", "")) for m in map(KV_TOKENS.search, capture.lines) if m]
            out[dtype] = {"refused": f"{type(exc).__name__}: {exc}"[:500]}
            if logged:
                out[dtype]["kv_tokens_logged"] = logged[-1]
        finally:
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()
        logged = [int(m.group(1).replace(",", "")) for m in map(KV_TOKENS.search, capture.lines) if m]
        out[dtype]["logged"] = logged[-1] if logged else None
        out[dtype]["seconds"] = round(time.time() - start, 1)
        print(f"[engine_check] {dtype}: {out[dtype]}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from .units import human_readable_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--kv-cache-dtype", required=True, help="comma-separated --kv-cache-dtype values")
    ap.add_argument("--max-model-len", type=human_readable_int, required=True)
    ap.add_argument("--kv-cache-memory-bytes", type=human_readable_int, required=True,
                    help="vLLM's KV budget per worker (2G = 2 GiB)")
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args.model, [d for d in args.kv_cache_dtype.split(",") if d], args.max_model_len,
                     args.kv_cache_memory_bytes)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
