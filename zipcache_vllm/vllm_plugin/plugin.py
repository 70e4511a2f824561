"""vLLM general plugin entry point: ``vllm.general_plugins: zipcache = ...:register``.

vLLM calls :func:`register` in every process (API server, engine core, workers),
sometimes several times, before it builds the ``--kv-cache-dtype`` choices.
Every step is idempotent. Importing this module patches nothing.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """Make the zipcache dtypes legal, register the backend and route to it."""
    global _registered
    if _registered:
        return
    from . import backend, compat, staging
    from .dtypes import cache_dtypes, is_zipcache_dtype

    compat.patch_cache_dtypes(sorted(cache_dtypes()))
    compat.register_backend(compat.AttentionBackendEnum.CUSTOM, backend.BACKEND_PATH)
    compat.patch_platform_attn_backend(is_zipcache_dtype, backend.BACKEND_PATH,
                                       backend.validate_selector_config)
    compat.patch_platform_check_config(is_zipcache_dtype, _update_vllm_config)
    compat.patch_default_max_num_seqs(is_zipcache_dtype, backend.DEFAULT_MAX_NUM_SEQS)
    compat.patch_cpu_kv_budget(backend.reserved_staging_bytes)
    compat.patch_request_lifecycle(staging.on_request_removed, staging.on_request_preempted,
                                   staging.on_request_resumed)
    _registered = True


def _update_vllm_config(vllm_config) -> None:
    """The backend's config checks, then the worker extension behind ``GET /zipcache/stats``
    (``endpoints.py``) unless the user chose one with ``--worker-extension-cls``."""
    from . import backend, worker_ext

    backend.update_vllm_config(vllm_config)
    if not vllm_config.parallel_config.worker_extension_cls:
        vllm_config.parallel_config.worker_extension_cls = worker_ext.EXTENSION_PATH
