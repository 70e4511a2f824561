"""Prometheus gauges of the zipcache KV cache, exposed on vLLM's own ``/metrics``.

vLLM serves ``/metrics`` from prometheus_client's default registry (or, with several API
server processes, from the multiprocess directory); gauges created here land in the same
place. They are created once per process and set from ``GET /zipcache/stats`` snapshots
(``endpoints.py`` refreshes them in the background every ``ZIPCACHE_METRICS_INTERVAL_S``
seconds, default 5).
"""
from __future__ import annotations

_GAUGES: dict | None = None

DESCRIPTIONS = {
    "zipcache_kv_bytes_per_token": "KV bytes per token, all layers and workers, every part of the page counted",
    "zipcache_kv_capacity_tokens": "tokens the KV cache holds (vLLM blocks x block size)",
    "zipcache_kv_tokens_stored": "tokens in the KV blocks of running requests",
    "zipcache_kv_blocks_in_use": "KV blocks held by running requests",
    "zipcache_staging_slots": "full-precision staging slots (max_num_seqs + 1)",
    "zipcache_staging_slots_in_use": "staging slots held by running requests",
    "zipcache_kv_compression_measured": "bf16 bytes of the stored tokens / bytes they hold (pages + staging)",
    "zipcache_kv_compression_page": "bf16 page bytes / zipcache page bytes (layout, staging excluded)",
}


def gauges() -> dict:
    """The gauges, created on first use (``zipcache_info`` carries dtype and preset as labels)."""
    global _GAUGES
    if _GAUGES is None:
        from prometheus_client import Gauge

        kw = {"multiprocess_mode": "mostrecent"}
        _GAUGES = {name: Gauge(name, doc, **kw) for name, doc in DESCRIPTIONS.items()}
        _GAUGES["zipcache_info"] = Gauge("zipcache_info", "KV cache dtype and zipcache preset (value 1)",
                                         ["kv_cache_dtype", "preset"], **kw)
    return _GAUGES


def update(stats: dict) -> None:
    """Set the gauges from a ``/zipcache/stats`` response (``None`` values are skipped)."""
    g = gauges()
    g["zipcache_info"].labels(stats["kv_cache_dtype"], stats["preset"] or "none").set(1)
    values = {
        "zipcache_kv_bytes_per_token": stats["bytes_per_token"],
        "zipcache_kv_capacity_tokens": stats["capacity_tokens"],
        "zipcache_kv_tokens_stored": stats["tokens_stored"],
        "zipcache_kv_blocks_in_use": stats["blocks_in_use"],
        "zipcache_staging_slots": stats["staging_slots"],
        "zipcache_staging_slots_in_use": stats["staging_blocks_in_use"],
        "zipcache_kv_compression_measured": stats["measured_compression"],
        "zipcache_kv_compression_page": stats["page_compression"],
    }
    for name, value in values.items():
        if value is not None:
            g[name].set(value)
