"""Shared by the end-to-end test modules: one real ``vllm serve`` (through our launcher).

The class lives in the package (:mod:`zipcache_vllm.reliability.server`) because
``zipcache-vllm reliability load`` starts servers too; tests import it from here.
"""
from zipcache_vllm.reliability.server import (  # noqa: F401  (re-exported)
    KV_TOKENS,
    STARTUP_S,
    WORKER_EXT,
    Server,
    free_port,
    leaked,
)
