"""Worker extension: read this worker's staging pool through vLLM's own RPC.

Mixed into the worker with ``--worker-extension-cls
zipcache_vllm.vllm_plugin.worker_ext.ZipCacheWorkerExtension`` (vLLM's
extension mechanism, no patch). With ``VLLM_SERVER_DEV_MODE=1`` the server's
``POST /collective_rpc {"method": "zipcache_staging_stats"}`` returns one dict
per worker. Used by the end-to-end tests to prove slots are never leaked.
``zipcache_request_state`` adds the rest of the per-request bookkeeping, so the
reliability tests can prove that everything a request leaves behind is gone.
The pool is the worker's engine's (``backend.staging_pool_of(self.vllm_config)``).
"""
from __future__ import annotations

from .backend import staging_pool_of


EXTENSION_PATH = "zipcache_vllm.vllm_plugin.worker_ext.ZipCacheWorkerExtension"


class ZipCacheWorkerExtension:
    def zipcache_staging_stats(self) -> dict:
        pool = staging_pool_of(self.vllm_config)
        if pool is None:
            return {"slots": 0, "in_use": 0, "bytes": 0}
        return {"slots": pool.num_slots, "in_use": pool.in_use, "bytes": pool.nbytes}

    def zipcache_stats(self) -> dict:
        """Tokens, blocks, bytes and measured compression of this worker's KV cache
        (``GET /zipcache/stats`` and the Prometheus metrics; see ``kv_stats.py``)."""
        from .kv_stats import worker_stats
        return worker_stats(self)

    def zipcache_request_state(self) -> dict:
        """Everything this worker holds per request; all counts are 0 when idle.

        ``in_use``: staging slots held; ``keyed_blocks``: vLLM block ids mapped to a
        slot; ``staged_tokens``: tokens whose K/V sit in a slot; ``saliency_tokens``:
        saliency accumulator entries (score, count) a later step would read (the first
        ``fill`` entries of each held slot; with paged staging they sit in the slot's page run,
        one per staged token); ``preempted_pending``: preempted requests
        whose slots were released and that have not resumed or ended yet.
        ``num_kv_heads``: the KV heads of this rank (its share under tensor parallelism).
        """
        state = {"rank": getattr(self, "rank", None)}
        pool = staging_pool_of(self.vllm_config)
        if pool is None:
            return {**state, "preempted_pending": 0, "slots": 0, "in_use": 0, "keyed_blocks": 0,
                    "staged_tokens": 0, "saliency_tokens": 0, "num_kv_heads": 0}
        held = [s for s in range(pool.num_slots) if pool._block_of_slot[s] != -1]
        return {**state, "preempted_pending": pool.preempted_pending, "slots": pool.num_slots,
                "in_use": pool.in_use, "keyed_blocks": len(pool._slot_of_block),
                "staged_tokens": sum(pool.fill),
                "saliency_tokens": (sum(pool.fill[s] for s in held) if pool.paged is not None
                                    else int(sum(int((pool.count[0, s, :pool.fill[s]] > 0).sum())
                                                 for s in held))),
                "num_kv_heads": pool.num_kv_heads}
