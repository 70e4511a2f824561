"""Shared by the end-to-end test modules: one real ``vllm serve`` (through our launcher).

The class lives in the package (:mod:`zipcache_vllm.reliability.server`) because
``zipcache-vllm reliability load`` starts servers too. The tests' servers differ in one
setting: vLLM's worker runs inside the engine-core process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
on the server, so the CPU platform keeps vLLM's single-process executor), one Python
process fewer to import vLLM into. In ``bash .ci/run`` on a fresh clone (2-core AMD box,
``--durations``) the shared servers' setups went from 52.6 / 44.0 / 40.1 s
(test_reliability_serving / test_engine_e2e / test_endpoints_live, before) to
29.5 / 29.0 / 28.1 s, and CI starts about twenty servers. The attention backend,
staging pool and worker extension are the same objects either way. vLLM's default layout (a worker process of its own) is what
``tests/package/test_cli.py::test_serve_end_to_end``, the TP=3 test and
``zipcache-vllm bench serve`` run.
"""
from zipcache_vllm.reliability.server import (  # noqa: F401  (re-exported)
    STARTUP_S,
    WORKER_EXT,
    Server as _PackageServer,
    free_port,
    leaked,
)

WORKER_IN_ENGINE_CORE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class Server(_PackageServer):
    """:class:`zipcache_vllm.reliability.server.Server` with the worker in the engine core
    (a caller's ``env`` may set ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` for vLLM's default)."""

    def __init__(self, *args, env: dict | None = None, **kw) -> None:
        super().__init__(*args, env={**WORKER_IN_ENGINE_CORE, **(env or {})}, **kw)


def logged_kv_tokens(model, kv_cache_dtype: str, kv_space_gib: int) -> int:
    """The engine's logged "KV cache size" for ``kv_cache_dtype`` at vLLM's defaults (the
    model's --max-model-len) and ``VLLM_CPU_KVCACHE_SPACE=kv_space_gib``; the engine stops
    once it logged it."""
    server = Server(model, "--kv-cache-dtype", kv_cache_dtype, max_model_len=None, kv_space_gib=kv_space_gib)
    try:
        return server.kv_tokens()
    finally:
        server.stop()
