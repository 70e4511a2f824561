"""What a worker's KV cache holds right now: tokens, blocks, bytes and the measured compression.

``summarize`` and ``combine`` are pure (tested without vLLM); ``worker_stats`` reads a live
worker (called through ``ZipCacheWorkerExtension.zipcache_stats`` by ``GET /zipcache/stats``
and the worker-state Prometheus gauges, see ``endpoints.py`` and ``metrics.py``).

Measured compression = bytes the same tokens take in bf16 (K and V, every layer of this
worker) / bytes they hold here: every allocated page of a live request (partially filled
blocks and the staging blocks allocated ahead included: paged staging lives in them) plus
the staging slots in use of a pool with tensors of its own (none in the engine). Small
contexts pay the staging blocks of every running request, so the measured ratio approaches
the page ratio only as contexts grow.
"""
from __future__ import annotations

from collections.abc import Iterable


def summarize(requests: Iterable[tuple[list[int], int]], block_size: int, num_layers: int,
              page_bytes: int | None, num_kv_heads: int, head_size: int, dtype_bytes: int,
              staging_in_use: int = 0, staging_slot_bytes: int = 0) -> dict:
    """Stats of live requests given as ``(block ids, tokens computed)``; a block shared by
    prefix caching counts once, with the most tokens any request has in it."""
    held: dict[int, int] = {}
    n = 0
    for block_ids, computed in requests:
        n += 1
        for j, block in enumerate(block_ids):
            tokens = min(block_size, max(0, computed - j * block_size))
            held[block] = max(held.get(block, 0), tokens)
    tokens = sum(held.values())
    out = {"requests": n, "blocks_in_use": len(held), "tokens_stored": tokens}
    if page_bytes is None:
        return out | {"bytes_held": None, "bf16_bytes": None, "measured_compression": None}
    bytes_held = len(held) * num_layers * page_bytes + staging_in_use * staging_slot_bytes
    bf16 = tokens * num_layers * 2 * num_kv_heads * head_size * dtype_bytes
    return out | {"bytes_held": bytes_held, "bf16_bytes": bf16,
                  "measured_compression": bf16 / bytes_held if tokens and bytes_held else None}


def combine(workers: list[dict]) -> dict:
    """One engine's view of its workers' stats (or all engines', for ``GET /zipcache/stats``).

    Token, block, request and staging counts are the first worker's (tensor- and
    pipeline-parallel workers serve the same requests); bytes per token and the bytes
    held / bf16 bytes behind the measured compression are summed over the workers."""
    first = workers[0] if workers else {}
    per_token = [w.get("bytes_per_token") for w in workers]
    held = sum(w.get("bytes_held") or 0 for w in workers)
    bf16 = sum(w.get("bf16_bytes") or 0 for w in workers)
    return {
        "preset": first.get("preset"),
        "bytes_per_token": sum(per_token) if per_token and None not in per_token else None,
        "page_compression": first.get("page_compression"),
        "capacity_tokens": first.get("capacity_tokens", 0),
        "tokens_stored": first.get("tokens_stored", 0),
        "blocks_in_use": first.get("blocks_in_use", 0),
        "requests": first.get("requests", 0),
        "staging_slots": first.get("staging_slots", 0),
        "staging_blocks_in_use": first.get("staging_in_use", 0),
        "measured_compression": bf16 / held if held and bf16 else None,
    }


def by_engine(workers: list[dict]) -> dict[int, list[dict]]:
    """Workers grouped by their engine (vLLM's data-parallel rank, its ``engine`` label)."""
    out: dict[int, list[dict]] = {}
    for w in workers:
        out.setdefault(int(w.get("engine") or 0), []).append(w)
    return out


def _page_layers(vllm_config) -> list:
    ctx = vllm_config.compilation_config.static_forward_context
    return [layer for layer in ctx.values() if hasattr(getattr(layer, "impl", None), "layout")]


def worker_stats(worker) -> dict:
    """This worker's KV stats (any ``--kv-cache-dtype``; page fields only for zipcache)."""
    from ..dtypes import is_zipcache_dtype, preset_for_dtype
    from .backend import staging_pool_of

    cfg = worker.vllm_config
    runner = worker.model_runner
    cache_dtype = cfg.cache_config.cache_dtype
    block_size = cfg.cache_config.block_size
    kv_config = getattr(runner, "kv_cache_config", None)
    num_blocks = getattr(kv_config, "num_blocks", 0)
    live = [(list(r.block_ids[0]) if r.block_ids else [], r.num_computed_tokens)
            for r in runner.requests.values()]
    base = {"rank": getattr(worker, "rank", None), "engine": cfg.parallel_config.data_parallel_rank,
            "cache_dtype": cache_dtype, "block_size": block_size,
            "num_blocks": num_blocks, "capacity_tokens": num_blocks * block_size}
    layers = _page_layers(cfg) if is_zipcache_dtype(cache_dtype) else []
    if not layers:
        stats = summarize(live, block_size, 0, None, 0, 0, 0)
        return base | stats | {"preset": None, "num_layers": None, "page_bytes": None,
                               "bytes_per_token": None, "page_compression": None,
                               "staging_slots": 0, "staging_in_use": 0}
    impl = layers[0].impl
    layout = impl.layout
    pool = staging_pool_of(cfg)
    slots, in_use = (pool.num_slots, pool.in_use) if pool is not None else (0, 0)
    slot_bytes = pool.nbytes // pool.num_slots if pool is not None else 0
    dtype_bytes = cfg.model_config.dtype.itemsize
    stats = summarize(live, block_size, len(layers), layout.page_bytes, impl.num_kv_heads, impl.head_size,
                      dtype_bytes, in_use, slot_bytes)
    bf16_page = 2 * impl.num_kv_heads * impl.head_size * dtype_bytes * block_size
    return base | stats | {
        "preset": preset_for_dtype(cache_dtype).name, "num_layers": len(layers),
        "page_bytes": layout.page_bytes, "bytes_per_token": len(layers) * layout.page_bytes / block_size,
        "page_compression": bf16_page / layout.page_bytes, "staging_slots": slots, "staging_in_use": in_use,
    }
