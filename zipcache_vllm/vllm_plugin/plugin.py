"""vLLM general plugin entry point: ``vllm.general_plugins: zipcache = ...:register``.

vLLM calls :func:`register` in every process (API server, engine core, workers),
sometimes several times, before it builds the ``--kv-cache-dtype`` choices.
Every step is idempotent. Importing this module patches nothing.

The plugin never breaks vLLM. ``compat.py`` patches vLLM internals read off 0.32.0, and
those move between minor versions; on a vLLM outside :data:`SUPPORTED_VLLM`,
:func:`register` patches nothing and warns once (in the process that started vLLM;
the engine core and workers it spawns log at debug level), so vLLM and its own
``--kv-cache-dtype`` values work as without the plugin. A command line that asks for a
zipcache dtype there stops with the supported range (exit code 2, like an argparse
error) instead of vLLM's bare "invalid choice". The endpoint and stat-logger plugins
(``endpoints.py``, ``metrics.py``) ask the same :func:`vllm_version_problem` and stay inert.
"""
from __future__ import annotations

import logging
import multiprocessing
import sys

# [min, max) of vLLM (major, minor): the internals in compat.py were read off 0.32.0.
SUPPORTED_VLLM = ((0, 32), (0, 33))

# Under "vllm" so that vLLM's log configuration shows it (compat.logger is the same logger).
logger = logging.getLogger("vllm.zipcache_vllm")

_registered = False
_disabled = False


def supported_range() -> str:
    """``SUPPORTED_VLLM`` as a person reads it: ``0.32.x``."""
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_VLLM
    if (hi_major, hi_minor) == (lo_major, lo_minor + 1):
        return f"{lo_major}.{lo_minor}.x"
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def vllm_version_problem(version: str | None = None) -> str | None:
    """Why this vLLM (``vllm.__version__`` unless ``version`` is given) cannot run the
    plugin, or None when its major.minor is in :data:`SUPPORTED_VLLM`."""
    if version is None:
        import vllm
        version = vllm.__version__
    parts = version.split("+")[0].split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        major_minor = None
    lo, hi = SUPPORTED_VLLM
    if major_minor is not None and lo <= major_minor < hi:
        return None
    return f"zipcache_vllm supports vLLM {supported_range()}, found {version}"


def requested_zipcache_dtype(argv: list[str]) -> str | None:
    """The zipcache ``--kv-cache-dtype`` value on a command line, or None (both spellings
    vLLM's parser accepts, ``--kv-cache-dtype X`` / ``=X`` and ``--kv_cache_dtype``)."""
    from ..dtypes import is_zipcache_dtype

    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag.replace("_", "-") != "--kv-cache-dtype":
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if is_zipcache_dtype(value):
            return value
    return None


def register() -> None:
    """Make the zipcache dtypes legal, register the backend and route to it."""
    global _registered
    if _registered:
        return
    problem = vllm_version_problem()
    if problem is not None:
        _disable(problem)
        return
    from . import backend, compat, kv_spec
    from ..dtypes import cache_dtypes, is_zipcache_dtype

    compat.patch_cache_dtypes(sorted(cache_dtypes()))
    compat.register_backend(compat.AttentionBackendEnum.CUSTOM, backend.BACKEND_PATH)
    compat.patch_platform_attn_backend(is_zipcache_dtype, backend.backend_path,
                                       backend.validate_selector_config)
    compat.patch_platform_check_config(is_zipcache_dtype, _update_vllm_config)
    compat.register_kv_cache_spec(kv_spec.ZipCacheSpec, kv_spec.ZipCacheManager,
                                  compat.FullAttentionSpec)
    compat.register_kv_cache_spec(kv_spec.ZipCacheSlidingSpec, kv_spec.ZipCacheSlidingManager,
                                  compat.SlidingWindowSpec)
    compat.patch_sliding_window_spec(backend.is_zipcache_backend)
    compat.patch_request_lifecycle(backend.staging_pool_of)
    _registered = True


def _disable(problem: str) -> None:
    """Leave vLLM unpatched: one warning, or a clear exit when the command line asks for
    a zipcache dtype. Only the process that started vLLM (no multiprocessing parent)
    reads the command line and warns: spawned engine processes inherit its ``sys.argv``."""
    global _disabled
    if _disabled:
        return
    _disabled = True
    started_vllm = multiprocessing.parent_process() is None
    requested = requested_zipcache_dtype(sys.argv[1:]) if started_vllm else None
    if requested is not None:
        print(f"error: --kv-cache-dtype {requested}: {problem}. The zipcache_vllm plugin is "
              "disabled on this vLLM (it patches vLLM internals that move between minor "
              f"versions): install vllm {supported_range()}, or use one of vLLM's own "
              "--kv-cache-dtype values.", file=sys.stderr)
        raise SystemExit(2)
    log = logger.warning if started_vllm else logger.debug
    log("%s: plugin disabled (it patches vLLM internals that move between minor versions); "
        "vLLM runs as without it, --kv-cache-dtype zipcache* is unavailable.", problem)


def _update_vllm_config(vllm_config) -> None:
    """The backend's config checks, then the worker extension behind ``GET /zipcache/stats``
    (``endpoints.py``) unless the user chose one with ``--worker-extension-cls``."""
    from . import backend, worker_ext

    backend.update_vllm_config(vllm_config)
    if not vllm_config.parallel_config.worker_extension_cls:
        vllm_config.parallel_config.worker_extension_cls = worker_ext.EXTENSION_PATH
